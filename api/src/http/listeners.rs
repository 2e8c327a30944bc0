//! The sockets an API server listens on, bound before the server starts so that a bad path or a
//! busy port is reported to the caller at once.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::tcp_auth::{ApiToken, TcpGuard};
use super::HttpError;
use crate::private_fs::{self, SocketFile, SocketPathError};

/// A Unix socket and/or a loopback TCP socket, bound and ready to accept.
#[derive(Debug, Default)]
pub struct Listeners {
    pub(crate) unix: Option<(UnixListener, SocketFile)>,
    pub(crate) tcp: Option<(TcpListener, Arc<TcpGuard>)>,
}

impl Listeners {
    /// No sockets yet; add them with [`Listeners::bind_unix`] and [`Listeners::bind_tcp`].
    pub fn new() -> Listeners {
        Listeners::default()
    }

    /// Listens on a Unix socket at `path`, readable and writable by this user only. A stale
    /// socket file left by a server that is gone is replaced; a live one, or a file that is not
    /// a socket, is an error. The file is removed again when the server stops.
    pub fn bind_unix(mut self, path: impl Into<PathBuf>) -> Result<Listeners, HttpError> {
        let path = path.into();
        let listener = private_fs::bind_private_socket(&path).map_err(|e| match e {
            SocketPathError::InUse(p) => HttpError::SocketInUse(p),
            SocketPathError::NotASocket(p) => HttpError::NotASocket(p),
            SocketPathError::Io { path, source } => HttpError::Bind {
                what: path.display().to_string(),
                source,
            },
        })?;
        let file = SocketFile::track(&path).map_err(|source| HttpError::Bind {
            what: path.display().to_string(),
            source,
        })?;
        self.unix = Some((listener, file));
        Ok(self)
    }

    /// Listens on a loopback TCP address (port 0 picks a free port; see
    /// [`Listeners::tcp_addr`]) for clients that present `token`, name this address in `Host`
    /// and send JSON (see [`super::tcp_auth`]). Other addresses are refused: loopback keeps the
    /// API off the network.
    pub fn bind_tcp(mut self, addr: SocketAddr, token: ApiToken) -> Result<Listeners, HttpError> {
        if !addr.ip().is_loopback() {
            return Err(HttpError::NotLoopback(addr));
        }
        let bind_error = |source| HttpError::Bind {
            what: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        self.tcp = Some((listener, Arc::new(TcpGuard::new(token, local))));
        Ok(self)
    }

    /// The Unix socket's path, if there is one.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, file)| file.path())
    }

    /// The TCP socket's address (with the port actually bound), if there is one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.unix.is_none() && self.tcp.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use std::os::unix::fs::PermissionsExt;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("api.sock");
        // A socket file whose listener is gone.
        drop(UnixListener::bind(&path).unwrap());
        let live = Listeners::new().bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = Listeners::new().bind_unix(&path).unwrap_err();
        assert!(matches!(err, HttpError::SocketInUse(_)), "{err}");
        drop(live);
        assert!(
            !path.exists(),
            "the socket file is removed with its listener"
        );
    }

    #[test]
    fn regular_file_is_not_replaced() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("file");
        std::fs::write(&path, b"keep me").unwrap();
        let err = Listeners::new().bind_unix(&path).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn tcp_is_loopback_only() {
        let open = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let err = Listeners::new()
            .bind_tcp(open, ApiToken::for_tests())
            .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        let l = Listeners::new()
            .bind_tcp(
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
                ApiToken::for_tests(),
            )
            .unwrap();
        assert_ne!(l.tcp_addr().unwrap().port(), 0);
    }
}
