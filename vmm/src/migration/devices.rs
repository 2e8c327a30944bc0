//! What live migration does with a VM's device backends at the switch: the source makes its
//! drives' completed writes durable before the state goes (the destination opens the same
//! images), and the destination announces each network interface's MAC out of its own tap once
//! the VM runs there, so that bridges and switches learn its new port. vsock connections need
//! nothing here: loading the state closes them and sends the guest TRANSPORT_RESET, as a
//! snapshot restore does.

use std::time::Duration;

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
