//! What live migration does with a VM's device backends at the switch: the source makes its
//! drives' completed writes durable before the state goes (the destination opens the same
//! images), and the destination announces each network interface's MAC out of its own tap once
//! the VM runs there, so that bridges and switches learn its new port. vsock connections need
//! nothing here: loading the state closes them and sends the guest TRANSPORT_RESET, as a
//! snapshot restore does. The listener's overrides put this host's backends into the arriving
//! config, and a fault-tolerant secondary makes the images it was told to keep.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
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

    /// For a fault-tolerant secondary: makes each image of `drive_overrides` that does not
    /// exist yet, empty (sparse) at the primary's size (`sizes`, in `config`'s drive order), for
    /// the full copy to fill. Only paths this host's operator named are made, never one from the
    /// stream, and nothing already there is touched. Returns what it made, which the caller
    /// removes if the pairing ends without this side taking over; on an error, what it made so
    /// far is removed already.
    pub(crate) fn create_missing_images(
        &self,
        config: &VmConfig,
        sizes: &[u64],
    ) -> Result<Vec<PathBuf>, String> {
        let mut made = Vec::new();
        let result = self.create_each(config, sizes, &mut made);
        if result.is_err() {
            remove_images(&mut made);
        }
        result.map(|()| made)
    }

    fn create_each(
        &self,
        config: &VmConfig,
        sizes: &[u64],
        made: &mut Vec<PathBuf>,
    ) -> Result<(), String> {
        if sizes.len() != config.drives.len() {
            return Err(format!(
                "the primary gave {} image sizes for {} drives",
                sizes.len(),
                config.drives.len()
            ));
        }
        for o in &self.drives {
            let path = &o.path_on_host;
            // A dangling symlink is there too: the config's check then names it.
            if std::fs::symlink_metadata(path).is_ok() {
                continue;
            }
            let Some(size) = config
                .drives
                .iter()
                .position(|d| d.drive_id == o.drive_id)
                .map(|i| sizes[i])
            else {
                continue;
            };
            if size == 0 || size % SECTOR != 0 || size > MAX_IMAGE_BYTES {
                return Err(format!(
                    "the primary's image of drive {:?} is {size} bytes: not a whole number of \
                     sectors from 512 bytes to {MAX_IMAGE_BYTES}",
                    o.drive_id
                ));
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("drive_overrides: cannot create {}: {e}", path.display()))?;
            made.push(path.clone());
            file.set_len(size)
                .map_err(|e| format!("drive_overrides: {}: {e}", path.display()))?;
            log::info!(
                "created {} ({size} bytes) for drive {:?} of the secondary",
                path.display(),
                o.drive_id
            );
        }
        Ok(())
    }
}

/// The largest image a secondary makes for itself (the full copy fills what the primary has).
const MAX_IMAGE_BYTES: u64 = 1 << 46;
const SECTOR: u64 = 512;

/// Removes images [`Overrides::create_missing_images`] made.
pub(crate) fn remove_images(made: &mut Vec<PathBuf>) {
    for path in made.drain(..) {
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!("removed {}, made for a secondary", path.display()),
            Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
        }
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

    #[test]
    fn a_secondary_makes_only_its_missing_images_and_unmakes_them_on_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (there, missing) = (dir.path().join("there.img"), dir.path().join("new.img"));
        std::fs::write(&there, b"keep me").unwrap();
        let config = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "drives": [{"drive_id": "a", "path_on_host": "/src/a.img", "is_root_device": false, "is_read_only": false},
                           {"drive_id": "b", "path_on_host": "/src/b.img", "is_root_device": false, "is_read_only": false}]}"#,
        )
        .unwrap();
        let over = |a: &std::path::Path, b: &std::path::Path| Overrides {
            drives: [("a", a), ("b", b)]
                .into_iter()
                .map(|(id, path)| lockstep_api::migration::DriveOverride {
                    drive_id: id.into(),
                    path_on_host: path.into(),
                })
                .collect(),
            ..Overrides::default()
        };
        let made = over(&there, &missing)
            .create_missing_images(&config, &[4096, 1 << 20])
            .unwrap();
        assert_eq!(made, std::slice::from_ref(&missing));
        assert_eq!(std::fs::read(&there).unwrap(), b"keep me");
        assert_eq!(std::fs::metadata(&missing).unwrap().len(), 1 << 20);
        remove_images(&mut made.clone());
        assert!(!missing.exists());

        // The second image is refused: the first, made already, is removed again.
        let other = dir.path().join("other.img");
        let why = over(&missing, &other)
            .create_missing_images(&config, &[4096, 1000])
            .unwrap_err();
        assert!(why.contains("\"b\"") && why.contains("1000"), "{why}");
        assert!(!missing.exists() && !other.exists());
        let why = over(&missing, &other)
            .create_missing_images(&config, &[4096])
            .unwrap_err();
        assert!(why.contains("1 image sizes for 2 drives"), "{why}");
        let why = over(&dir.path().join("no/such/dir.img"), &other)
            .create_missing_images(&config, &[4096, 4096])
            .unwrap_err();
        assert!(
            why.contains("drive_overrides") && why.contains("no/such"),
            "{why}"
        );
    }
}
