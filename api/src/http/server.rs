//! The HTTP/1.1 machinery both APIs share: accepting connections, reading a request body within
//! the size limit, checking its media type, and running the API's synchronous handler on tokio's
//! blocking pool (host operations block). The APIs differ only in their [`Handler`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use lockstep_seccomp::ThreadKind;
use tokio::sync::oneshot;

use super::listeners::Listeners;
use super::tcp_auth::TcpGuard;
use super::{HttpError, MAX_BODY_BYTES};

/// A reply as the handlers build it.
pub(crate) type Reply = Response<Full<Bytes>>;

/// How long requests in flight may take to finish once the server is told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A client must send a request's headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many host operations run at once; further requests wait for one to end.
const MAX_BLOCKING_THREADS: usize = 16;

/// A request whose body has been read and checked.
#[derive(Debug)]
pub(crate) struct Request {
    /// The HTTP method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query string, without the `?`.
    pub query: Option<String>,
    /// The body (JSON, or empty).
    pub body: Bytes,
}

/// Why a request was refused before it reached the handler.
#[derive(Debug)]
pub(crate) enum RequestProblem {
    /// The body is larger than [`MAX_BODY_BYTES`].
    TooLarge,
    /// The body is not declared as JSON.
    NotJson(String),
    /// The body could not be read from the connection.
    Unreadable(String),
    /// The handler panicked (a bug); the server goes on.
    HandlerPanicked,
    /// A TCP request without the right `Authorization: Bearer` token: why.
    Unauthorized(&'static str),
    /// A TCP request whose `Host` does not name the listener (DNS rebinding): the name given.
    WrongHost(String),
}

/// One API: its routes, run on a blocking thread, and how it words refusals.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Answers one request. May block for as long as the host operation takes.
    fn handle(&self, request: &Request) -> Reply;
    /// Answers a request refused by the server itself.
    fn refuse(&self, problem: &RequestProblem) -> Reply;
    /// Whether a body with a `Content-Type` other than JSON is refused (otherwise it is read as
    /// JSON all the same).
    fn json_content_type_only(&self) -> bool {
        true
    }
}

/// A JSON reply with `status`.
pub(crate) fn json_reply(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    let (status, body) = match serde_json::to_vec(value) {
        Ok(body) => (status, body),
        // Our reply types have string keys and derived serializers; this would be a bug.
        Err(e) => {
            log::error!("cannot encode a reply: {e}");
            let body = serde_json::json!({"error": format!("cannot encode the reply: {e}")});
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                body.to_string().into_bytes(),
            )
        }
    };
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reply
}

/// A reply with `status` and no body.
pub(crate) fn empty_reply(status: StatusCode) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = status;
    reply
}

/// Whether a `Content-Type` names JSON (`application/json`, `application/x+json`, any parameters).
pub(crate) fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads the request, checks its body and hands it to the handler on a blocking thread. A
/// request on the TCP listener passes its `guard` first, and must declare any body as JSON.
async fn respond<H: Handler>(
    handler: Arc<H>,
    guard: Option<Arc<TcpGuard>>,
    request: hyper::Request<Incoming>,
) -> Reply {
    let (parts, body) = request.into_parts();
    if let Some(guard) = &guard {
        if let Err(problem) = guard.admit(&parts) {
            log::info!(
                "API request refused on TCP: {} {}: {problem:?}",
                parts.method,
                parts.uri.path()
            );
            return handler.refuse(&problem);
        }
    }
    let declared_len = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return handler.refuse(&RequestProblem::TooLarge);
    }
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return handler.refuse(&RequestProblem::TooLarge);
        }
        Err(e) => return handler.refuse(&RequestProblem::Unreadable(e.to_string())),
    };
    if !body.is_empty() && guard.is_some() && !parts.headers.contains_key(CONTENT_TYPE) {
        return handler.refuse(&RequestProblem::NotJson("none".into()));
    }
    if !body.is_empty() && handler.json_content_type_only() {
        if let Some(value) = parts.headers.get(CONTENT_TYPE) {
            let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
            if !is_json(&text) {
                return handler.refuse(&RequestProblem::NotJson(text));
            }
        }
    }
    let request = Request {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        body,
    };
    log::debug!("API request: {} {}", request.method, request.path);
    let worker = handler.clone();
    match tokio::task::spawn_blocking(move || worker.handle(&request)).await {
        Ok(reply) => reply,
        Err(e) => {
            log::error!("an API handler failed: {e}");
            handler.refuse(&RequestProblem::HandlerPanicked)
        }
    }
}

/// Serves `handler` on `listeners` until `shutdown` completes.
pub(crate) async fn run<H: Handler>(
    handler: Arc<H>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HttpError> {
    if listeners.is_empty() {
        return Err(HttpError::NoListeners);
    }
    let (unix, socket_file) = match listeners.unix {
        Some((listener, file)) => {
            let what = file.path().display().to_string();
            let listener = tokio::net::UnixListener::from_std(listener)
                .map_err(|source| HttpError::Bind { what, source })?;
            (Some(listener), Some(file))
        }
        None => (None, None),
    };
    let (tcp, guard) = match listeners.tcp {
        Some((listener, guard)) => {
            let what = format!("{:?}", listener.local_addr().ok());
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|source| HttpError::Bind { what, source })?;
            (Some(listener), Some(guard))
        }
        None => (None, None),
    };
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = accept_unix(unix.as_ref()) => match accepted {
                Ok(stream) => serve_connection(&graceful, handler.clone(), None, stream),
                Err(e) => accept_failed(e).await,
            },
            accepted = accept_tcp(tcp.as_ref()) => match accepted {
                Ok(stream) => serve_connection(&graceful, handler.clone(), guard.clone(), stream),
                Err(e) => accept_failed(e).await,
            },
        }
    }
    // Stop accepting before waiting for the connections, and remove the socket file.
    drop((unix, tcp, socket_file));
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            log::warn!("API server: requests still running after {SHUTDOWN_GRACE:?}; closing anyway");
        }
    }
    Ok(())
}

async fn accept_unix(
    listener: Option<&tokio::net::UnixListener>,
) -> std::io::Result<tokio::net::UnixStream> {
    match listener {
        Some(l) => l.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

async fn accept_tcp(
    listener: Option<&tokio::net::TcpListener>,
) -> std::io::Result<tokio::net::TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// Out of file descriptors or a connection reset before accept: log, pause briefly, go on.
async fn accept_failed(e: std::io::Error) {
    log::warn!("API server: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn serve_connection<S, H>(
    graceful: &GracefulShutdown,
    handler: Arc<H>,
    guard: Option<Arc<TcpGuard>>,
    stream: S,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let service = service_fn(move |request| {
        let handler = handler.clone();
        let guard = guard.clone();
        async move { Ok::<_, Infallible>(respond(handler, guard, request).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::debug!("API connection ended: {e}");
        }
    });
}

/// A server running on its own thread; stops it when stopped or dropped.
#[derive(Debug)]
pub struct ServerHandle {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), HttpError>>>,
    tcp_addr: Option<std::net::SocketAddr>,
}

impl ServerHandle {
    /// The TCP address it listens on.
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp_addr
    }

    /// Stops accepting, lets requests in flight finish (a few seconds at most) and waits for
    /// the server's thread to end.
    pub fn stop(mut self) -> Result<(), HttpError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), HttpError> {
        if let Some(stop) = self.stop.take() {
            // The server may have ended already (an error); then there is nobody to tell.
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| HttpError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            log::warn!("API server: {e}");
        }
    }
}

/// Runs `handler` on a new thread with a current-thread tokio runtime (plus its blocking pool).
pub(crate) fn spawn<H: Handler>(
    name: &str,
    kind: ThreadKind,
    handler: Arc<H>,
    listeners: Listeners,
) -> Result<ServerHandle, HttpError> {
    if listeners.is_empty() {
        return Err(HttpError::NoListeners);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name(format!("{name}-worker"))
        .on_thread_start(move || lockstep_seccomp::install(kind))
        .build()
        .map_err(HttpError::Runtime)?;
    let tcp_addr = listeners.tcp_addr();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lockstep_seccomp::install(kind);
            let stopped = async {
                // A dropped sender means the handle is gone: stop too.
                let _ = stop_rx.await;
            };
            let result = runtime.block_on(run(handler, listeners, stopped));
            // Host operations still running (a long snapshot) are not waited for past this.
            runtime.shutdown_timeout(SHUTDOWN_GRACE);
            result
        })
        .map_err(HttpError::Runtime)?;
    Ok(ServerHandle {
        stop: Some(stop_tx),
        thread: Some(thread),
        tcp_addr,
    })
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_media_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "application/x-www-form-urlencoded",
            "text/plain",
            "",
            "json",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }
}
