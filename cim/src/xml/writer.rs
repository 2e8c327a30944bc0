//! Writes CIM-XML (DSP0201) straight into a byte buffer: responses, instances, paths, classes,
//! and the export request that carries an indication.

use crate::schema::{Class, PropertyDecl, QualValue, Qualifier, Schema};
use crate::value::{CimType, Instance, ObjectPath, Value};

/// Which parts of an instance or class to write.
#[derive(Debug, Clone, Default)]
pub struct Shape<'a> {
    /// Only these properties (case-insensitive), when given.
    pub property_list: Option<&'a [String]>,
    /// Write CLASSORIGIN attributes (needs the class).
    pub class_origin: bool,
    /// Write qualifiers (classes only; instance qualifiers are deprecated and never written).
    pub qualifiers: bool,
    /// Classes: only the elements the class itself declares or overrides.
    pub local_only: bool,
}

impl Shape<'_> {
    /// Whether the property list lets `name` through.
    pub fn allows(&self, name: &str) -> bool {
        match self.property_list {
            None => true,
            Some(list) => list.iter().any(|p| p.eq_ignore_ascii_case(name)),
        }
    }
}

/// A CIM-XML document being written.
pub struct XmlWriter {
    /// The bytes so far.
    pub buf: Vec<u8>,
    host: String,
}

/// The bytes `escape_into` replaces.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = !matches!(i, 0x09 | 0x0a | 0x0d);
        i += 1;
    }
    t[b'&' as usize] = true;
    t[b'<' as usize] = true;
    t[b'>' as usize] = true;
    t[b'"' as usize] = true;
    t[b'\'' as usize] = true;
    t
};

/// Appends `text` with the five XML specials and control characters escaped.
pub fn escape_into(buf: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    // Most text needs no escaping: copy it in one go.
    if !bytes.iter().any(|&b| NEEDS_ESCAPE[usize::from(b)]) {
        buf.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let rep: &[u8] = match b {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'"' => b"&quot;",
            b'\'' => b"&apos;",
            b'\t' | b'\n' | b'\r' => continue,
            0..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if rep.is_empty() {
            // Control characters cannot appear in XML 1.0 even as references: write U+FFFD.
            buf.extend_from_slice("\u{fffd}".as_bytes());
        } else {
            buf.extend_from_slice(rep);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

impl XmlWriter {
    /// A writer with room for `capacity` bytes; `host` goes into INSTANCEPATHs.
    pub fn new(host: &str, capacity: usize) -> XmlWriter {
        XmlWriter {
            buf: Vec::with_capacity(capacity),
            host: host.to_string(),
        }
    }

    /// Appends raw markup.
    pub fn raw(&mut self, s: &str) -> &mut Self {
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    /// Appends escaped text.
    pub fn text(&mut self, s: &str) -> &mut Self {
        escape_into(&mut self.buf, s);
        self
    }

    /// Writes a scalar's text, escaped, without building a string for numbers.
    pub fn value_text(&mut self, v: &Value) -> &mut Self {
        use std::io::Write as _;
        match v {
            Value::Str(s) => escape_into(&mut self.buf, s),
            Value::UInt(n, _) => {
                let _ = write!(self.buf, "{n}");
            }
            Value::SInt(n, _) => {
                let _ = write!(self.buf, "{n}");
            }
            Value::Bool(b) => self
                .buf
                .extend_from_slice(if *b { b"TRUE" } else { b"FALSE" }),
            other => escape_into(&mut self.buf, &other.to_text()),
        }
        self
    }

    /// Writes ` NAME="value"`.
    pub fn attr(&mut self, name: &str, value: &str) -> &mut Self {
        self.raw(" ").raw(name).raw("=\"").text(value).raw("\"")
    }

    /// The XML declaration, `CIM` and `MESSAGE` opening tags.
    pub fn begin_message(&mut self, message_id: &str) {
        self.raw("<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<CIM CIMVERSION=\"2.0\" DTDVERSION=\"2.0\"><MESSAGE")
            .attr("ID", message_id)
            .raw(" PROTOCOLVERSION=\"1.0\">");
    }

    /// Closes what `begin_message` opened.
    pub fn end_message(&mut self) {
        self.raw("</MESSAGE></CIM>\n");
    }

    /// `<ERROR CODE=".." DESCRIPTION=".."/>`
    pub fn error(&mut self, code: u16, description: &str) {
        self.raw("<ERROR")
            .attr("CODE", &code.to_string())
            .attr("DESCRIPTION", description)
            .raw("/>");
    }

    /// `LOCALNAMESPACEPATH`
    pub fn local_namespace(&mut self, namespace: &str) {
        self.raw("<LOCALNAMESPACEPATH>");
        for part in namespace.split('/').filter(|p| !p.is_empty()) {
            self.raw("<NAMESPACE").attr("NAME", part).raw("/>");
        }
        self.raw("</LOCALNAMESPACEPATH>");
    }

    /// `INSTANCENAME`
    pub fn instance_name(&mut self, path: &ObjectPath) {
        self.raw("<INSTANCENAME")
            .attr("CLASSNAME", &path.class)
            .raw(">");
        for k in &path.keys {
            self.raw("<KEYBINDING").attr("NAME", &k.name).raw(">");
            match &k.value {
                Value::Ref(r) => self.value_reference(r, &path.namespace),
                v => {
                    let vt = match v {
                        Value::Bool(_) => "boolean",
                        Value::UInt(..) | Value::SInt(..) | Value::Real(..) => "numeric",
                        _ => "string",
                    };
                    self.raw("<KEYVALUE VALUETYPE=\"")
                        .raw(vt)
                        .raw("\" TYPE=\"")
                        .raw(v.cim_type().name())
                        .raw("\">")
                        .value_text(v)
                        .raw("</KEYVALUE>");
                }
            }
            self.raw("</KEYBINDING>");
        }
        self.raw("</INSTANCENAME>");
    }

    /// `INSTANCEPATH` (host, namespace and name).
    pub fn instance_path(&mut self, path: &ObjectPath) {
        self.raw("<INSTANCEPATH><NAMESPACEPATH><HOST>");
        let host = std::mem::take(&mut self.host);
        self.text(&host);
        self.host = host;
        self.raw("</HOST>");
        self.local_namespace(&path.namespace);
        self.raw("</NAMESPACEPATH>");
        self.instance_name(path);
        self.raw("</INSTANCEPATH>");
    }

    /// `OBJECTPATH` (an instance path as an association operation returns it).
    pub fn object_path(&mut self, path: &ObjectPath) {
        self.raw("<OBJECTPATH>");
        self.instance_path(path);
        self.raw("</OBJECTPATH>");
    }

    /// `VALUE.REFERENCE`: a local instance path when the reference has a namespace (so that
    /// references across namespaces keep theirs), otherwise an instance name.
    pub fn value_reference(&mut self, path: &ObjectPath, _context_ns: &str) {
        self.raw("<VALUE.REFERENCE>");
        if path.namespace.is_empty() {
            self.instance_name(path);
        } else {
            self.raw("<LOCALINSTANCEPATH>");
            self.local_namespace(&path.namespace);
            self.instance_name(path);
            self.raw("</LOCALINSTANCEPATH>");
        }
        self.raw("</VALUE.REFERENCE>");
    }

    /// `VALUE.ARRAY` of scalars.
    fn value_array(&mut self, items: &[Value]) {
        self.raw("<VALUE.ARRAY>");
        for item in items {
            self.scalar_value(item);
        }
        self.raw("</VALUE.ARRAY>");
    }

    fn scalar_value(&mut self, v: &Value) {
        match v {
            Value::Embedded(inst) => {
                let mut inner = XmlWriter::new(&self.host, 1024);
                inner.instance(inst, &Shape::default(), None);
                let text = String::from_utf8_lossy(&inner.buf).into_owned();
                self.raw("<VALUE>").text(&text).raw("</VALUE>");
            }
            other => {
                self.raw("<VALUE>");
                self.value_text(other);
                self.raw("</VALUE>");
            }
        }
    }

    /// One property of an instance.
    fn property(
        &mut self,
        name: &str,
        value: &Value,
        decl: Option<&PropertyDecl>,
        shape: &Shape<'_>,
        ns: &str,
    ) {
        let origin = |w: &mut XmlWriter| {
            if let (true, Some(d)) = (shape.class_origin, decl) {
                w.attr("CLASSORIGIN", &d.class_origin);
            }
        };
        match value {
            Value::Ref(r) => {
                self.raw("<PROPERTY.REFERENCE").attr("NAME", name);
                if let Some(rc) = decl.and_then(|d| d.ref_class.as_deref()) {
                    self.attr("REFERENCECLASS", rc);
                }
                origin(self);
                self.raw(">");
                self.value_reference(r, ns);
                self.raw("</PROPERTY.REFERENCE>");
            }
            Value::Array(ty, items) => {
                self.raw("<PROPERTY.ARRAY")
                    .attr("NAME", name)
                    .attr("TYPE", ty.name());
                if items.iter().any(|v| matches!(v, Value::Embedded(_))) {
                    self.raw(" EmbeddedObject=\"instance\"");
                }
                origin(self);
                self.raw(">");
                self.value_array(items);
                self.raw("</PROPERTY.ARRAY>");
            }
            v => {
                self.raw("<PROPERTY")
                    .attr("NAME", name)
                    .raw(" TYPE=\"")
                    .raw(v.cim_type().name())
                    .raw("\"");
                if matches!(v, Value::Embedded(_)) {
                    self.raw(" EmbeddedObject=\"instance\"");
                }
                origin(self);
                self.raw(">");
                self.scalar_value(v);
                self.raw("</PROPERTY>");
            }
        }
    }

    /// `INSTANCE`, with the properties `shape` lets through. The schema is needed only for
    /// class origins.
    pub fn instance(&mut self, inst: &Instance, shape: &Shape<'_>, schema: Option<&Schema>) {
        self.raw("<INSTANCE")
            .attr("CLASSNAME", &inst.class)
            .raw(">");
        let ns: &str = inst
            .path
            .as_ref()
            .map(|p| p.namespace.as_ref())
            .unwrap_or("");
        let class = if shape.class_origin {
            schema.and_then(|s| s.class(&inst.class))
        } else {
            None
        };
        for (name, value) in &inst.props {
            if !shape.allows(name) {
                continue;
            }
            let decl = if shape.class_origin {
                class.and_then(|c| c.property(name))
            } else {
                None
            };
            self.property(name, value, decl, shape, ns);
        }
        self.raw("</INSTANCE>");
    }

    fn qualifier(&mut self, q: &Qualifier, propagated: bool) {
        self.raw("<QUALIFIER")
            .attr("NAME", &q.name)
            .raw(" TYPE=\"")
            .raw(q.cim_type().name())
            .raw("\"");
        if propagated {
            self.raw(" PROPAGATED=\"true\"");
        }
        self.raw(">");
        match &q.value {
            QualValue::Bool(b) => {
                self.raw(if *b {
                    "<VALUE>TRUE</VALUE>"
                } else {
                    "<VALUE>FALSE</VALUE>"
                });
            }
            QualValue::Str(s) => {
                self.raw("<VALUE>").text(s).raw("</VALUE>");
            }
            QualValue::Int(n) => {
                self.raw("<VALUE>").raw(&n.to_string()).raw("</VALUE>");
            }
            QualValue::StrArray(items) => {
                self.raw("<VALUE.ARRAY>");
                for s in items {
                    self.raw("<VALUE>").text(s).raw("</VALUE>");
                }
                self.raw("</VALUE.ARRAY>");
            }
        }
        self.raw("</QUALIFIER>");
    }

    /// Opens a property or parameter declaration: `<tag NAME=".."` with its REFERENCECLASS for
    /// references, its TYPE otherwise.
    fn open_declaration(&mut self, tag: &str, name: &str, ref_class: Option<&str>, ty: CimType) {
        self.raw("<").raw(tag).attr("NAME", name);
        match ref_class {
            Some(rc) => self.attr("REFERENCECLASS", rc),
            None => self.attr("TYPE", ty.name()),
        };
    }

    /// `CLASS` with the elements `shape` asks for.
    pub fn class(&mut self, class: &Class, shape: &Shape<'_>) {
        self.raw("<CLASS").attr("NAME", &class.name);
        if let Some(s) = &class.superclass {
            self.attr("SUPERCLASS", s);
        }
        self.raw(">");
        if shape.qualifiers {
            for q in &class.qualifiers {
                self.qualifier(q, false);
            }
        }
        for p in &class.properties {
            if (shape.local_only && p.propagated) || !shape.allows(&p.name) {
                continue;
            }
            let tag = match (p.ty, p.array) {
                (CimType::Reference, _) => "PROPERTY.REFERENCE",
                (_, true) => "PROPERTY.ARRAY",
                _ => "PROPERTY",
            };
            self.open_declaration(tag, &p.name, p.ref_class.as_deref(), p.ty);
            if crate::schema::qualifier_str(&p.qualifiers, "EmbeddedInstance").is_some() {
                self.raw(" EmbeddedObject=\"instance\"");
            }
            if shape.class_origin {
                self.attr("CLASSORIGIN", &p.class_origin);
            }
            if p.propagated {
                self.raw(" PROPAGATED=\"true\"");
            }
            self.raw(">");
            if shape.qualifiers {
                for q in p.qualifiers.iter() {
                    self.qualifier(q, p.propagated);
                }
            }
            match &p.default {
                Some(Value::Array(_, items)) => self.value_array(items),
                Some(v) => self.scalar_value(v),
                None => {}
            }
            self.raw("</").raw(tag).raw(">");
        }
        for m in &class.methods {
            if shape.local_only && m.propagated {
                continue;
            }
            self.raw("<METHOD")
                .attr("NAME", &m.name)
                .attr("TYPE", m.return_type.name());
            if shape.class_origin {
                self.attr("CLASSORIGIN", &m.class_origin);
            }
            if m.propagated {
                self.raw(" PROPAGATED=\"true\"");
            }
            self.raw(">");
            if shape.qualifiers {
                for q in m.qualifiers.iter() {
                    self.qualifier(q, m.propagated);
                }
            }
            for p in m.params.iter() {
                let tag = match (p.ty, p.array) {
                    (CimType::Reference, true) => "PARAMETER.REFARRAY",
                    (CimType::Reference, false) => "PARAMETER.REFERENCE",
                    (_, true) => "PARAMETER.ARRAY",
                    _ => "PARAMETER",
                };
                self.open_declaration(tag, &p.name, p.ref_class.as_deref(), p.ty);
                self.raw(">");
                // Parameter qualifiers (IN, OUT) are always written: clients need them to call.
                for q in &p.qualifiers {
                    self.qualifier(q, false);
                }
                self.raw("</").raw(tag).raw(">");
            }
            self.raw("</METHOD>");
        }
        self.raw("</CLASS>");
    }

    /// A typed value as a method's return value or output parameter.
    pub fn param_value(&mut self, name: Option<&str>, value: &Value, ns: &str) {
        let (open, close) = match name {
            Some(_) => ("<PARAMVALUE", "</PARAMVALUE>"),
            None => ("<RETURNVALUE", "</RETURNVALUE>"),
        };
        self.raw(open);
        if let Some(n) = name {
            self.attr("NAME", n);
        }
        self.raw(" PARAMTYPE=\"")
            .raw(value.cim_type().name())
            .raw("\"");
        let embedded = match value {
            Value::Embedded(_) => true,
            Value::Array(_, items) => items.iter().any(|v| matches!(v, Value::Embedded(_))),
            _ => false,
        };
        if embedded {
            self.raw(" EmbeddedObject=\"instance\"");
        }
        self.raw(">");
        match value {
            Value::Ref(p) => self.value_reference(p, ns),
            Value::Array(CimType::Reference, items) => {
                self.raw("<VALUE.REFARRAY>");
                for v in items {
                    if let Value::Ref(p) = v {
                        self.value_reference(p, ns);
                    }
                }
                self.raw("</VALUE.REFARRAY>");
            }
            Value::Array(_, items) => self.value_array(items),
            v => self.scalar_value(v),
        }
        self.raw(close);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        let mut b = Vec::new();
        escape_into(&mut b, "a<b>&\"c'\u{1}\n");
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "a&lt;b&gt;&amp;&quot;c&apos;\u{fffd}\n"
        );
    }

    #[test]
    fn instance_round_trips_through_the_reader() {
        let path = ObjectPath::new("root/cimv2", "LKS_X").key("Name", "a&b");
        let mut inst = Instance::new("LKS_X")
            .with("Name", "a&b")
            .with("EnabledState", 2u16)
            .with("Other", path.clone());
        inst.path = Some(path);
        let mut w = XmlWriter::new("h", 100);
        w.instance(&inst, &Shape::default(), None);
        let el = crate::xml::dom::parse(&w.buf).unwrap();
        let back = crate::xml::request::instance(&el).unwrap();
        assert_eq!(back.get_str("Name"), Some("a&b"));
        assert_eq!(back.get("EnabledState"), Some(&Value::from(2u16)));
        assert!(
            matches!(back.get("Other"), Some(Value::Ref(p)) if p.key_str("Name") == Some("a&b"))
        );
    }
}
