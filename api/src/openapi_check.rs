//! Checks of HTTP replies against `api/openapi.yaml`: the document's operations and statuses,
//! and whether a reply fits the documented media type, headers and JSON schema (OpenAPI 3.1
//! schemas are JSON Schema 2020-12, checked with the `jsonschema` crate). Used by the api
//! crate's conformance test and, through the `openapi-check` feature, by the guest tests that
//! drive a real host with curl.

use std::collections::BTreeSet;

use serde_json::Value;

/// The parts of an HTTP reply the check looks at.
pub trait Reply {
    /// The status code.
    fn status(&self) -> u16;
    /// A header's value, by case-insensitive name.
    fn header(&self, name: &str) -> Option<&str>;
    /// The body.
    fn body(&self) -> &[u8];
}

/// The document, as checked in.
const DOCUMENT: &str = include_str!("../openapi.yaml");

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

/// An operation: upper-case method and path template.
pub type Operation = (String, String);

pub fn document() -> Value {
    serde_norway::from_str(DOCUMENT).expect("api/openapi.yaml is valid YAML")
}

/// Every operation the document describes.
pub fn documented_operations(doc: &Value) -> BTreeSet<Operation> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

/// Follows `$ref`s within the document.
pub fn resolve<'a>(doc: &'a Value, mut value: &'a Value) -> &'a Value {
    while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local references: {reference}"));
        value = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{reference} does not resolve"));
    }
    value
}

/// Every documented (operation, status).
pub fn documented_responses(doc: &Value) -> BTreeSet<(String, String, u16)> {
    let mut all = BTreeSet::new();
    for (method, path) in documented_operations(doc) {
        let op = &doc["paths"][&path][method.to_lowercase()];
        for status in op["responses"].as_object().expect("responses").keys() {
            let code = status
                .parse()
                .unwrap_or_else(|_| panic!("status {status} of {method} {path}"));
            all.insert((method.clone(), path.clone(), code));
        }
    }
    all
}

/// Checks `instance` against a schema of the document.
pub fn validate(doc: &Value, schema: &Value, instance: &Value) -> Result<(), String> {
    let mut root = schema.clone();
    let object = root.as_object_mut().ok_or("a schema must be an object")?;
    // Local references (#/components/...) resolve against the root, so carry the components.
    object.insert("components".into(), doc["components"].clone());
    let validator = jsonschema::draft202012::new(&root).map_err(|e| format!("bad schema: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{e} (at {})", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Checks one reply of `method template` against the document: its status is documented, its
/// content type is the documented one, its documented headers are there, and its body fits the
/// schema (or is empty when none is documented).
pub fn check_reply(
    doc: &Value,
    method: &str,
    template: &str,
    reply: &impl Reply,
) -> Result<(), String> {
    let op = doc["paths"]
        .get(template)
        .and_then(|item| item.get(method.to_lowercase()))
        .ok_or_else(|| format!("{method} {template} is not documented"))?;
    let response = op["responses"]
        .get(reply.status().to_string())
        .map(|r| resolve(doc, r))
        .ok_or_else(|| {
            format!(
                "{method} {template}: status {} is not documented",
                reply.status()
            )
        })?;
    if let Some(headers) = response.get("headers").and_then(Value::as_object) {
        for name in headers.keys() {
            if reply.header(name).is_none() {
                return Err(format!(
                    "{method} {template} {}: no {name} header",
                    reply.status()
                ));
            }
        }
    }
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        return if reply.body().is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{method} {template} {}: a body where none is documented",
                reply.status()
            ))
        };
    };
    let normalise = |t: &str| t.replace(' ', "").to_ascii_lowercase();
    let got_type = reply
        .header("content-type")
        .map(normalise)
        .unwrap_or_default();
    let (media_type, media) = content
        .iter()
        .find(|(t, _)| normalise(t) == got_type)
        .ok_or_else(|| {
            format!(
                "{method} {template} {}: content type {got_type:?} is not documented",
                reply.status()
            )
        })?;
    let schema = resolve(doc, &media["schema"]);
    if media_type.starts_with("application/json") {
        let body: Value = serde_json::from_slice(reply.body()).map_err(|e| {
            format!(
                "{method} {template} {}: body is not JSON: {e}",
                reply.status()
            )
        })?;
        validate(doc, &media["schema"], &body)
            .map_err(|e| format!("{method} {template} {}: {e}; body {body}", reply.status()))
    } else if schema["type"] == "string" {
        std::str::from_utf8(reply.body()).map(|_| ()).map_err(|e| {
            format!(
                "{method} {template} {}: body is not text: {e}",
                reply.status()
            )
        })
    } else {
        Err(format!(
            "{method} {template}: cannot check a {media_type} body"
        ))
    }
}

/// Every `$ref` in the document, with where it is.
pub fn references(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                if key == "$ref" {
                    if let Some(r) = v.as_str() {
                        out.push((at.to_string(), r.to_string()));
                    }
                } else {
                    references(v, &format!("{at}/{key}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                references(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}
