//! The saved state of every device of a VM, and putting it back into freshly built devices.

use std::sync::Mutex;

use lockstep_devices::legacy::{I8042State, SerialState};
use lockstep_devices::virtio::block::BlockState;
use lockstep_devices::virtio::mmio::MmioTransportState;
use lockstep_devices::virtio::net::NetState;
use lockstep_devices::virtio::rng::RngState;
use lockstep_devices::virtio::vsock::VsockState;
use serde::{Deserialize, Serialize};

use crate::device_manager::{AttachedDevice, DeviceManager};
use crate::memory::GuestMemoryMmap;

/// One virtio device's state: which slot it sat in, its transport registers and its own state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// Base of its MMIO window (checked on restore: the guest knows the device there).
    pub base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// The transport's registers.
    pub transport: MmioTransportState,
    /// The device's own state.
    pub device: DeviceKindState,
}

/// Device-specific saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DeviceKindState {
    /// A drive.
    Block(BlockState),
    /// A network interface.
    Net(NetState),
    /// The socket device.
    Vsock(VsockState),
    /// The entropy device.
    Rng(RngState),
}

/// Every device's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: Option<SerialState>,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// The virtio devices in slot order.
    pub virtio: Vec<VirtioDeviceState>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DeviceManager {
    /// Reads every device's state; the VM must be paused.
    pub fn save_state(&self) -> DevicesState {
        let virtio = self
            .virtio_devices()
            .iter()
            .map(|e| VirtioDeviceState {
                base: e.slot.base,
                irq: e.slot.irq,
                transport: lock(&e.transport).save_state(),
                device: match &e.device {
                    AttachedDevice::Block { device, .. } => {
                        DeviceKindState::Block(lock(device).save_state())
                    }
                    AttachedDevice::Net { device, .. } => {
                        DeviceKindState::Net(lock(device).save_state())
                    }
                    AttachedDevice::Vsock { device, .. } => {
                        DeviceKindState::Vsock(lock(device).save_state())
                    }
                    AttachedDevice::Rng { device, .. } => {
                        DeviceKindState::Rng(lock(device).save_state())
                    }
                },
            })
            .collect();
        DevicesState {
            serial: self.serial().map(|s| lock(s).save_state()),
            i8042: lock(self.i8042()).save_state(),
            virtio,
        }
    }

    /// Puts saved state into devices built from the same config.
    pub fn restore_state(&self, state: &DevicesState, mem: &GuestMemoryMmap) -> Result<(), String> {
        if let (Some(saved), Some(serial)) = (&state.serial, self.serial()) {
            lock(serial)
                .restore_state(saved)
                .map_err(|e| format!("serial: {e}"))?;
        }
        lock(self.i8042()).restore_state(&state.i8042);
        let devices = self.virtio_devices();
        if devices.len() != state.virtio.len() {
            return Err(format!(
                "{} virtio devices saved, the config now has {}",
                state.virtio.len(),
                devices.len()
            ));
        }
        for (i, (saved, entry)) in state.virtio.iter().zip(devices).enumerate() {
            if saved.base != entry.slot.base || saved.irq != entry.slot.irq {
                return Err(format!(
                    "virtio device {i} was at {:#x} IRQ {}, now at {:#x} IRQ {}",
                    saved.base, saved.irq, entry.slot.base, entry.slot.irq
                ));
            }
            let result = match (&saved.device, &entry.device) {
                (DeviceKindState::Block(s), AttachedDevice::Block { device, .. }) => {
                    lock(device).restore_state(s, mem.clone())
                }
                (DeviceKindState::Net(s), AttachedDevice::Net { device, .. }) => {
                    lock(device).restore_state(s, mem.clone())
                }
                (DeviceKindState::Vsock(s), AttachedDevice::Vsock { device, .. }) => {
                    lock(device).restore_state(s, mem.clone())
                }
                (DeviceKindState::Rng(s), AttachedDevice::Rng { device, .. }) => {
                    lock(device).restore_state(s, mem.clone())
                }
                _ => {
                    return Err(format!(
                        "virtio device {i} is of another kind than the one saved"
                    ))
                }
            };
            result.map_err(|e| format!("virtio device {i}: {e}"))?;
            lock(&entry.transport).restore_state(&saved.transport);
        }
        Ok(())
    }
}
