//! Who may use the control API over TCP. Any local user can reach a loopback port, and so can
//! any web page through a browser on the host, so a TCP request must carry the host's token
//! (`Authorization: Bearer <token>`), name the listener itself in `Host` (a DNS-rebinding page
//! names its own domain), and declare any body as JSON (a cross-origin form post cannot). The
//! Unix socket (0600, root's) needs none of this.

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use thiserror::Error;

use super::server::RequestProblem;
use crate::private_fs;

/// Random bytes in a generated token (written as hex).
const TOKEN_BYTES: usize = 32;
/// The shortest token accepted from a configured file.
const MIN_TOKEN_LEN: usize = 16;

/// Why the API token could not be read or made.
#[derive(Debug, Error)]
pub enum TokenError {
    /// The token file could not be created, opened or read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The token file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The token file is something other than a regular file.
    #[error("{}: not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// Other users could read the configured token.
    #[error("{}: other users can read it (mode {mode:o}); chmod 600 it", .path.display())]
    Readable {
        /// The token file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The token is too short or has characters a Bearer token cannot have.
    #[error("{}: the token must be at least {MIN_TOKEN_LEN} characters of A-Z a-z 0-9 - . _ ~ + / =", .0.display())]
    Malformed(PathBuf),
}

/// The secret a TCP client must present. Its `Debug` form does not show it.
#[derive(Clone)]
pub struct ApiToken(String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// The host's own token at `path` (`<state_dir>/api.token`): read if it exists (and made
    /// 0600 if its mode had drifted), otherwise generated from 32 random bytes and written with
    /// mode 0600.
    pub fn load_or_generate(path: &Path) -> Result<ApiToken, TokenError> {
        let io = |source| TokenError::Io {
            path: path.to_owned(),
            source,
        };
        let secret = private_fs::random_hex(TOKEN_BYTES).map_err(io)?;
        match private_fs::create_private_file(path) {
            Ok(mut file) => {
                use std::io::Write;
                file.write_all(format!("{secret}\n").as_bytes())
                    .map_err(io)?;
                log::info!("control API: generated the TCP token in {}", path.display());
                return Ok(ApiToken(secret));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        let (text, mode) = read_token_file(path, false)?;
        if mode & 0o077 != 0 {
            log::warn!("{}: was mode {mode:o}; made 0600", path.display());
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        ApiToken::parse(path, &text)
    }

    /// A token configured by the administrator (`api_tcp_token_path`): a file only its owner
    /// can read, holding the token (surrounding white space is ignored).
    pub fn from_file(path: &Path) -> Result<ApiToken, TokenError> {
        let (text, mode) = read_token_file(path, true)?;
        if mode & 0o077 != 0 {
            return Err(TokenError::Readable {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
        ApiToken::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<ApiToken, TokenError> {
        let token = text.trim();
        let valid = token.len() >= MIN_TOKEN_LEN
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b));
        if !valid {
            return Err(TokenError::Malformed(path.to_owned()));
        }
        Ok(ApiToken(token.to_string()))
    }

    /// A fixed token for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> ApiToken {
        ApiToken("0123456789abcdef0123456789abcdef".into())
    }

    /// The token itself, for clients (tests, the host's own tools).
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the token, in time that does not depend on where they differ.
    fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if presented.len() != expected.len() {
            return false;
        }
        let difference = expected
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

/// Reads a token file (following a symbolic link only when `follow`); returns its text and mode.
fn read_token_file(path: &Path, follow: bool) -> Result<(String, u32), TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    if !follow {
        options.custom_flags(libc::O_NOFOLLOW);
    }
    let file = options.open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile(path.to_owned()));
    }
    let mut text = String::new();
    file.take(4096).read_to_string(&mut text).map_err(io)?;
    Ok((text, meta.mode() & 0o7777))
}

/// The checks a request on the TCP listener passes before anything else is done with it.
#[derive(Debug)]
pub(crate) struct TcpGuard {
    token: ApiToken,
    /// The `Host` values that name this listener, lowercase.
    hosts: Vec<String>,
}

impl TcpGuard {
    /// The guard of a listener bound to `local` (the port actually bound).
    pub(crate) fn new(token: ApiToken, local: SocketAddr) -> TcpGuard {
        let port = local.port();
        let ip = match local {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let mut hosts = vec![format!("{ip}:{port}"), format!("localhost:{port}")];
        if port == 80 {
            // A client leaves out the default port.
            hosts.push(ip);
            hosts.push("localhost".into());
        }
        TcpGuard { token, hosts }
    }

    /// Admits a request by its headers, or says why not: a foreign `Host` (421), a missing or
    /// wrong token (401), a declared body type other than JSON (415).
    pub(crate) fn admit(&self, parts: &hyper::http::request::Parts) -> Result<(), RequestProblem> {
        let host = parts
            .headers
            .get(HOST)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase());
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase());
        for named in [&host, &authority].into_iter().flatten() {
            if !self.hosts.contains(named) {
                return Err(RequestProblem::WrongHost(named.clone()));
            }
        }
        if host.is_none() && authority.is_none() {
            return Err(RequestProblem::WrongHost(String::new()));
        }
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| bearer_token(v.as_bytes()));
        match presented {
            None => return Err(RequestProblem::Unauthorized("no Bearer token")),
            Some(token) if !self.token.matches(token) => {
                return Err(RequestProblem::Unauthorized("the Bearer token is wrong"))
            }
            Some(_) => {}
        }
        if let Some(value) = parts.headers.get(CONTENT_TYPE) {
            let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
            if !super::server::is_json(&text) {
                return Err(RequestProblem::NotJson(text));
            }
        }
        Ok(())
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    fn parts(headers: &[(&str, &str)]) -> hyper::http::request::Parts {
        let mut builder = hyper::Request::builder().method("POST").uri("/v1/vms");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn guard() -> TcpGuard {
        let token = ApiToken("0123456789abcdef0123456789abcdef".into());
        TcpGuard::new(token, "127.0.0.1:8080".parse().unwrap())
    }

    const GOOD: &str = "Bearer 0123456789abcdef0123456789abcdef";

    #[test]
    fn admits_only_the_token_the_own_host_and_json() {
        let g = guard();
        for host in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080"] {
            let p = parts(&[("host", host), ("authorization", GOOD)]);
            assert!(g.admit(&p).is_ok(), "{host}");
        }
        let p = parts(&[
            ("host", "127.0.0.1:8080"),
            ("authorization", "bearer  0123456789abcdef0123456789abcdef "),
            ("content-type", "application/json; charset=utf-8"),
        ]);
        assert!(g.admit(&p).is_ok());
        let refused = |headers: &[(&str, &str)]| g.admit(&parts(headers)).unwrap_err();
        assert!(matches!(
            refused(&[("host", "127.0.0.1:8080")]),
            RequestProblem::Unauthorized(_)
        ));
        assert!(matches!(
            refused(&[
                ("host", "127.0.0.1:8080"),
                ("authorization", "Bearer 0123456789abcdef0123456789abcdeF")
            ]),
            RequestProblem::Unauthorized(_)
        ));
        assert!(matches!(
            refused(&[("host", "127.0.0.1:8080"), ("authorization", "Basic YTpi")]),
            RequestProblem::Unauthorized(_)
        ));
        for host in [
            "evil.example:8080",
            "127.0.0.1:8081",
            "localhost",
            "127.0.0.1",
        ] {
            assert!(
                matches!(
                    refused(&[("host", host), ("authorization", GOOD)]),
                    RequestProblem::WrongHost(_)
                ),
                "{host}"
            );
        }
        assert!(matches!(
            refused(&[("authorization", GOOD)]),
            RequestProblem::WrongHost(_)
        ));
        for form in [
            "application/x-www-form-urlencoded",
            "text/plain",
            "multipart/form-data",
        ] {
            assert!(matches!(
                refused(&[
                    ("host", "localhost:8080"),
                    ("authorization", GOOD),
                    ("content-type", form)
                ]),
                RequestProblem::NotJson(_)
            ));
        }
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let token = ApiToken("0123456789abcdef".into());
        let g = TcpGuard::new(token, "[::1]:9000".parse().unwrap());
        let ok = parts(&[
            ("host", "[::1]:9000"),
            ("authorization", "Bearer 0123456789abcdef"),
        ]);
        assert!(g.admit(&ok).is_ok());
    }

    #[test]
    fn generated_token_is_private_and_kept() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("api.token");
        let first = ApiToken::load_or_generate(&path).unwrap();
        assert_eq!(first.secret().len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = ApiToken::load_or_generate(&path).unwrap();
        assert_eq!(first.secret(), again.secret());
        assert_eq!(format!("{first:?}"), "ApiToken(..)");
    }

    #[test]
    fn configured_token_must_be_private_and_well_formed() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("token");
        std::fs::write(&path, "a-long-enough-token\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ApiToken::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            ApiToken::from_file(&path).unwrap().secret(),
            "a-long-enough-token"
        );
        std::fs::write(&path, "short").unwrap();
        assert!(matches!(
            ApiToken::from_file(&path).unwrap_err(),
            TokenError::Malformed(_)
        ));
        assert!(matches!(
            ApiToken::from_file(dir.as_path()).unwrap_err(),
            TokenError::NotAFile(_) | TokenError::Io { .. }
        ));
    }
}
