//! What live migration does with a VM's device backends at the switch: the source makes its
//! drives' completed writes durable before the state goes (the destination opens the same
//! images), and the destination announces each network interface's MAC out of its own tap once
//! the VM runs there, so that bridges and switches learn its new port. vsock connections need
//! nothing here: loading the state closes them and sends the guest TRANSPORT_RESET, as a
//! snapshot restore does.

use std::time::Duration;

use lockstep_api::migration::{NetworkOverride, VsockOverride};
use lockstep_api::VmConfig;
use lockstep_devices::virtio::net::Announcer;

use crate::device_manager::{AttachedDevice, DeviceManager};

/// When the announcements go, counted from the VM's start: as QEMU's defaults (five rounds,
/// 50 ms before the second, each gap 100 ms longer than the one before).
const ANNOUNCE_AT_MS: [u64; 5] = [0, 50, 200, 450, 800];

/// Makes every writable drive's completed writes durable (`fdatasync`, whatever the cache
/// mode). The VM is paused, or about to be: requests are served whole on the event loop, so
/// a paused VM has none half-done and a flush after the pause covers every write the guest
/// saw complete.
pub(crate) fn flush_drives(devices: &DeviceManager) -> Result<(), String> {
    for entry in devices.virtio_devices() {
        if let AttachedDevice::Block { id, device, .. } = &entry.device {
            let block = device.lock().unwrap_or_else(|p| p.into_inner());
            block
                .sync_for_handover()
                .map_err(|e| format!("cannot flush drive {id}: {e}"))?;
        }
    }
    Ok(())
}

/// An announcer for every network interface whose guest MAC the config gives (the others are
/// logged: nothing can announce an address the device never learns).
pub(crate) fn announcers(vm: &str, devices: &DeviceManager) -> Vec<Announcer> {
    let mut out = Vec::new();
    for entry in devices.virtio_devices() {
        if let AttachedDevice::Net { id, device, .. } = &entry.device {
            let net = device.lock().unwrap_or_else(|p| p.into_inner());
            match net.announcer() {
                Ok(Some(a)) => out.push(a),
                Ok(None) => log::info!(
                    "{vm}: interface {id} has no guest_mac in its config: it is not announced"
                ),
                Err(e) => log::warn!("{vm}: interface {id}: cannot announce: {e}"),
            }
        }
    }
    out
}

/// Sends the announcements on a thread of their own (the VM runs meanwhile); returns at once.
pub(crate) fn announce(vm: &str, announcers: Vec<Announcer>) {
    if announcers.is_empty() {
        return;
    }
    let name = vm.to_string();
    let spawned = super::spawn_thread(format!("announce-{vm}"), move || {
        let start = std::time::Instant::now();
        for at in ANNOUNCE_AT_MS {
            let due = Duration::from_millis(at);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            for a in &announcers {
                if let Err(e) = a.send() {
                    log::debug!("{name}: announcing on tap {}: {e}", a.tap_name());
                }
            }
        }
        log::debug!("{name}: announced on {} interface(s)", announcers.len());
    });
    if let Err(e) = spawned {
        log::warn!("{vm}: cannot start announcing the VM's interfaces: {e}");
    }
}

/// What the destination's listener was told to use instead of the source's backends.
#[derive(Debug, Default)]
pub(crate) struct Overrides {
    /// Taps by interface id.
    pub nets: Vec<NetworkOverride>,
    /// The vsock socket's path.
    pub vsock: Option<VsockOverride>,
    /// Images by drive id.
    pub drives: Vec<lockstep_api::migration::DriveOverride>,
}

impl Overrides {
    /// True when the listener overrides nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.vsock.is_none() && self.drives.is_empty()
    }

    /// Puts the overrides into an arriving VM's config (which is validated afterwards, as a
    /// new VM's); an override naming what the config does not have is refused.
    pub(crate) fn apply(&self, config: &mut VmConfig) -> Result<(), String> {
        for o in &self.nets {
            let net = config
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == o.iface_id)
                .ok_or_else(|| {
                    format!(
                        "network_overrides: the VM has no interface {:?}",
                        o.iface_id
                    )
                })?;
            net.host_dev_name = o.host_dev_name.clone();
        }
        for o in &self.drives {
            let drive = config
                .drives
                .iter_mut()
                .find(|d| d.drive_id == o.drive_id)
                .ok_or_else(|| format!("drive_overrides: the VM has no drive {:?}", o.drive_id))?;
            drive.path_on_host = o.path_on_host.clone();
        }
        if let Some(o) = &self.vsock {
            let vsock = config
                .vsock
                .as_mut()
                .ok_or("vsock_override: the VM has no vsock device")?;
            vsock.uds_path = o.uds_path.clone();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"},
                                       {"iface_id": "eth1", "host_dev_name": "tap1"}],
                "vsock": {"guest_cid": 3, "uds_path": "/run/a.sock"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn overrides_replace_the_named_backends_only() {
        let mut c = config();
        let o = Overrides {
            nets: vec![NetworkOverride {
                iface_id: "eth1".into(),
                host_dev_name: "here1".into(),
            }],
            vsock: Some(VsockOverride {
                uds_path: "/run/b.sock".into(),
            }),
            drives: vec![],
        };
        o.apply(&mut c).unwrap();
        let taps: Vec<&str> = c
            .network_interfaces
            .iter()
            .map(|n| n.host_dev_name.as_str())
            .collect();
        assert_eq!(taps, ["tap0", "here1"]);
        assert_eq!(
            c.vsock.unwrap().uds_path,
            std::path::Path::new("/run/b.sock")
        );
        Overrides::default().apply(&mut config()).unwrap();
    }

    #[test]
    fn an_override_for_what_the_vm_lacks_is_refused() {
        let o = Overrides {
            nets: vec![NetworkOverride {
                iface_id: "eth9".into(),
                host_dev_name: "x".into(),
            }],
            vsock: None,
            drives: vec![],
        };
        assert!(o.apply(&mut config()).unwrap_err().contains("eth9"));
        let o = Overrides {
            drives: vec![lockstep_api::migration::DriveOverride {
                drive_id: "nope".into(),
                path_on_host: "/x".into(),
            }],
            ..Overrides::default()
        };
        let why = o.apply(&mut config()).unwrap_err();
        assert!(
            why.contains("drive_overrides") && why.contains("nope"),
            "{why}"
        );
        let mut c = config();
        c.vsock = None;
        let o = Overrides {
            nets: vec![],
            vsock: Some(VsockOverride {
                uds_path: "/x".into(),
            }),
            drives: vec![],
        };
        assert!(o.apply(&mut c).unwrap_err().contains("vsock"));
    }
}
