//! The device sections of the VM config: Firecracker's `drives`, `network-interfaces`, `vsock`
//! and `entropy`, and their validation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{validate_input_file, VmConfig};
use crate::error::ConfigError;

/// One entry of Firecracker's `drives` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique id of the drive; the guest reads it back as the disk's serial (GET_ID).
    pub drive_id: String,
    /// The disk image on the host.
    pub path_on_host: PathBuf,
    /// Make this the guest's root device (`root=/dev/vda`, or `root=PARTUUID=...`).
    pub is_root_device: bool,
    /// Refuse guest writes.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root partition's UUID, for `root=PARTUUID=...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `Unsafe` (flushes are no-ops) or `Writeback` (flushes reach the disk).
    #[serde(default)]
    pub cache_type: CacheType,
    /// Firecracker's I/O engine choice; lockstep serves both with its own engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Firecracker's rate limiter; not supported by lockstep (refused when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
    /// Firecracker's vhost-user socket; not supported by lockstep (refused when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<serde_json::Value>,
}

/// Firecracker's `cache_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests are acknowledged without syncing.
    #[default]
    Unsafe,
    /// Flush requests sync the image to its storage.
    Writeback,
}

/// Firecracker's `io_engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous I/O.
    Sync,
    /// io_uring in Firecracker.
    Async,
}

/// Firecracker's `entropy` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Firecracker's rate limiter; not supported by lockstep (refused when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

/// One entry of Firecracker's `network-interfaces` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Unique id of the interface.
    pub iface_id: String,
    /// The host tap device the guest's frames go to.
    pub host_dev_name: String,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`; the device picks none if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Firecracker's rate limiters; not supported by lockstep (refused when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// See `rx_rate_limiter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

impl NetConfig {
    /// The guest MAC as bytes (validated by [`VmConfig::validate`]).
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.guest_mac.as_deref().and_then(parse_mac)
    }
}

/// Firecracker's `vsock` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host programs connect to; guest connections to host port P go to
    /// `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Checks every device section.
pub(crate) fn validate(config: &VmConfig) -> Result<(), ConfigError> {
    let count = config.drives.len()
        + config.network_interfaces.len()
        + usize::from(config.vsock.is_some())
        + usize::from(config.entropy.is_some());
    if count > MAX_VIRTIO_DEVICES {
        return Err(ConfigError::invalid(
            "drives",
            format!("{count} virtio devices; a VM has room for at most {MAX_VIRTIO_DEVICES}"),
        ));
    }
    validate_drives(&config.drives)?;
    validate_nets(&config.network_interfaces)?;
    if let Some(v) = &config.vsock {
        validate_vsock(v)?;
    }
    if config
        .entropy
        .as_ref()
        .is_some_and(|e| e.rate_limiter.is_some())
    {
        return Err(ConfigError::invalid(
            "entropy.rate_limiter",
            "rate limiting is not supported by lockstep".into(),
        ));
    }
    Ok(())
}

/// Most virtio devices a VM can have (one IOAPIC pin each, after the legacy ISA lines).
pub const MAX_VIRTIO_DEVICES: usize = 18;

fn validate_drives(drives: &[DriveConfig]) -> Result<(), ConfigError> {
    if drives.len() > MAX_VIRTIO_DEVICES {
        return Err(ConfigError::invalid(
            "drives",
            format!(
                "{} drives; a VM has room for at most {MAX_VIRTIO_DEVICES} virtio devices",
                drives.len()
            ),
        ));
    }
    let mut roots = 0;
    for (i, d) in drives.iter().enumerate() {
        let field = |name: &str| format!("drives[{i}].{name}");
        let id_ok = !d.drive_id.is_empty()
            && d.drive_id.len() <= 64
            && d.drive_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !id_ok {
            return Err(ConfigError::invalid(
                field("drive_id"),
                format!(
                    "{:?} is not a valid id: use 1 to 64 of A-Z a-z 0-9 _ -",
                    d.drive_id
                ),
            ));
        }
        if drives[..i].iter().any(|o| o.drive_id == d.drive_id) {
            return Err(ConfigError::invalid(
                field("drive_id"),
                format!("{:?} is used by another drive", d.drive_id),
            ));
        }
        validate_input_file(&field("path_on_host"), &d.path_on_host)?;
        if !d.is_read_only {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&d.path_on_host)
                .map_err(|e| {
                    ConfigError::invalid(
                        field("path_on_host"),
                        format!(
                            "cannot open {} for writing: {e} (set is_read_only?)",
                            d.path_on_host.display()
                        ),
                    )
                })?;
        }
        if d.is_root_device {
            roots += 1;
            if roots > 1 {
                return Err(ConfigError::invalid(
                    field("is_root_device"),
                    "a second root device; only one drive can be the root".into(),
                ));
            }
        }
        if d.partuuid.is_some() && !d.is_root_device {
            return Err(ConfigError::invalid(
                field("partuuid"),
                "only the root device's partuuid is used; set is_root_device".into(),
            ));
        }
        if d.rate_limiter.is_some() {
            return Err(ConfigError::invalid(
                field("rate_limiter"),
                "rate limiting is not supported by lockstep".into(),
            ));
        }
        if d.socket.is_some() {
            return Err(ConfigError::invalid(
                field("socket"),
                "vhost-user drives are not supported by lockstep".into(),
            ));
        }
    }
    Ok(())
}

fn validate_nets(nets: &[NetConfig]) -> Result<(), ConfigError> {
    for (i, n) in nets.iter().enumerate() {
        let field = |name: &str| format!("network-interfaces[{i}].{name}");
        if !valid_id(&n.iface_id) {
            return Err(ConfigError::invalid(
                field("iface_id"),
                format!(
                    "{:?} is not a valid id: use 1 to 64 of A-Z a-z 0-9 _ -",
                    n.iface_id
                ),
            ));
        }
        if nets[..i].iter().any(|o| o.iface_id == n.iface_id) {
            return Err(ConfigError::invalid(
                field("iface_id"),
                format!("{:?} is used by another interface", n.iface_id),
            ));
        }
        // Linux interface names: at most 15 bytes, no '/' or whitespace.
        let name_ok = !n.host_dev_name.is_empty()
            && n.host_dev_name.len() <= 15
            && !n
                .host_dev_name
                .contains(|c: char| c == '/' || c.is_whitespace() || c == ':');
        if !name_ok {
            return Err(ConfigError::invalid(
                field("host_dev_name"),
                format!(
                    "{:?} is not a valid network interface name",
                    n.host_dev_name
                ),
            ));
        }
        if nets[..i].iter().any(|o| o.host_dev_name == n.host_dev_name) {
            return Err(ConfigError::invalid(
                field("host_dev_name"),
                format!("{:?} is used by another interface", n.host_dev_name),
            ));
        }
        if let Some(mac) = &n.guest_mac {
            match parse_mac(mac) {
                None => {
                    return Err(ConfigError::invalid(
                        field("guest_mac"),
                        format!("{mac:?} is not a MAC address like 06:00:ac:10:00:02"),
                    ))
                }
                Some(m) if m[0] & 1 == 1 => {
                    return Err(ConfigError::invalid(
                        field("guest_mac"),
                        format!("{mac} is a multicast address"),
                    ))
                }
                Some(_) => {}
            }
            if nets[..i].iter().any(|o| o.mac() == n.mac()) {
                return Err(ConfigError::invalid(
                    field("guest_mac"),
                    format!("{mac} is used by another interface"),
                ));
            }
        }
        if n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
            return Err(ConfigError::invalid(
                field("rx_rate_limiter"),
                "rate limiting is not supported by lockstep".into(),
            ));
        }
    }
    Ok(())
}

fn validate_vsock(v: &VsockConfig) -> Result<(), ConfigError> {
    if v.guest_cid < 3 || v.guest_cid >= u64::from(u32::MAX) {
        return Err(ConfigError::invalid(
            "vsock.guest_cid",
            format!(
                "{} is not a guest CID: 0-2 are reserved and CIDs are 32-bit, 4294967295 meaning any",
                v.guest_cid
            ),
        ));
    }
    let path: &Path = &v.uds_path;
    // sockaddr_un holds 108 bytes, and host ports add "_<port>" (up to 11 more).
    if path.as_os_str().len() > 96 {
        return Err(ConfigError::invalid(
            "vsock.uds_path",
            format!(
                "{} is too long for a Unix socket path (96 bytes at most)",
                path.display()
            ),
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(ConfigError::invalid(
            "vsock.uds_path",
            format!("the directory {} does not exist", parent.display()),
        ));
    }
    if path.exists() {
        return Err(ConfigError::invalid(
            "vsock.uds_path",
            format!(
                "{} already exists; remove it or choose another path",
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{kernel_file, HOST};

    #[test]
    fn firecracker_drives_and_entropy_parse_and_validate() {
        let k = kernel_file();
        let disk = kernel_file();
        let text = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{k}"}},
                "drives": [{{"drive_id": "rootfs", "path_on_host": "{d}", "is_root_device": true,
                             "is_read_only": false, "cache_type": "Writeback", "io_engine": "Sync"}},
                           {{"drive_id": "data", "path_on_host": "{d}", "is_root_device": false, "is_read_only": true}}],
                "entropy": {{}}}}"#,
            k = k.as_path().display(),
            d = disk.as_path().display()
        );
        let c = VmConfig::from_json(&text).unwrap();
        c.validate(&HOST).unwrap();
        assert_eq!(c.drives[0].cache_type, CacheType::Writeback);
        assert!(c.drives[1].is_read_only);
        assert!(c.entropy.is_some());
    }

    #[test]
    fn bad_drives_name_the_entry() {
        let k = kernel_file();
        let disk = kernel_file();
        let base = |drives: &str| {
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "drives": {drives}}}"#,
                k.as_path().display()
            )
        };
        let d = disk.as_path().display();
        for (drives, needle) in [
            (
                format!(
                    r#"[{{"drive_id": "a", "path_on_host": "{d}", "is_root_device": true}}, {{"drive_id": "a", "path_on_host": "{d}", "is_root_device": false}}]"#
                ),
                "drives[1].drive_id",
            ),
            (
                format!(
                    r#"[{{"drive_id": "a", "path_on_host": "{d}", "is_root_device": true}}, {{"drive_id": "b", "path_on_host": "{d}", "is_root_device": true}}]"#
                ),
                "drives[1].is_root_device",
            ),
            (
                r#"[{"drive_id": "a", "path_on_host": "/no/disk", "is_root_device": false}]"#
                    .to_string(),
                "drives[0].path_on_host",
            ),
            (
                format!(
                    r#"[{{"drive_id": "a b", "path_on_host": "{d}", "is_root_device": false}}]"#
                ),
                "drives[0].drive_id",
            ),
            (
                format!(
                    r#"[{{"drive_id": "a", "path_on_host": "{d}", "is_root_device": false, "rate_limiter": {{}}}}]"#
                ),
                "drives[0].rate_limiter",
            ),
        ] {
            let c = VmConfig::from_json(&base(&drives)).unwrap();
            let err = c.validate(&HOST).unwrap_err().to_string();
            assert!(err.starts_with(needle), "{needle}: {err}");
        }
        let missing = base(&format!(r#"[{{"drive_id": "a", "path_on_host": "{d}"}}]"#));
        let err = VmConfig::from_json(&missing).unwrap_err().to_string();
        assert!(
            err.contains("drives[0]") && err.contains("is_root_device"),
            "{err}"
        );
    }

    #[test]
    fn network_interfaces_and_vsock() {
        let k = kernel_file();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let sock = dir.as_path().join("v.sock");
        let text = |nets: &str, vsock: &str| {
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "network-interfaces": {nets}, "vsock": {vsock}}}"#,
                k.as_path().display()
            )
        };
        let good_vsock = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, sock.display());
        let c = VmConfig::from_json(&text(
            r#"[{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}]"#,
            &good_vsock,
        ))
        .unwrap();
        c.validate(&HOST).unwrap();
        assert_eq!(
            c.network_interfaces[0].mac(),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        for (nets, vsock, needle) in [
            (
                r#"[{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00"}]"#,
                good_vsock.clone(),
                "network-interfaces[0].guest_mac",
            ),
            (
                r#"[{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:5e:00:00:01"}]"#,
                good_vsock.clone(),
                "network-interfaces[0].guest_mac",
            ),
            (
                r#"[{"iface_id": "eth0", "host_dev_name": "a-name-far-too-long"}]"#,
                good_vsock.clone(),
                "network-interfaces[0].host_dev_name",
            ),
            (
                r#"[{"iface_id": "e", "host_dev_name": "t0"}, {"iface_id": "e", "host_dev_name": "t1"}]"#,
                good_vsock.clone(),
                "network-interfaces[1].iface_id",
            ),
            (
                r#"[]"#,
                format!(r#"{{"guest_cid": 2, "uds_path": "{}"}}"#, sock.display()),
                "vsock.guest_cid",
            ),
            (
                r#"[]"#,
                r#"{"guest_cid": 3, "uds_path": "/no/such/dir/v.sock"}"#.to_string(),
                "vsock.uds_path",
            ),
        ] {
            let err = VmConfig::from_json(&text(nets, &vsock))
                .unwrap()
                .validate(&HOST)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("aa:bb:cc:dd:ee:ff"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:fg",
            "a:bb:cc:dd:ee:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
