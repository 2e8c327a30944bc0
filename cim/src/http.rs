//! CIM operations over HTTP (DSP0200): `POST /cimom` and `M-POST` with a `Man:` header, over
//! plain TCP or TLS, HTTP/1.1 keep-alive; Basic authentication; limits on body size, time to
//! send headers and body, idle connections and the number of connections.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::auth::{Authenticator, Verdict};
use crate::cimom::{Cimom, Outcome};

/// A client must send a request's headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// ...and its body within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// A TLS handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection with no request in flight is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection whose request (or reading of its response) takes longer is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How often each connection's watchdog looks.
const WATCHDOG_PERIOD: Duration = Duration::from_secs(5);

/// What every connection shares.
pub struct Shared {
    /// The object manager.
    pub cimom: Arc<Cimom>,
    /// Users.
    pub auth: Authenticator,
    /// Largest body.
    pub max_body: usize,
    /// Connection slots.
    pub slots: Arc<Semaphore>,
}

type Reply = Response<Full<Bytes>>;

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

struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` at the last request start or end.
    last: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

struct InFlight<'a>(&'a Activity);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

async fn respond(
    request: Request<Incoming>,
    peer: IpAddr,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
) -> Result<Reply, Infallible> {
    activity.in_flight.fetch_add(1, Ordering::Relaxed);
    activity.touch();
    let _guard = InFlight(&activity);
    Ok(handle(request, peer, &shared).await)
}

async fn handle(request: Request<Incoming>, peer: IpAddr, shared: &Arc<Shared>) -> Reply {
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
    if !shared.auth.is_cached(authorization.as_deref()) {
        let wait = shared.auth.delay_for(peer);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let sh = Arc::clone(shared);
        let verdict =
            tokio::task::spawn_blocking(move || sh.auth.check(authorization.as_deref(), peer))
                .await
                .unwrap_or(Verdict::Denied);
        if !matches!(verdict, Verdict::Allowed(_)) {
            let mut r = reply(StatusCode::UNAUTHORIZED, "authentication required\n");
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"lockstep CIM\""),
            );
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
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, shared.max_body).collect()).await;
    let body = match collected {
        Err(_) => {
            return protocol_error(
                StatusCode::REQUEST_TIMEOUT,
                "request-not-valid",
                "the body did not arrive in time",
            )
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
        Ok(Ok(c)) => c.to_bytes(),
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

/// Serves HTTP/1.1 on one connection until the client leaves, it idles, or the server stops.
async fn serve_connection<I>(
    io: I,
    peer: IpAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let act = Arc::clone(&activity);
    let svc = service_fn(move |req| respond(req, peer, Arc::clone(&shared), Arc::clone(&act)));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .max_buf_size(256 * 1024);
    let mut conn = pin!(builder.serve_connection(TokioIo::new(io), svc));
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    log::debug!("cim: connection from {peer}: {e}");
                }
                return;
            }
            _ = tokio::time::sleep(WATCHDOG_PERIOD) => {
                let busy = activity.in_flight.load(Ordering::Relaxed) > 0;
                let quiet = activity.quiet_for();
                if busy && quiet > REQUEST_TIMEOUT {
                    log::info!("cim: dropping a stalled connection from {peer}");
                    return;
                }
                if !busy && quiet > IDLE_TIMEOUT && !closing {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                if closing && quiet > IDLE_TIMEOUT + WATCHDOG_PERIOD * 2 {
                    return;
                }
            }
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Accepts connections on one listener until told to stop.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    log::warn!("cim: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = Arc::clone(&shared.slots).try_acquire_owned() else {
            log::warn!("cim: too many connections; refusing one from {peer}");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let tls = tls.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let ip = peer_ip(peer);
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => serve_connection(tls_stream, ip, shared, stop).await,
                        Ok(Err(e)) => log::debug!("cim: TLS handshake with {peer} failed: {e}"),
                        Err(_) => log::debug!("cim: TLS handshake with {peer} timed out"),
                    }
                }
                None => serve_connection(stream, ip, shared, stop).await,
            }
        });
    }
}

fn peer_ip(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
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
