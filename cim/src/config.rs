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
    /// Threads serving requests (default 2).
    #[serde(default = "default_threads")]
    pub threads: usize,
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
        Ok(())
    }
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
}
