//! A small element tree read from XML in one linear pass with quick-xml, with limits: no
//! DOCTYPE (so no entity declarations, internal or external), only the predefined entities and
//! character references, a bounded depth and few attributes per element.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Deepest element nesting accepted; CIM-XML needs about 12 (embedded instances add some).
const MAX_DEPTH: usize = 64;
/// Most attributes on one element; CIM-XML elements have at most 6. Bounding this keeps the
/// attribute scan linear (no duplicate check over thousands of attributes).
const MAX_ATTRIBUTES: usize = 16;

/// Why a document was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XmlError {
    /// Not well-formed XML (or a construct we never process, such as a DOCTYPE).
    #[error("not well-formed XML: {0}")]
    NotWellFormed(String),
    /// Well-formed, but beyond a limit.
    #[error("{0}")]
    Limit(String),
}

/// An element with its attributes, text and children.
#[derive(Debug, Default, Clone)]
pub struct Element {
    /// The element name.
    pub name: String,
    /// Attributes in document order.
    pub attrs: Vec<(String, String)>,
    /// Child elements.
    pub children: Vec<Element>,
    /// The text directly inside it (all text nodes joined).
    pub text: String,
}

impl Element {
    /// An attribute's value.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first child with this name.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Children with this name.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

fn start_element(e: &BytesStart<'_>) -> Result<Element, XmlError> {
    let name = String::from_utf8(e.name().as_ref().to_vec())
        .map_err(|_| XmlError::NotWellFormed("element name is not UTF-8".into()))?;
    let mut el = Element {
        name,
        ..Element::default()
    };
    let mut attrs = e.attributes();
    attrs.with_checks(false);
    for attr in attrs {
        if el.attrs.len() == MAX_ATTRIBUTES {
            return Err(XmlError::Limit(format!(
                "element {} has more than {MAX_ATTRIBUTES} attributes",
                el.name
            )));
        }
        let attr = attr.map_err(|e| XmlError::NotWellFormed(e.to_string()))?;
        let key = String::from_utf8(attr.key.as_ref().to_vec())
            .map_err(|_| XmlError::NotWellFormed("attribute name is not UTF-8".into()))?;
        let value = attr
            .unescape_value()
            .map_err(|e| XmlError::NotWellFormed(e.to_string()))?
            .into_owned();
        el.attrs.push((key, value));
    }
    Ok(el)
}

/// Parses a whole document into its root element.
pub fn parse(input: &[u8]) -> Result<Element, XmlError> {
    let mut reader = Reader::from_reader(input);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let event = reader.read_event().map_err(|e| {
            XmlError::NotWellFormed(format!("at byte {}: {e}", reader.buffer_position()))
        })?;
        match event {
            Event::Start(e) => {
                if stack.len() == MAX_DEPTH {
                    return Err(XmlError::Limit(format!(
                        "elements nested more than {MAX_DEPTH} deep"
                    )));
                }
                if root.is_some() {
                    return Err(XmlError::NotWellFormed(
                        "content after the root element".into(),
                    ));
                }
                stack.push(start_element(&e)?);
            }
            Event::Empty(e) => {
                let el = start_element(&e)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None if root.is_none() => root = Some(el),
                    None => {
                        return Err(XmlError::NotWellFormed(
                            "content after the root element".into(),
                        ))
                    }
                }
            }
            Event::End(_) => {
                // check_end_names guarantees a matching start.
                let Some(el) = stack.pop() else {
                    return Err(XmlError::NotWellFormed("unmatched end tag".into()));
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                let text = t
                    .unescape()
                    .map_err(|e| XmlError::NotWellFormed(e.to_string()))?;
                match stack.last_mut() {
                    Some(el) => el.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => {
                        return Err(XmlError::NotWellFormed(
                            "text outside the root element".into(),
                        ))
                    }
                }
            }
            Event::CData(c) => {
                let text = std::str::from_utf8(&c)
                    .map_err(|_| XmlError::NotWellFormed("CDATA is not UTF-8".into()))?;
                match stack.last_mut() {
                    Some(el) => el.text.push_str(text),
                    None => {
                        return Err(XmlError::NotWellFormed(
                            "CDATA outside the root element".into(),
                        ))
                    }
                }
            }
            Event::DocType(_) => {
                return Err(XmlError::NotWellFormed(
                    "a DOCTYPE is not allowed (no DTDs or entity declarations are processed)"
                        .into(),
                ))
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::NotWellFormed(
            "document ends inside an element".into(),
        ));
    }
    root.ok_or_else(|| XmlError::NotWellFormed("no root element".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_text_and_attributes() {
        let doc =
            parse(b"<?xml version=\"1.0\"?><A x=\"1&amp;2\"><B>t&lt;&#65;</B><C/></A>").unwrap();
        assert_eq!(doc.attr("x"), Some("1&2"));
        assert_eq!(doc.child("B").unwrap().text, "t<A");
        assert!(doc.child("C").is_some());
    }

    #[test]
    fn refusals() {
        let doctype = b"<?xml version=\"1.0\"?><!DOCTYPE a [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><a>&x;</a>";
        assert!(matches!(parse(doctype), Err(XmlError::NotWellFormed(_))));
        assert!(matches!(
            parse(b"<a>&x;</a>"),
            Err(XmlError::NotWellFormed(_))
        ));
        assert!(matches!(
            parse(b"<a><b></a>"),
            Err(XmlError::NotWellFormed(_))
        ));
        assert!(matches!(
            parse(b"<a></a><b/>"),
            Err(XmlError::NotWellFormed(_))
        ));
        assert!(matches!(parse(b"<a>"), Err(XmlError::NotWellFormed(_))));
        assert!(matches!(parse(b""), Err(XmlError::NotWellFormed(_))));
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(matches!(parse(deep.as_bytes()), Err(XmlError::Limit(_))));
        let many = format!(
            "<a {}/>",
            (0..100).map(|i| format!("k{i}=\"\"")).collect::<String>()
        );
        assert!(matches!(parse(many.as_bytes()), Err(XmlError::Limit(_))));
    }

    #[test]
    fn large_inputs_stay_linear() {
        // 8 MB of text and a 4 MB attribute parse quickly.
        let big = format!(
            "<a n=\"{}\">{}</a>",
            "x".repeat(4 << 20),
            "y&amp;".repeat(1 << 20)
        );
        let start = std::time::Instant::now();
        let doc = parse(big.as_bytes()).unwrap();
        assert_eq!(doc.text.len(), 2 << 20);
        assert!(start.elapsed().as_secs() < 5);
    }
}
