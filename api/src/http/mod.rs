//! lockstep's control API: JSON over HTTP/1.1 on a Unix socket (and optionally a loopback TCP
//! port), calling a [`HostControl`]. The routes are in `control_api.rs` and documented in
//! `api/openapi.yaml`; the Prometheus endpoint's text comes from [`crate::metrics`].
//!
//! The server runs on tokio, but the host's operations block (a snapshot or a graceful shutdown
//! can take seconds), so each request is handled on tokio's blocking pool: the I/O thread only
//! reads requests and writes replies. The host process's main thread is not async: [`spawn`]
//! starts a small runtime on its own thread and returns a [`ServerHandle`] that stops it.
//!
//! Requests that carry a body must send it as JSON: `Content-Type: application/json` (any
//! parameters, e.g. `; charset=utf-8`, and `+json` types are accepted). On the Unix socket a body
//! without a `Content-Type` is read as JSON too, so `curl --data-binary @vm.json` works; any other
//! type is refused (415), since `curl -d` without `-H` sends a form type and that is a mistake
//! worth naming. On TCP a body must declare JSON, and every request must carry the host's token
//! and name the listener in `Host` (see [`tcp_auth`]).

mod control_api;
mod listeners;
pub(crate) mod routes;
pub(crate) mod server;
pub mod tcp_auth;

#[cfg(test)]
pub(crate) mod fake_host;
#[cfg(test)]
pub(crate) mod test_client;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

pub use listeners::Listeners;
use lockstep_seccomp::ThreadKind;
pub use server::ServerHandle;
pub use tcp_auth::{ApiToken, TokenError};
use thiserror::Error;

use crate::control::HostControl;

/// The largest request body the APIs read; larger ones are refused (413 here, 400 on the
/// Firecracker API, as Firecracker does).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Why an API server could not start or ended with an error.
#[derive(Debug, Error)]
pub enum HttpError {
    /// Binding or preparing a socket failed.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// The socket path or address.
        what: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Another live server answers on the socket path.
    #[error("{}: another server is listening on this socket", .0.display())]
    SocketInUse(PathBuf),
    /// The socket path exists and is something else.
    #[error("{}: exists and is not a socket; remove it or choose another path", .0.display())]
    NotASocket(PathBuf),
    /// A TCP address that is not loopback.
    #[error("{0}: the API listens on loopback addresses only")]
    NotLoopback(std::net::SocketAddr),
    /// `serve` was given no socket at all.
    #[error("no socket to listen on: give a Unix socket path or a TCP address")]
    NoListeners,
    /// The tokio runtime or its thread could not be created.
    #[error("cannot start the API server's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The server's thread panicked.
    #[error("the API server thread panicked")]
    Panicked,
}

/// Serves lockstep's control API on `listeners` until `shutdown` completes, then lets requests
/// in flight finish (for a few seconds at most) and returns. Must run inside a tokio runtime
/// with I/O and time enabled.
pub async fn serve(
    host: Arc<dyn HostControl>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HttpError> {
    let handler = Arc::new(control_api::ControlApi::new(host));
    server::run(handler, listeners, shutdown).await
}

/// Starts lockstep's control API on its own thread and tokio runtime (the sockets are already
/// bound, so the API is reachable when this returns). Dropping or stopping the handle ends it.
pub fn spawn(host: Arc<dyn HostControl>, listeners: Listeners) -> Result<ServerHandle, HttpError> {
    let handler = Arc::new(control_api::ControlApi::new(host));
    server::spawn("lockstep-api", ThreadKind::Api, handler, listeners)
}

/// Parses a JSON request body; errors name the field, line and column, as config errors do.
pub(crate) use crate::error::parse_json as parse_json_body;
