//! Reads a CIM-XML operation request (DSP0201 `SIMPLEREQ`) into a [`Request`]: the intrinsic
//! or extrinsic method called, its namespace or target, and its parameters.

use std::borrow::Cow;

use super::dom::{self, Element, XmlError};
use crate::error::{CimFault, CimStatus};
use crate::value::{CimType, Instance, KeyBinding, ObjectPath, Value};

/// The longest class, property, method or namespace name accepted. Longer names are refused
/// with CIM_ERR_INVALID_PARAMETER before any lookup.
pub const MAX_NAME_LEN: usize = 1024;

/// A parsed operation request.
#[derive(Debug)]
pub struct Request {
    /// The MESSAGE ID, echoed in the response.
    pub message_id: String,
    /// What is called.
    pub call: Call,
}

/// An intrinsic (GetInstance, EnumerateInstances, ...) or extrinsic (InvokeMethod) call.
#[derive(Debug)]
pub enum Call {
    /// `IMETHODCALL`
    Intrinsic {
        /// Operation name.
        name: String,
        /// Target namespace.
        namespace: String,
        /// Parameters by name.
        params: Vec<(String, Param)>,
    },
    /// `METHODCALL`
    Method {
        /// Method name.
        name: String,
        /// Namespace of the target.
        namespace: String,
        /// The instance, or the class for a static call.
        target: Target,
        /// Parameters by name.
        params: Vec<(String, Param)>,
    },
}

impl Call {
    /// The method name, for the response.
    pub fn name(&self) -> &str {
        match self {
            Call::Intrinsic { name, .. } | Call::Method { name, .. } => name,
        }
    }
}

/// The target of an extrinsic method call.
#[derive(Debug, Clone)]
pub enum Target {
    /// An instance.
    Instance(ObjectPath),
    /// A class (static methods).
    Class(String),
}

/// An `IPARAMVALUE` or `PARAMVALUE`.
#[derive(Debug, Clone)]
pub enum Param {
    /// No value (NULL).
    Null,
    /// A value: untyped text as `Value::Str`, typed when the request gave a `PARAMTYPE`.
    Value(Value),
    /// A `CLASSNAME`.
    ClassName(String),
    /// An `INSTANCENAME` (or instance path).
    InstanceName(ObjectPath),
    /// An `INSTANCE`.
    Instance(Instance),
    /// A `VALUE.NAMEDINSTANCE`.
    NamedInstance(ObjectPath, Instance),
}

/// Why a request could not be read.
#[derive(Debug)]
pub enum RequestError {
    /// The body is not well-formed XML (HTTP 400, `CIMError: request-not-well-formed`).
    NotWellFormed(String),
    /// Well-formed but not a valid CIM-XML request (HTTP 400, `CIMError: request-not-valid`).
    NotValid(String),
    /// A `MULTIREQ` (HTTP 501, `CIMError: multiple-requests-unsupported`).
    MultipleRequests,
    /// A valid request whose parameters are refused: answered with a CIM error.
    Cim {
        /// MESSAGE ID.
        message_id: String,
        /// The method called.
        method: String,
        /// Whether it was intrinsic.
        intrinsic: bool,
        /// The error.
        fault: CimFault,
    },
}

fn invalid(msg: impl Into<String>) -> RequestError {
    RequestError::NotValid(msg.into())
}

fn check_name(what: &str, name: &str) -> Result<(), CimFault> {
    if name.len() > MAX_NAME_LEN {
        return Err(CimFault::new(
            CimStatus::InvalidParameter,
            format!(
                "the {what} is {} bytes long; at most {MAX_NAME_LEN} are accepted",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// Parses a request body.
pub fn parse_request(body: &[u8]) -> Result<Request, RequestError> {
    let root = dom::parse(body).map_err(|e| match e {
        XmlError::NotWellFormed(m) => RequestError::NotWellFormed(m),
        XmlError::Limit(m) => RequestError::NotValid(m),
    })?;
    if root.name != "CIM" {
        return Err(invalid(format!(
            "the root element is {}, not CIM",
            root.name
        )));
    }
    let message = root
        .child("MESSAGE")
        .ok_or_else(|| invalid("no MESSAGE element"))?;
    let message_id = message.attr("ID").unwrap_or("").to_string();
    if message.child("MULTIREQ").is_some() {
        return Err(RequestError::MultipleRequests);
    }
    let simple = message
        .child("SIMPLEREQ")
        .ok_or_else(|| invalid("no SIMPLEREQ element"))?;
    if let Some(call) = simple.child("IMETHODCALL") {
        let name = call
            .attr("NAME")
            .ok_or_else(|| invalid("IMETHODCALL without NAME"))?;
        let site = CallSite {
            message_id: &message_id,
            method: name,
            intrinsic: true,
        };
        check_name("method name", name).map_err(|f| site.fault(f))?;
        let ns_el = call
            .child("LOCALNAMESPACEPATH")
            .ok_or_else(|| invalid("IMETHODCALL without LOCALNAMESPACEPATH"))?;
        let namespace = local_namespace(ns_el)?;
        check_name("namespace", &namespace).map_err(|f| site.fault(f))?;
        let params = site.params(call, "IPARAMVALUE", iparam_value)?;
        return Ok(Request {
            message_id,
            call: Call::Intrinsic {
                name: name.to_string(),
                namespace,
                params,
            },
        });
    }
    if let Some(call) = simple.child("METHODCALL") {
        let name = call
            .attr("NAME")
            .ok_or_else(|| invalid("METHODCALL without NAME"))?;
        let site = CallSite {
            message_id: &message_id,
            method: name,
            intrinsic: false,
        };
        check_name("method name", name).map_err(|f| site.fault(f))?;
        let (namespace, target) = if let Some(p) = call.child("LOCALINSTANCEPATH") {
            let ns = local_namespace(
                p.child("LOCALNAMESPACEPATH")
                    .ok_or_else(|| invalid("LOCALINSTANCEPATH without LOCALNAMESPACEPATH"))?,
            )?;
            let path = instance_name(
                p.child("INSTANCENAME")
                    .ok_or_else(|| invalid("LOCALINSTANCEPATH without INSTANCENAME"))?,
                &ns,
            )
            .map_err(|e| site.value_error(e))?;
            (ns, Target::Instance(path))
        } else if let Some(p) = call.child("LOCALCLASSPATH") {
            let ns = local_namespace(
                p.child("LOCALNAMESPACEPATH")
                    .ok_or_else(|| invalid("LOCALCLASSPATH without LOCALNAMESPACEPATH"))?,
            )?;
            let class = p
                .child("CLASSNAME")
                .and_then(|c| c.attr("NAME"))
                .ok_or_else(|| invalid("LOCALCLASSPATH without CLASSNAME"))?;
            (ns, Target::Class(class.to_string()))
        } else {
            return Err(invalid(
                "METHODCALL without LOCALINSTANCEPATH or LOCALCLASSPATH",
            ));
        };
        check_name("namespace", &namespace).map_err(|f| site.fault(f))?;
        let params = site.params(call, "PARAMVALUE", param_value)?;
        return Ok(Request {
            message_id,
            call: Call::Method {
                name: name.to_string(),
                namespace,
                target,
                params,
            },
        });
    }
    Err(invalid(
        "SIMPLEREQ holds neither IMETHODCALL nor METHODCALL",
    ))
}

/// The call being read, which CIM errors about its parameters answer.
struct CallSite<'a> {
    message_id: &'a str,
    method: &'a str,
    intrinsic: bool,
}

impl CallSite<'_> {
    /// A CIM error answered to this call.
    fn fault(&self, fault: CimFault) -> RequestError {
        RequestError::Cim {
            message_id: self.message_id.to_string(),
            method: self.method.chars().take(64).collect(),
            intrinsic: self.intrinsic,
            fault,
        }
    }

    /// A value problem: invalid CIM-XML, or a CIM error answered to this call.
    fn value_error(&self, e: ValueError) -> RequestError {
        match e {
            ValueError::Invalid(m) => invalid(m),
            ValueError::Cim(f) => self.fault(f),
        }
    }

    /// The call's `tag` children (IPARAMVALUE or PARAMVALUE), each read by `read`.
    fn params(
        &self,
        call: &Element,
        tag: &str,
        read: fn(&Element) -> Result<Param, ValueError>,
    ) -> Result<Vec<(String, Param)>, RequestError> {
        let mut params = Vec::new();
        for p in call.children_named(tag) {
            let name = p
                .attr("NAME")
                .ok_or_else(|| invalid(format!("{tag} without NAME")))?;
            check_name("parameter name", name).map_err(|f| self.fault(f))?;
            let value = read(p).map_err(|e| self.value_error(e))?;
            params.push((name.to_string(), value));
        }
        Ok(params)
    }
}

/// A value-level problem: invalid CIM-XML, or a CIM error for the client.
#[derive(Debug)]
pub enum ValueError {
    /// The XML does not follow DSP0201.
    Invalid(String),
    /// A CIM error (a name too long, a value of the wrong type).
    Cim(CimFault),
}

impl From<CimFault> for ValueError {
    fn from(f: CimFault) -> Self {
        ValueError::Cim(f)
    }
}

fn bad(msg: impl Into<String>) -> ValueError {
    ValueError::Invalid(msg.into())
}

/// `<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="cimv2"/>` to `root/cimv2`.
pub fn local_namespace(el: &Element) -> Result<String, RequestError> {
    let mut ns = String::new();
    for part in el.children_named("NAMESPACE") {
        let name = part
            .attr("NAME")
            .ok_or_else(|| invalid("NAMESPACE without NAME"))?;
        if !ns.is_empty() {
            ns.push('/');
        }
        ns.push_str(name.trim_matches('/'));
    }
    if ns.is_empty() {
        return Err(invalid("empty LOCALNAMESPACEPATH"));
    }
    Ok(ns)
}

fn iparam_value(p: &Element) -> Result<Param, ValueError> {
    let Some(child) = p.children.first() else {
        return Ok(Param::Null);
    };
    Ok(match child.name.as_str() {
        "VALUE" => Param::Value(Value::from(child.text.clone())),
        "VALUE.ARRAY" => Param::Value(Value::Array(
            CimType::String,
            child
                .children_named("VALUE")
                .map(|v| Value::from(v.text.clone()))
                .collect(),
        )),
        "VALUE.REFERENCE" => Param::Value(Value::Ref(Box::new(reference(child, "")?))),
        "CLASSNAME" => {
            let name = child
                .attr("NAME")
                .ok_or_else(|| bad("CLASSNAME without NAME"))?;
            check_name("class name", name)?;
            Param::ClassName(name.to_string())
        }
        "INSTANCENAME" => Param::InstanceName(instance_name(child, "")?),
        "INSTANCE" => Param::Instance(instance(child)?),
        "VALUE.NAMEDINSTANCE" => {
            let name = instance_name(
                child
                    .child("INSTANCENAME")
                    .ok_or_else(|| bad("VALUE.NAMEDINSTANCE without INSTANCENAME"))?,
                "",
            )?;
            let inst = instance(
                child
                    .child("INSTANCE")
                    .ok_or_else(|| bad("VALUE.NAMEDINSTANCE without INSTANCE"))?,
            )?;
            Param::NamedInstance(name, inst)
        }
        other => {
            return Err(ValueError::Cim(CimFault::new(
                CimStatus::NotSupported,
                format!("{other} parameters are not supported"),
            )))
        }
    })
}

fn param_value(p: &Element) -> Result<Param, ValueError> {
    let ty = match p.attr("PARAMTYPE") {
        Some(t) => Some(CimType::parse(t).ok_or_else(|| bad(format!("unknown PARAMTYPE {t}")))?),
        None => None,
    };
    let embedded = p
        .attr("EmbeddedObject")
        .or_else(|| p.attr("EMBEDDEDOBJECT"))
        .is_some();
    let Some(child) = p.children.first() else {
        return Ok(Param::Null);
    };
    let scalar = |text: &str| -> Result<Value, ValueError> {
        if embedded {
            return Ok(Value::Embedded(Box::new(embedded_instance(text)?)));
        }
        match ty {
            Some(t) if t != CimType::Reference => Value::parse_scalar(t, text).ok_or_else(|| {
                ValueError::Cim(CimFault::new(
                    CimStatus::InvalidParameter,
                    format!(
                        "parameter {}: {:?} is not a {}",
                        p.attr("NAME").unwrap_or(""),
                        short(text),
                        t.name()
                    ),
                ))
            }),
            _ => Ok(Value::from(text.to_string())),
        }
    };
    Ok(match child.name.as_str() {
        "VALUE" => Param::Value(scalar(&child.text)?),
        "VALUE.ARRAY" => {
            let items: Result<Vec<Value>, ValueError> = child
                .children_named("VALUE")
                .map(|v| scalar(&v.text))
                .collect();
            Param::Value(Value::Array(ty.unwrap_or(CimType::String), items?))
        }
        "VALUE.REFERENCE" => Param::Value(Value::Ref(Box::new(reference(child, "")?))),
        "VALUE.REFARRAY" => Param::Value(Value::Array(
            CimType::Reference,
            child
                .children_named("VALUE.REFERENCE")
                .map(|r| reference(r, "").map(|p| Value::Ref(Box::new(p))))
                .collect::<Result<_, _>>()?,
        )),
        "INSTANCE" => Param::Value(Value::Embedded(Box::new(instance(child)?))),
        "CLASSNAME" => Param::ClassName(child.attr("NAME").unwrap_or("").to_string()),
        other => return Err(bad(format!("{other} is not a parameter value"))),
    })
}

fn short(text: &str) -> String {
    text.chars().take(40).collect()
}

/// Parses the text of an embedded instance (`<INSTANCE ...>` as a string value).
pub fn embedded_instance(text: &str) -> Result<Instance, ValueError> {
    let el = dom::parse(text.as_bytes()).map_err(|e| {
        ValueError::Cim(CimFault::new(
            CimStatus::InvalidParameter,
            format!("an embedded instance is not valid XML: {e}"),
        ))
    })?;
    if el.name != "INSTANCE" {
        return Err(ValueError::Cim(CimFault::new(
            CimStatus::InvalidParameter,
            format!("an embedded object is a {}, not an INSTANCE", el.name),
        )));
    }
    instance(&el)
}

/// `VALUE.REFERENCE` to a path; `namespace` is used when the reference has none.
pub fn reference(el: &Element, namespace: &str) -> Result<ObjectPath, ValueError> {
    let inner = el
        .children
        .first()
        .ok_or_else(|| bad("empty VALUE.REFERENCE"))?;
    match inner.name.as_str() {
        "INSTANCENAME" => instance_name(inner, namespace),
        "LOCALINSTANCEPATH" => {
            let ns = local_namespace(
                inner
                    .child("LOCALNAMESPACEPATH")
                    .ok_or_else(|| bad("LOCALINSTANCEPATH without LOCALNAMESPACEPATH"))?,
            )
            .map_err(|_| bad("bad LOCALNAMESPACEPATH"))?;
            instance_name(
                inner
                    .child("INSTANCENAME")
                    .ok_or_else(|| bad("LOCALINSTANCEPATH without INSTANCENAME"))?,
                &ns,
            )
        }
        "INSTANCEPATH" => {
            let ns_el = inner
                .child("NAMESPACEPATH")
                .and_then(|n| n.child("LOCALNAMESPACEPATH"))
                .ok_or_else(|| bad("INSTANCEPATH without NAMESPACEPATH"))?;
            let ns = local_namespace(ns_el).map_err(|_| bad("bad LOCALNAMESPACEPATH"))?;
            instance_name(
                inner
                    .child("INSTANCENAME")
                    .ok_or_else(|| bad("INSTANCEPATH without INSTANCENAME"))?,
                &ns,
            )
        }
        "CLASSNAME" | "LOCALCLASSPATH" | "CLASSPATH" => Err(ValueError::Cim(CimFault::new(
            CimStatus::NotSupported,
            "class references are not supported here",
        ))),
        other => Err(bad(format!("{other} in VALUE.REFERENCE"))),
    }
}

/// `INSTANCENAME` to a path in `namespace`.
pub fn instance_name(el: &Element, namespace: &str) -> Result<ObjectPath, ValueError> {
    let class = el
        .attr("CLASSNAME")
        .ok_or_else(|| bad("INSTANCENAME without CLASSNAME"))?;
    check_name("class name", class)?;
    let mut path = ObjectPath::new(namespace.to_string(), class.to_string());
    for kb in el.children_named("KEYBINDING") {
        let name = kb
            .attr("NAME")
            .ok_or_else(|| bad("KEYBINDING without NAME"))?;
        check_name("key name", name)?;
        let kv = kb.children.first().ok_or_else(|| bad("empty KEYBINDING"))?;
        let value = match kv.name.as_str() {
            "KEYVALUE" => key_value(kv),
            "VALUE.REFERENCE" => Value::Ref(Box::new(reference(kv, namespace)?)),
            other => return Err(bad(format!("{other} in KEYBINDING"))),
        };
        path.keys.push(KeyBinding {
            name: Cow::Owned(name.to_string()),
            value,
        });
    }
    Ok(path)
}

fn key_value(kv: &Element) -> Value {
    let text = kv.text.as_str();
    let typed = kv
        .attr("TYPE")
        .and_then(CimType::parse)
        .and_then(|t| Value::parse_scalar(t, text));
    if let Some(v) = typed {
        return v;
    }
    match kv.attr("VALUETYPE").unwrap_or("string") {
        "boolean" => {
            Value::parse_scalar(CimType::Boolean, text).unwrap_or_else(|| Value::from(text))
        }
        "numeric" => Value::parse_scalar(CimType::SInt64, text)
            .or_else(|| Value::parse_scalar(CimType::UInt64, text))
            .or_else(|| Value::parse_scalar(CimType::Real64, text))
            .unwrap_or_else(|| Value::from(text)),
        _ => Value::from(text.to_string()),
    }
}

/// `INSTANCE` to an instance (untyped values stay strings until checked against the class).
pub fn instance(el: &Element) -> Result<Instance, ValueError> {
    let class = el
        .attr("CLASSNAME")
        .ok_or_else(|| bad("INSTANCE without CLASSNAME"))?;
    check_name("class name", class)?;
    let mut inst = Instance::new(class.to_string());
    for prop in &el.children {
        let name = match prop.name.as_str() {
            "PROPERTY" | "PROPERTY.ARRAY" | "PROPERTY.REFERENCE" => prop
                .attr("NAME")
                .ok_or_else(|| bad("PROPERTY without NAME"))?,
            _ => continue,
        };
        check_name("property name", name)?;
        let ty = prop.attr("TYPE").and_then(CimType::parse);
        let embedded = prop
            .attr("EmbeddedObject")
            .or_else(|| prop.attr("EMBEDDEDOBJECT"))
            .is_some();
        let scalar = |text: &str| -> Result<Value, ValueError> {
            if embedded {
                return Ok(Value::Embedded(Box::new(embedded_instance(text)?)));
            }
            Ok(match ty {
                Some(t) => Value::parse_scalar(t, text).ok_or_else(|| {
                    ValueError::Cim(CimFault::new(
                        CimStatus::TypeMismatch,
                        format!("property {name}: {:?} is not a {}", short(text), t.name()),
                    ))
                })?,
                None => Value::from(text.to_string()),
            })
        };
        let value = match prop.name.as_str() {
            "PROPERTY" => match prop.child("VALUE") {
                Some(v) => scalar(&v.text)?,
                None => continue,
            },
            "PROPERTY.ARRAY" => match prop.child("VALUE.ARRAY") {
                Some(arr) => Value::Array(
                    ty.unwrap_or(CimType::String),
                    arr.children_named("VALUE")
                        .map(|v| scalar(&v.text))
                        .collect::<Result<_, _>>()?,
                ),
                None => continue,
            },
            _ => match prop.child("VALUE.REFERENCE") {
                Some(r) => Value::Ref(Box::new(reference(r, "")?)),
                None => continue,
            },
        };
        inst.props.push((Cow::Owned(name.to_string()), value));
    }
    Ok(inst)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENUM: &str = r#"<?xml version="1.0" encoding="utf-8" ?>
<CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1001" PROTOCOLVERSION="1.0"><SIMPLEREQ>
<IMETHODCALL NAME="EnumerateInstances"><LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="cimv2"/></LOCALNAMESPACEPATH>
<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="CIM_ComputerSystem"/></IPARAMVALUE>
<IPARAMVALUE NAME="PropertyList"><VALUE.ARRAY><VALUE>Name</VALUE></VALUE.ARRAY></IPARAMVALUE>
</IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>"#;

    #[test]
    fn intrinsic_call() {
        let r = parse_request(ENUM.as_bytes()).unwrap();
        assert_eq!(r.message_id, "1001");
        let Call::Intrinsic {
            name,
            namespace,
            params,
        } = r.call
        else {
            panic!()
        };
        assert_eq!(name, "EnumerateInstances");
        assert_eq!(namespace, "root/cimv2");
        assert!(matches!(&params[0].1, Param::ClassName(c) if c == "CIM_ComputerSystem"));
        assert!(matches!(&params[1].1, Param::Value(Value::Array(_, v)) if v.len() == 1));
    }

    #[test]
    fn method_call_with_embedded_instance() {
        let body = r#"<CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="7" PROTOCOLVERSION="1.0"><SIMPLEREQ>
<METHODCALL NAME="DefineSystem"><LOCALINSTANCEPATH><LOCALNAMESPACEPATH><NAMESPACE NAME="root/cimv2"/></LOCALNAMESPACEPATH>
<INSTANCENAME CLASSNAME="LKS_VirtualSystemManagementService"><KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string">vsms</KEYVALUE></KEYBINDING></INSTANCENAME></LOCALINSTANCEPATH>
<PARAMVALUE NAME="SystemSettings" PARAMTYPE="string" EmbeddedObject="instance"><VALUE>&lt;INSTANCE CLASSNAME="LKS_VirtualSystemSettingData"&gt;&lt;PROPERTY NAME="ElementName" TYPE="string"&gt;&lt;VALUE&gt;vm1&lt;/VALUE&gt;&lt;/PROPERTY&gt;&lt;/INSTANCE&gt;</VALUE></PARAMVALUE>
<PARAMVALUE NAME="N" PARAMTYPE="uint16"><VALUE>3</VALUE></PARAMVALUE>
</METHODCALL></SIMPLEREQ></MESSAGE></CIM>"#;
        let r = parse_request(body.as_bytes()).unwrap();
        let Call::Method { target, params, .. } = r.call else {
            panic!()
        };
        let Target::Instance(p) = target else {
            panic!()
        };
        assert_eq!(p.key_str("Name"), Some("vsms"));
        let Param::Value(Value::Embedded(inst)) = &params[0].1 else {
            panic!()
        };
        assert_eq!(inst.get_str("ElementName"), Some("vm1"));
        assert!(matches!(
            params[1].1,
            Param::Value(Value::UInt(3, CimType::UInt16))
        ));
    }

    #[test]
    fn long_names_are_cim_errors() {
        let body = ENUM.replace("CIM_ComputerSystem", &"X".repeat(1 << 20));
        match parse_request(body.as_bytes()) {
            Err(RequestError::Cim { fault, .. }) => {
                assert_eq!(fault.status, CimStatus::InvalidParameter)
            }
            other => panic!("{other:?}"),
        }
    }
}
