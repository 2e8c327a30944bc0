//! The config of a host process (`lockstep host --config host.json`): where its endpoints
//! listen, where it keeps its files, and the VMs it defines at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ConfigError, VmConfig};

/// The host process's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The control API's Unix socket.
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    /// Also serve the control API on this TCP address, which must be a loopback address; clients
    /// there present a token (`Authorization: Bearer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tcp: Option<SocketAddr>,
    /// The file holding the TCP token (mode 0600); when absent the host generates one in
    /// `<state_dir>/api.token` on first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tcp_token_path: Option<PathBuf>,
    /// Where per-VM serial logs, console sockets and snapshots go.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Give every VM its own Firecracker-compatible API socket (`<state_dir>/<vm>/firecracker.sock`).
    #[serde(default)]
    pub firecracker_sockets: bool,
    /// Give every VM an interactive serial console socket (`<state_dir>/<vm>/console.sock`).
    #[serde(default)]
    pub console_sockets: bool,
    /// VMs defined when the host starts.
    #[serde(default)]
    pub vms: Vec<HostVm>,
    /// The CIM/WBEM endpoint (off when absent); its keys are the `cim` crate's `CimConfig`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cim: Option<serde_json::Value>,
}

/// A VM the host defines at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostVm {
    /// The VM's config inline...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<VmConfig>,
    /// ...or in a file of its own (the same JSON as `lockstep run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_path: Option<PathBuf>,
    /// Boot it when the host starts.
    #[serde(default)]
    pub autostart: bool,
}

fn default_api_socket() -> PathBuf {
    PathBuf::from("/run/lockstep/api.sock")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/lockstep")
}

impl HostConfig {
    /// Reads and parses a host config file.
    pub fn from_file(path: &Path) -> Result<HostConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: HostConfig = crate::error::parse_json(text.as_bytes())?;
        config.check()?;
        Ok(config)
    }

    /// Checks what can be checked without touching the host.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(addr) = self.api_tcp {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::invalid(
                    "api_tcp",
                    format!("{addr} is not a loopback address; the API listens on loopback only"),
                ));
            }
        }
        if self.api_tcp_token_path.is_some() && self.api_tcp.is_none() {
            return Err(ConfigError::invalid(
                "api_tcp_token_path",
                "is only used with \"api_tcp\"".into(),
            ));
        }
        for (i, vm) in self.vms.iter().enumerate() {
            if vm.config.is_some() == vm.config_path.is_some() {
                return Err(ConfigError::invalid(
                    format!("vms[{i}]"),
                    "give exactly one of \"config\" and \"config_path\"".into(),
                ));
            }
        }
        Ok(())
    }

    /// The VM configs, reading the files named by `config_path`; each must have a name.
    pub fn vm_configs(&self) -> Result<Vec<(VmConfig, bool)>, ConfigError> {
        self.vms
            .iter()
            .enumerate()
            .map(|(i, vm)| {
                let config = match (&vm.config, &vm.config_path) {
                    (Some(c), _) => c.clone(),
                    (None, Some(path)) => VmConfig::from_file(path).map_err(|e| {
                        ConfigError::invalid(
                            format!("vms[{i}].config_path"),
                            format!("{}: {e}", path.display()),
                        )
                    })?,
                    (None, None) => unreachable!("checked by HostConfig::check"),
                };
                if config.name.is_none() {
                    return Err(ConfigError::invalid(
                        format!("vms[{i}]"),
                        "a VM on a host needs a \"name\"".into(),
                    ));
                }
                Ok((config, vm.autostart))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_inline_vms() {
        let text = r#"{"vms": [{"config": {"name": "a", "boot-source": {"kernel_image_path": "/k"}}, "autostart": true}]}"#;
        let c: HostConfig = serde_json::from_str(text).unwrap();
        c.check().unwrap();
        assert_eq!(c.api_socket, PathBuf::from("/run/lockstep/api.sock"));
        let vms = c.vm_configs().unwrap();
        assert_eq!(vms[0].0.name.as_deref(), Some("a"));
        assert!(vms[0].1);
    }

    #[test]
    fn refusals() {
        let c: HostConfig = serde_json::from_str(r#"{"api_tcp": "0.0.0.0:80"}"#).unwrap();
        assert!(c.check().unwrap_err().to_string().starts_with("api_tcp"));
        let c: HostConfig = serde_json::from_str(r#"{"vms": [{"autostart": true}]}"#).unwrap();
        assert!(c.check().unwrap_err().to_string().starts_with("vms[0]"));
        let c: HostConfig = serde_json::from_str(
            r#"{"vms": [{"config": {"boot-source": {"kernel_image_path": "/k"}}}]}"#,
        )
        .unwrap();
        assert!(c
            .vm_configs()
            .unwrap_err()
            .to_string()
            .contains("needs a \"name\""));
    }
}
