//! CIM operations over HTTP (DSP0200): `POST /cimom` and `M-POST` with a `Man:` header, over
//! plain TCP or TLS, HTTP/1.1 keep-alive; Basic authentication; limits on body size and the
//! time to send it. Connections, their caps and other deadlines are `connection.rs`'s.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::auth::{Authenticator, Verdict};
use crate::cimom::{Cimom, Outcome};
use crate::connection::{Activity, Admission, Deadlines};

/// What every connection shares.
pub struct Shared {
    /// The object manager.
    pub cimom: Arc<Cimom>,
    /// Users.
    pub auth: Authenticator,
    /// Largest body.
    pub max_body: usize,
    /// The connection caps.
    pub admission: Arc<Admission>,
    /// Deadlines for slow and idle clients.
    pub deadlines: Deadlines,
}

/// A response.
pub type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn protocol_error(status: StatusCode, cim_error: &'static str, detail: &str) -> Reply {
    let mut r = reply(status, format!("{detail}\n"));
    r.headers_mut()
        .insert("CIMError", HeaderValue::from_static(cim_error));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Decodes `%xx` escapes (a CIMObject header may be percent-encoded or not).
fn percent_decode(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| char::from(c).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The header prefix an M-POST's `Man:` declares (`...; ns=73` gives `73-`).
fn mpost_prefix(headers: &HeaderMap) -> Option<String> {
    let man = headers.get("Man")?.to_str().ok()?;
    if !man
        .to_ascii_lowercase()
        .contains("dmtf.org/cim/mapping/http/v1.0")
    {
        return None;
    }
    man.split(';').find_map(|part| {
        part.trim()
            .strip_prefix("ns=")
            .map(|ns| format!("{}-", ns.trim()))
    })
}

/// Serves one request on a connection, keeping the connection's activity up to date.
pub async fn respond(
    request: Request<Incoming>,
    peer: IpAddr,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
) -> Result<Reply, Infallible> {
    let _in_flight = activity.start_request(!request.body().is_end_stream());
    Ok(handle(request, peer, &shared, &activity).await)
}

async fn handle(
    request: Request<Incoming>,
    peer: IpAddr,
    shared: &Arc<Shared>,
    activity: &Activity,
) -> Reply {
    let (parts, body) = request.into_parts();
    let mpost = parts.method.as_str() == "M-POST";
    if parts.method != Method::POST && !mpost {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "CIM operations use POST or M-POST\n",
        );
        r.headers_mut()
            .insert("Allow", HeaderValue::from_static("POST, M-POST"));
        return r;
    }
    if parts.uri.path() != "/cimom" {
        return reply(StatusCode::NOT_FOUND, "the CIM endpoint is /cimom\n");
    }
    let prefix = if mpost {
        match mpost_prefix(&parts.headers) {
            Some(p) => p,
            None => {
                return protocol_error(
                    StatusCode::BAD_REQUEST,
                    "header-mismatch",
                    "M-POST needs a Man header naming the DMTF CIM mapping with ns=NN",
                )
            }
        }
    } else {
        String::new()
    };
    let header = |name: &str| -> Option<String> {
        let h = &parts.headers;
        h.get(format!("{prefix}{name}").as_str())
            .or_else(|| h.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };

    // Authentication first: nothing about the request is looked at for a stranger.
    let authorization = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match shared
        .auth
        .authenticate(authorization.as_deref(), peer)
        .await
    {
        Verdict::Allowed(_) => {}
        Verdict::Missing | Verdict::Denied => {
            let mut r = reply(StatusCode::UNAUTHORIZED, "authentication required\n");
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"lockstep CIM\""),
            );
            return r;
        }
        Verdict::Busy => {
            let mut r = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many login attempts pending; try again later\n",
            );
            r.headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    }

    match header("CIMOperation") {
        Some(op) if op.trim().eq_ignore_ascii_case("MethodCall") => {}
        _ => {
            return protocol_error(
                StatusCode::BAD_REQUEST,
                "unsupported-operation",
                "the CIMOperation header must be MethodCall",
            )
        }
    }
    if let Some(v) = header("CIMProtocolVersion") {
        if !v.trim().starts_with("1.") {
            return protocol_error(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported-protocol-version",
                "this server speaks CIM-XML protocol version 1.x",
            );
        }
    }
    let method = header("CIMMethod");
    let object = header("CIMObject").map(|o| percent_decode(&o));

    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.max_body as u64) {
        return protocol_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request-not-valid",
            &format!("the body is larger than {} bytes", shared.max_body),
        );
    }
    let collected = tokio::time::timeout(
        shared.deadlines.body,
        Limited::new(body, shared.max_body).collect(),
    )
    .await;
    let body = match collected {
        Err(_) => {
            // A slow sender is dropped, not lingered over.
            activity.set_body_unread(false);
            return protocol_error(
                StatusCode::REQUEST_TIMEOUT,
                "request-not-valid",
                "the body did not arrive in time",
            );
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return protocol_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request-not-valid",
                &format!("the body is larger than {} bytes", shared.max_body),
            )
        }
        Ok(Err(e)) => {
            return protocol_error(
                StatusCode::BAD_REQUEST,
                "request-not-well-formed",
                &format!("the body could not be read: {e}"),
            )
        }
        Ok(Ok(c)) => {
            activity.set_body_unread(false);
            c.to_bytes()
        }
    };

    crate::memory::note_request();
    let cimom = Arc::clone(&shared.cimom);
    // Reads are answered on this worker thread: they only ask the host for reports, which it
    // gives without waiting on a VM. Extrinsic methods, which may wait on a guest, go to the
    // blocking pool.
    let read_only = method.as_deref().is_some_and(crate::ops::is_read);
    let outcome = if read_only {
        Ok(cimom.handle(&body, method.as_deref(), object.as_deref()))
    } else {
        tokio::task::spawn_blocking(move || {
            cimom.handle(&body, method.as_deref(), object.as_deref())
        })
        .await
    };
    match outcome {
        Ok(Outcome::Response(xml)) => {
            let mut r = reply(StatusCode::OK, xml);
            let h = r.headers_mut();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/xml; charset=\"utf-8\""),
            );
            if mpost {
                h.insert("Ext", HeaderValue::from_static(""));
                if let Ok(name) = hyper::header::HeaderName::from_bytes(
                    format!("{prefix}CIMOperation").as_bytes(),
                ) {
                    h.insert(name, HeaderValue::from_static("MethodResponse"));
                }
            } else {
                h.insert("CIMOperation", HeaderValue::from_static("MethodResponse"));
            }
            r
        }
        Ok(Outcome::Protocol {
            status,
            cim_error,
            detail,
        }) => protocol_error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            cim_error,
            &detail,
        ),
        Err(e) => {
            log::error!("cim: a request handler failed: {e}");
            protocol_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "request-not-valid",
                "internal error",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_man() {
        assert_eq!(percent_decode("root%2Fcimv2"), "root/cimv2");
        assert_eq!(percent_decode("root/cimv2"), "root/cimv2");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        let mut h = HeaderMap::new();
        h.insert(
            "Man",
            HeaderValue::from_static("http://www.dmtf.org/cim/mapping/http/v1.0 ; ns=73"),
        );
        assert_eq!(mpost_prefix(&h).as_deref(), Some("73-"));
    }
}
