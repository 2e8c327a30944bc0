//! The resources a Firecracker client configures before `InstanceStart`: gathered here while
//! the VM does not exist on the host yet, or the config of a VM that is defined but not running,
//! taken from the host, changed and given back.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::{
    BootSource, FirecrackerExtras, HostLimits, MachineConfig, SerialConfig, VmConfig,
};
use crate::devices::{DriveConfig, EntropyConfig, NetConfig, VsockConfig};
use crate::error::ConfigError;

/// The pre-boot resources so far; serialized, it is what `GET /vm/config` shows before boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct PendingConfig {
    #[serde(rename = "boot-source", skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    pub drives: Vec<DriveConfig>,
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NetConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// lockstep's serial section (Firecracker's `PUT /serial` sets its output path).
    #[serde(skip)]
    pub serial: SerialConfig,
    /// Firecracker sections of a host VM's config, kept as they were.
    #[serde(skip)]
    pub firecracker: FirecrackerExtras,
}

impl PendingConfig {
    /// Nothing configured yet (a snapshot may only be loaded then).
    pub(crate) fn is_empty(&self) -> bool {
        *self == PendingConfig::default()
    }

    /// Adds a drive, or replaces the one with the same id (Firecracker's update).
    pub(crate) fn put_drive(&mut self, drive: DriveConfig) {
        match self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == drive.drive_id)
        {
            Some(existing) => *existing = drive,
            None => self.drives.push(drive),
        }
    }

    /// Adds a network interface, or replaces the one with the same id.
    pub(crate) fn put_interface(&mut self, iface: NetConfig) {
        let existing = self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == iface.iface_id);
        match existing {
            Some(existing) => *existing = iface,
            None => self.network_interfaces.push(iface),
        }
    }

    /// `PATCH /machine-config`: the fields given replace the current ones.
    pub(crate) fn patch_machine_config(&mut self, patch: &[u8]) -> Result<(), ConfigError> {
        let patch: serde_json::Map<String, serde_json::Value> =
            crate::http::parse_json_body(patch)?;
        // The current config always serializes to an object of plain values.
        let mut merged = match serde_json::to_value(&self.machine_config) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        merged.extend(patch);
        let text = serde_json::Value::Object(merged).to_string();
        self.machine_config = crate::http::parse_json_body(text.as_bytes())?;
        Ok(())
    }

    /// The VM config to create, named `name`; `None` until a boot source is set.
    pub(crate) fn to_vm_config(&self, name: &str) -> Option<VmConfig> {
        Some(VmConfig {
            boot_source: self.boot_source.clone()?,
            machine_config: self.machine_config.clone(),
            drives: self.drives.clone(),
            network_interfaces: self.network_interfaces.clone(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.clone(),
            name: Some(name.to_string()),
            serial: self.serial.clone(),
            firecracker: self.firecracker.clone(),
        })
    }

    /// A defined VM's config, to be changed and given back with `update_vm`.
    pub(crate) fn from_vm_config(config: &VmConfig) -> PendingConfig {
        PendingConfig {
            boot_source: Some(config.boot_source.clone()),
            machine_config: config.machine_config.clone(),
            drives: config.drives.clone(),
            network_interfaces: config.network_interfaces.clone(),
            vsock: config.vsock.clone(),
            entropy: config.entropy.clone(),
            serial: config.serial.clone(),
            firecracker: config.firecracker.clone(),
        }
    }

    /// Checks the section just changed, as Firecracker checks each resource when it is put.
    /// The whole config is validated (devices are checked against each other), but only an
    /// error in `section` counts: others are reported when their own section is put, and the
    /// host checks everything again at `InstanceStart`. Validation stops at the first error, in
    /// the order of [`VmConfig::validate`] (machine, boot source, devices, serial), so without a
    /// usable boot source the sections after it are left to `InstanceStart`.
    pub(crate) fn check_section(
        &self,
        name: &str,
        section: &str,
        limits: &HostLimits,
    ) -> Result<(), ConfigError> {
        let mut candidate = self.clone();
        // Without a boot source, a stand-in that fails its own check (not this section's).
        candidate.boot_source.get_or_insert_with(|| BootSource {
            kernel_image_path: PathBuf::new(),
            boot_args: None,
            initrd_path: None,
            boot_protocol: Default::default(),
        });
        let Some(config) = candidate.to_vm_config(name) else {
            return Ok(());
        };
        match config.validate(limits) {
            Err(e) if e.field().is_some_and(|f| in_section(f, section)) => Err(e),
            _ => Ok(()),
        }
    }
}

/// Whether a field path (`drives[0].path_on_host`) lies in a section (`drives`).
fn in_section(field: &str, section: &str) -> bool {
    field
        .strip_prefix(section)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, path: &str) -> DriveConfig {
        serde_json::from_value(serde_json::json!({
            "drive_id": id, "path_on_host": path, "is_root_device": false
        }))
        .unwrap()
    }

    #[test]
    fn drives_are_replaced_by_id() {
        let mut p = PendingConfig::default();
        assert!(p.is_empty());
        p.put_drive(drive("a", "/1"));
        p.put_drive(drive("b", "/2"));
        p.put_drive(drive("a", "/3"));
        let paths: Vec<_> = p.drives.iter().map(|d| d.path_on_host.clone()).collect();
        assert_eq!(paths, [PathBuf::from("/3"), PathBuf::from("/2")]);
        assert!(!p.is_empty());
    }

    #[test]
    fn machine_config_patch_keeps_other_fields() {
        let mut p = PendingConfig::default();
        p.patch_machine_config(br#"{"vcpu_count": 4}"#).unwrap();
        p.patch_machine_config(br#"{"smt": true}"#).unwrap();
        assert_eq!(p.machine_config.vcpu_count, 4);
        assert_eq!(p.machine_config.mem_size_mib, 128);
        assert!(p.machine_config.smt);
        let err = p.patch_machine_config(br#"{"vcpus": 4}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpus`"), "{err}");
        assert_eq!(
            p.machine_config.vcpu_count, 4,
            "a refused patch changes nothing"
        );
    }

    #[test]
    fn sections_match_their_fields() {
        assert!(in_section("drives", "drives"));
        assert!(in_section("drives[0].path_on_host", "drives"));
        assert!(in_section("machine-config.vcpu_count", "machine-config"));
        assert!(!in_section("machine-configs", "machine-config"));
        assert!(!in_section("boot-source.kernel_image_path", "drives"));
    }

    #[test]
    fn only_the_section_put_is_checked() {
        let limits = HostLimits {
            mem_mib: 1024,
            max_vcpus: 32,
        };
        let mut p = PendingConfig::default();
        p.put_drive(drive("rootfs", "/no/such/image"));
        // No boot source yet: the machine is checked, the devices (checked after the kernel)
        // are left for later.
        assert!(p.check_section("vm", "drives", &limits).is_ok());
        p.machine_config.vcpu_count = 64;
        let err = p
            .check_section("vm", "machine-config", &limits)
            .unwrap_err();
        assert_eq!(err.field(), Some("machine-config.vcpu_count"));
        p.machine_config.vcpu_count = 1;
        p.boot_source = Some(BootSource {
            kernel_image_path: "/no/such/kernel".into(),
            boot_args: None,
            initrd_path: None,
            boot_protocol: Default::default(),
        });
        let err = p.check_section("vm", "boot-source", &limits).unwrap_err();
        assert_eq!(err.field(), Some("boot-source.kernel_image_path"));
        // The kernel's problem is not the drives' (their own check comes after it).
        assert!(p.check_section("vm", "drives", &limits).is_ok());
        let config = p.to_vm_config("vm").unwrap();
        assert_eq!(config.name.as_deref(), Some("vm"));
        assert_eq!(config.drives.len(), 1);
        assert_eq!(
            PendingConfig::from_vm_config(&config),
            p,
            "a round trip keeps everything"
        );
    }
}
