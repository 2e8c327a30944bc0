//! The virtio-mmio transport (virtio 1.2 section 4.2, register layout version 2).
//!
//! [`MmioTransport`] owns the registers and leaves requests to the device. Queue notifications
//! never stop a vCPU in the VMM once the driver has activated the device: at DRIVER_OK the
//! transport registers each queue's doorbell eventfd with the hypervisor as an ioeventfd on
//! QueueNotify (datamatch = queue index), through a [`QueueNotifier`], and unregisters them on
//! reset. The device's interrupt goes out through an eventfd that the VMM made a KVM irqfd.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::INTERRUPT_CONFIG;
use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::GuestMemoryMmap;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the ioeventfds sit.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_SPACE_OFFSET: u64 = 0x100;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4c4b_5354; // "LKST"

/// Registers queue doorbells with the hypervisor.
pub trait QueueNotifier: Send {
    /// Makes a 4-byte write of `queue` to guest address `addr` signal `evt`.
    fn register(&self, evt: &EventFd, addr: u64, queue: u32) -> std::io::Result<()>;
    /// Undoes [`QueueNotifier::register`].
    fn unregister(&self, evt: &EventFd, addr: u64, queue: u32) -> std::io::Result<()>;
}

/// The transport's registers, as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// DeviceFeaturesSel.
    pub features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// Status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
}

/// One virtio device's MMIO window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    notifier: Box<dyn QueueNotifier>,
    base: u64,
    regs: MmioTransportState,
    notifiers_registered: bool,
}

impl MmioTransport {
    /// The transport for `device`, whose window starts at guest address `base`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        notifier: Box<dyn QueueNotifier>,
        base: u64,
    ) -> Self {
        MmioTransport {
            device,
            mem,
            notifier,
            base,
            regs: MmioTransportState::default(),
            notifiers_registered: false,
        }
    }

    fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_status(&self, bits: u32) -> bool {
        self.regs.status & bits == bits
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.has_status(VIRTIO_CONFIG_S_FEATURES_OK)
            && !self.has_status(VIRTIO_CONFIG_S_DRIVER_OK)
            && !self.has_status(VIRTIO_CONFIG_S_FAILED)
    }

    fn with_selected_queue<T>(&self, f: impl FnOnce(&mut virtio_queue::Queue) -> T) -> Option<T> {
        let mut dev = self.device();
        dev.base_mut()
            .queues_mut()
            .get_mut(self.regs.queue_select as usize)
            .map(f)
    }

    fn set_notifiers(&mut self, on: bool) {
        if self.notifiers_registered == on {
            return;
        }
        let addr = self.base + QUEUE_NOTIFY_OFFSET;
        let device = self.device.clone();
        let dev = device.lock().unwrap_or_else(|p| p.into_inner());
        for (i, evt) in dev.base().queue_evts().iter().enumerate() {
            let result = if on {
                self.notifier.register(evt, addr, i as u32)
            } else {
                self.notifier.unregister(evt, addr, i as u32)
            };
            if let Err(e) = result {
                // Without the ioeventfd, QueueNotify still reaches the device through this
                // transport's write path; only slower.
                log::warn!(
                    "virtio-mmio@{:#x}: queue {i} doorbell {}: {e}",
                    self.base,
                    if on { "registration" } else { "removal" }
                );
            }
        }
        self.notifiers_registered = on;
    }

    fn reset(&mut self) {
        self.device().reset();
        self.set_notifiers(false);
        let generation = self.regs.config_generation;
        self.regs = MmioTransportState {
            config_generation: generation,
            ..Default::default()
        };
    }

    fn needs_reset(&mut self) {
        self.regs.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.device().base().interrupt().trigger(INTERRUPT_CONFIG);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.regs.status;
        if value & old != old {
            log::debug!(
                "virtio-mmio@{:#x}: driver cleared status bits ({old:#x} -> {value:#x}); ignored",
                self.base
            );
            return;
        }
        let mut value = value;
        let added = value & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.device().base().acked_features() & VIRTIO_F_VERSION_1 == 0
        {
            // A legacy driver on a modern-only transport: leave FEATURES_OK clear so it sees the
            // refusal when it reads Status back.
            value &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if old & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                return;
            }
            self.regs.status = value;
            self.set_notifiers(true);
            let mem = self.mem.clone();
            let result = self.device().activate(mem);
            if let Err(e) = result {
                let message = format!("virtio-mmio@{:#x}: activation failed: {e}", self.base);
                self.device().base_mut().log_guest_error(&message);
                self.set_notifiers(false);
                self.needs_reset();
            }
            return;
        }
        self.regs.status = value;
    }

    fn read_register(&self, offset: u64) -> u32 {
        let dev = self.device();
        let base = dev.base();
        let queue = base.queues().get(self.regs.queue_select as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => dev.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.regs.features_select {
                0 => base.avail_features() as u32,
                1 => (base.avail_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x44 => queue.map_or(0, |q| u32::from(q.ready())),
            0x60 => base.interrupt().status(),
            0x70 if base.is_broken() => self.regs.status | VIRTIO_CONFIG_S_NEEDS_RESET,
            0x70 => self.regs.status,
            // No shared memory regions: their length reads as all ones.
            0xb0 | 0xb4 => u32::MAX,
            0xfc => self.regs.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.regs.features_select = value,
            0x20 => {
                if self.has_status(VIRTIO_CONFIG_S_DRIVER)
                    && !self.has_status(VIRTIO_CONFIG_S_FEATURES_OK)
                {
                    let mut dev = self.device();
                    let acked = dev.base().acked_features();
                    let features = match self.regs.driver_features_select {
                        0 => (acked & !0xffff_ffff) | u64::from(value),
                        1 => (acked & 0xffff_ffff) | (u64::from(value) << 32),
                        _ => acked,
                    };
                    dev.base_mut().set_acked_features(features);
                }
            }
            0x24 => self.regs.driver_features_select = value,
            0x30 => self.regs.queue_select = value,
            0x38 if self.queue_setup_allowed() => {
                self.with_selected_queue(|q| q.set_size(value as u16));
            }
            0x44 if self.queue_setup_allowed() => {
                self.with_selected_queue(|q| q.set_ready(value == 1));
            }
            0x50 => {
                let dev = self.device();
                match dev.base().queue_evts().get(value as usize) {
                    Some(evt) => {
                        let _ = evt.write(1);
                    }
                    None => log::debug!(
                        "virtio-mmio@{:#x}: notify for missing queue {value}",
                        self.base
                    ),
                }
            }
            0x64 => self.device().base().interrupt().ack(value),
            0x70 => self.write_status(value),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if self.queue_setup_allowed() => {
                let (low, high) = if offset & 4 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                self.with_selected_queue(|q| match offset & !4 {
                    0x80 => q.set_desc_table_address(low, high),
                    0x90 => q.set_avail_ring_address(low, high),
                    _ => q.set_used_ring_address(low, high),
                });
            }
            _ => log::debug!(
                "virtio-mmio@{:#x}: ignored write {value:#x} to register {offset:#x}",
                self.base
            ),
        }
    }

    /// The registers, for a snapshot.
    pub fn save_state(&self) -> MmioTransportState {
        MmioTransportState {
            interrupt_status: self.device().base().interrupt().status(),
            ..self.regs.clone()
        }
    }

    /// Puts the registers back (the device's own state is restored separately).
    pub fn restore_state(&mut self, state: &MmioTransportState) {
        self.regs = state.clone();
        self.device()
            .base()
            .interrupt()
            .set_status(state.interrupt_status);
        self.set_notifiers(self.has_status(VIRTIO_CONFIG_S_DRIVER_OK));
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device()
                .read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            log::debug!(
                "virtio-mmio@{:#x}: {}-byte read at {offset:#x} refused",
                self.base,
                data.len()
            );
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device()
                .write_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if let (4, Ok(bytes)) = (data.len(), <[u8; 4]>::try_from(data)) {
            if offset.is_multiple_of(4) {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
        } else {
            log::debug!(
                "virtio-mmio@{:#x}: {}-byte write at {offset:#x} refused",
                self.base,
                data.len()
            );
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        self.set_notifiers(false);
    }
}

#[cfg(test)]
mod tests;
