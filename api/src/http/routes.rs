//! Route tables: a method and a path template (`/v1/vms/{name}`) per operation. The table is the
//! one list of what an API serves; requests are matched against it, and the OpenAPI test
//! compares it with the document.

use hyper::Method;

/// One route: `method` on paths matching `template`, served by `op`.
#[derive(Debug, Clone)]
pub(crate) struct Route<Op> {
    /// The HTTP method.
    pub method: Method,
    /// The path, with `{param}` segments matching any one non-empty segment.
    pub template: &'static str,
    /// What the API does for it.
    pub op: Op,
}

impl<Op> Route<Op> {
    /// A route, for the `const` route tables.
    pub(crate) const fn new(method: Method, template: &'static str, op: Op) -> Route<Op> {
        Route {
            method,
            template,
            op,
        }
    }
}

/// What a request's method and path matched.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RouteMatch<'p, Op> {
    /// A route: the operation and the path parameters in template order.
    Found(Op, Vec<&'p str>),
    /// The path exists, but not with this method; these methods would do.
    WrongMethod(Vec<Method>),
    /// No route has this path.
    NotFound,
}

fn segments(path: &str) -> Vec<&str> {
    match path.strip_prefix('/') {
        Some("") => Vec::new(),
        Some(rest) => rest.split('/').collect(),
        None => vec![path],
    }
}

/// The path parameters if `path` fits `template`.
fn fit<'p>(template: &str, path: &'p str) -> Option<Vec<&'p str>> {
    let wanted = segments(template);
    let given = segments(path);
    if wanted.len() != given.len() {
        return None;
    }
    let mut params = Vec::new();
    for (w, g) in wanted.iter().zip(&given) {
        if w.starts_with('{') && w.ends_with('}') {
            if g.is_empty() {
                return None;
            }
            params.push(*g);
        } else if w != g {
            return None;
        }
    }
    Some(params)
}

/// Finds the route for `method` and `path` in `table`.
pub(crate) fn find<'p, Op: Clone>(
    table: &[Route<Op>],
    method: &Method,
    path: &'p str,
) -> RouteMatch<'p, Op> {
    let mut allowed = Vec::new();
    for route in table {
        if let Some(params) = fit(route.template, path) {
            if route.method == *method {
                return RouteMatch::Found(route.op.clone(), params);
            }
            if !allowed.contains(&route.method) {
                allowed.push(route.method.clone());
            }
        }
    }
    if allowed.is_empty() {
        RouteMatch::NotFound
    } else {
        RouteMatch::WrongMethod(allowed)
    }
}

/// The value of an `Allow` header.
pub(crate) fn allow_header(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<Route<u8>> {
        vec![
            Route {
                method: Method::GET,
                template: "/",
                op: 0,
            },
            Route {
                method: Method::GET,
                template: "/v1/vms/{name}",
                op: 1,
            },
            Route {
                method: Method::DELETE,
                template: "/v1/vms/{name}",
                op: 2,
            },
            Route {
                method: Method::POST,
                template: "/v1/vms/{name}/start",
                op: 3,
            },
        ]
    }

    #[test]
    fn matches_templates() {
        let t = table();
        assert_eq!(find(&t, &Method::GET, "/"), RouteMatch::Found(0, vec![]));
        assert_eq!(
            find(&t, &Method::DELETE, "/v1/vms/a"),
            RouteMatch::Found(2, vec!["a"])
        );
        assert_eq!(
            find(&t, &Method::POST, "/v1/vms/a/start"),
            RouteMatch::Found(3, vec!["a"])
        );
    }

    #[test]
    fn wrong_method_lists_the_allowed_ones() {
        let t = table();
        let m = find(&t, &Method::PUT, "/v1/vms/a");
        assert_eq!(
            m,
            RouteMatch::WrongMethod(vec![Method::GET, Method::DELETE])
        );
        if let RouteMatch::WrongMethod(methods) = m {
            assert_eq!(allow_header(&methods), "GET, DELETE");
        }
    }

    #[test]
    fn unknown_and_empty_segments_are_not_found() {
        let t = table();
        for path in [
            "/v1/vms",
            "/v1/vms/",
            "/v1/vms//start",
            "/v2/vms/a",
            "",
            "/v1/vms/a/",
        ] {
            assert_eq!(find(&t, &Method::GET, path), RouteMatch::NotFound, "{path}");
        }
    }
}
