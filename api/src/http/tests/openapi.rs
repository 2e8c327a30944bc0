//! The router compared with `api/openapi.yaml` (the reply checks live in
//! `crate::openapi_check`).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::http::control_api::ROUTES;
pub(super) use crate::openapi_check::{
    check_reply, document, documented_operations, documented_responses, references, validate,
    Operation,
};

/// Every operation the router serves.
pub(super) fn routed_operations() -> BTreeSet<Operation> {
    ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.template.to_string()))
        .collect()
}

/// What the router and the document disagree on, one message per difference.
pub(super) fn route_mismatches(doc: &Value) -> Vec<String> {
    let documented = documented_operations(doc);
    let routed = routed_operations();
    let mut problems: Vec<String> = routed
        .difference(&documented)
        .map(|(m, p)| format!("{m} {p} is served but not documented"))
        .collect();
    problems.extend(
        documented
            .difference(&routed)
            .map(|(m, p)| format!("{m} {p} is documented but not served")),
    );
    problems
}
