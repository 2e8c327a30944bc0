//! The endpoint's configuration: the `cim` section of the host config.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where and how the CIM endpoint listens, and who may use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CimConfig {
    /// HTTPS address (default `0.0.0.0:5989`); `null` turns HTTPS off.
    #[serde(default = "default_https")]
    pub https: Option<SocketAddr>,
    /// Plain HTTP address, off unless given (the WBEM port is 5988).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// PEM certificate chain for HTTPS; with `key_path`. Without both, a self-signed
    /// certificate is generated into `<state_dir>/cim/` on first start and reused after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_path: Option<PathBuf>,
    /// PEM private key for `cert_path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_path: Option<PathBuf>,
    /// Users allowed in, with argon2 password hashes (`lockstep hash-password`).
    #[serde(default)]
    pub users: Vec<CimUser>,
    /// Let requests without credentials in (never the default).
    #[serde(default)]
    pub allow_anonymous: bool,
    /// The host name used in instance paths and as the host system's Name (default: the
    /// machine's host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Largest request body accepted, bytes (default 4 MiB).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Most connections open at once (default 256); more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most connections open at once from one source address (an IPv6 /64 counts as one
    /// address; default 32); more are answered 503 (plain HTTP) or closed at once.
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Deadlines for slow and idle clients.
    #[serde(default)]
    pub timeouts: CimTimeouts,
    /// Password checking: its own threads and queue, and the brake on failed logins.
    #[serde(default)]
    pub logins: CimLogins,
    /// Threads serving requests (default 2).
    #[serde(default = "default_threads")]
    pub threads: usize,
}

/// Deadlines for slow and idle clients (the `timeouts` object of the `cim` section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CimTimeouts {
    /// A request's headers must arrive within this many seconds of its first byte (of the
    /// connection, for its first request); slower clients are dropped (default 10). A TLS
    /// handshake has the same time.
    #[serde(default = "default_header_secs")]
    pub header_secs: u64,
    /// A request's body must arrive within this many seconds after its headers (default 30);
    /// slower clients get 408 and are dropped.
    #[serde(default = "default_body_secs")]
    pub body_secs: u64,
    /// A keep-alive connection with no request for this many seconds is closed (default 60).
    #[serde(default = "default_idle_secs")]
    pub idle_secs: u64,
}

/// Password checking and the brake on failed logins (the `logins` object of the `cim` section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CimLogins {
    /// Threads that check passwords (argon2), apart from those that serve requests (default 1).
    #[serde(default = "default_login_threads")]
    pub threads: usize,
    /// Password checks that may wait for those threads; an attempt beyond is answered 503 at
    /// once, without checking (default 16).
    #[serde(default = "default_login_queue")]
    pub queue: usize,
    /// Logins that may be pending (braked, queued or being checked) at once from one subnet
    /// (an IPv4 /24 or an IPv6 /64); more are answered 503 at once (default 4).
    #[serde(default = "default_pending_per_subnet")]
    pub pending_per_subnet: usize,
    /// Each recent failed login from a subnet, whatever the user name, spaces that subnet's
    /// next attempts this many milliseconds further apart (default 250)...
    #[serde(default = "default_delay_step_ms")]
    pub delay_step_ms: u64,
    /// ...up to this many milliseconds (default 4000).
    #[serde(default = "default_delay_max_ms")]
    pub delay_max_ms: u64,
}

/// A user of the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CimUser {
    /// Login name.
    pub name: String,
    /// PHC-format argon2 hash of the password (`$argon2id$v=19$...`).
    pub password_hash: String,
}

fn default_https() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 5989)))
}

fn default_max_body() -> usize {
    4 << 20
}

fn default_max_connections() -> usize {
    256
}

fn default_threads() -> usize {
    2
}

fn default_max_connections_per_address() -> usize {
    32
}

fn default_header_secs() -> u64 {
    10
}

fn default_body_secs() -> u64 {
    30
}

fn default_idle_secs() -> u64 {
    60
}

fn default_login_threads() -> usize {
    1
}

fn default_login_queue() -> usize {
    16
}

fn default_pending_per_subnet() -> usize {
    4
}

fn default_delay_step_ms() -> u64 {
    250
}

fn default_delay_max_ms() -> u64 {
    4000
}

impl Default for CimTimeouts {
    fn default() -> Self {
        CimTimeouts {
            header_secs: default_header_secs(),
            body_secs: default_body_secs(),
            idle_secs: default_idle_secs(),
        }
    }
}

impl Default for CimLogins {
    fn default() -> Self {
        CimLogins {
            threads: default_login_threads(),
            queue: default_login_queue(),
            pending_per_subnet: default_pending_per_subnet(),
            delay_step_ms: default_delay_step_ms(),
            delay_max_ms: default_delay_max_ms(),
        }
    }
}

impl Default for CimConfig {
    fn default() -> Self {
        CimConfig {
            https: default_https(),
            http: None,
            cert_path: None,
            key_path: None,
            users: Vec::new(),
            allow_anonymous: false,
            hostname: None,
            max_body_bytes: default_max_body(),
            max_connections: default_max_connections(),
            max_connections_per_address: default_max_connections_per_address(),
            timeouts: CimTimeouts::default(),
            logins: CimLogins::default(),
            threads: default_threads(),
        }
    }
}

impl CimConfig {
    /// Checks what can be checked before starting.
    pub fn check(&self) -> Result<(), String> {
        if self.https.is_none() && self.http.is_none() {
            return Err("neither https nor http is set: the endpoint would not listen".into());
        }
        if self.cert_path.is_some() != self.key_path.is_some() {
            return Err("give both cert_path and key_path, or neither".into());
        }
        if self.users.is_empty() && !self.allow_anonymous {
            return Err("no users and allow_anonymous is false: nobody could log in".into());
        }
        for u in &self.users {
            if u.name.is_empty() || u.name.contains(':') {
                return Err(format!("user name {:?} is empty or contains ':'", u.name));
            }
            argon2::PasswordHash::new(&u.password_hash)
                .map_err(|e| format!("user {}: password_hash is not a PHC hash: {e}", u.name))?;
        }
        if self.max_body_bytes < 4096 {
            return Err("max_body_bytes below 4096 would refuse ordinary requests".into());
        }
        if self.threads == 0 || self.threads > 64 {
            return Err("threads must be 1 to 64".into());
        }
        within("max_connections", self.max_connections, 1, 65_536)?;
        within(
            "max_connections_per_address",
            self.max_connections_per_address,
            1,
            self.max_connections,
        )?;
        let t = &self.timeouts;
        within("timeouts.header_secs", t.header_secs, 1, 3600)?;
        within("timeouts.body_secs", t.body_secs, 1, 3600)?;
        within("timeouts.idle_secs", t.idle_secs, 1, 86_400)?;
        let l = &self.logins;
        within("logins.threads", l.threads, 1, 16)?;
        within("logins.queue", l.queue, 1, 4096)?;
        within("logins.pending_per_subnet", l.pending_per_subnet, 1, 4096)?;
        within("logins.delay_max_ms", l.delay_max_ms, 0, 60_000)?;
        within("logins.delay_step_ms", l.delay_step_ms, 0, l.delay_max_ms)?;
        Ok(())
    }
}

/// `Ok` when `value` is in `min..=max`, else an error naming the field.
fn within<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), String> {
    if value < min || value > max {
        return Err(format!("{field} must be {min} to {max}, not {value}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: CimConfig = serde_json::from_str(r#"{"allow_anonymous": true}"#).unwrap();
        assert_eq!(c.https, Some("0.0.0.0:5989".parse().unwrap()));
        assert_eq!(c.http, None);
        c.check().unwrap();
        assert!(serde_json::from_str::<CimConfig>(r#"{"htps": null}"#).is_err());
        let off: CimConfig =
            serde_json::from_str(r#"{"https": null, "allow_anonymous": true}"#).unwrap();
        assert!(off.check().is_err());
        let nobody: CimConfig = serde_json::from_str("{}").unwrap();
        assert!(nobody.check().is_err());
    }

    #[test]
    fn limits_are_checked_by_name() {
        let c: CimConfig = serde_json::from_str(
            r#"{"allow_anonymous": true, "timeouts": {"idle_secs": 5}, "logins": {"queue": 2}}"#,
        )
        .unwrap();
        assert_eq!(c.timeouts.idle_secs, 5);
        assert_eq!(c.timeouts.header_secs, 10);
        assert_eq!((c.logins.queue, c.logins.threads), (2, 1));
        c.check().unwrap();
        let bad = |json: &str| {
            serde_json::from_str::<CimConfig>(json)
                .unwrap()
                .check()
                .unwrap_err()
        };
        let e = bad(r#"{"allow_anonymous": true, "timeouts": {"header_secs": 0}}"#);
        assert!(e.contains("timeouts.header_secs"), "{e}");
        let e = bad(r#"{"allow_anonymous": true, "max_connections_per_address": 300}"#);
        assert!(
            e.contains("max_connections_per_address must be 1 to 256"),
            "{e}"
        );
        let e = bad(r#"{"allow_anonymous": true, "logins": {"threads": 0}}"#);
        assert!(e.contains("logins.threads"), "{e}");
        let e = bad(r#"{"allow_anonymous": true, "logins": {"delay_step_ms": 5000}}"#);
        assert!(e.contains("logins.delay_step_ms must be 0 to 4000"), "{e}");
        assert!(serde_json::from_str::<CimConfig>(r#"{"timeouts": {"header": 1}}"#).is_err());
    }
}
