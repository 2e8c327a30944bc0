//! Virtio 1.x devices and their virtio-mmio transport.
//!
//! A device ([`VirtioDevice`]) knows its requests; the transport ([`mmio::MmioTransport`]) knows
//! the registers. Queues come from the virtio-queue crate. Every device keeps what the guest can
//! observe in a serde state type, saved and restored the same way for snapshots, live migration
//! and FT.

pub mod block;
mod device;
mod interrupt;
pub mod mmio;
pub mod net;
mod queue_state;
pub mod rng;
pub mod vsock;

pub use device::{ActivateError, DeviceBase, DeviceBaseState, VirtioDevice};
pub use interrupt::{VirtioInterrupt, INTERRUPT_CONFIG, INTERRUPT_USED_RING};
pub use queue_state::SavedQueue;

/// Device type numbers (virtio 1.2, section 5).
pub mod types {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Feature bit: the device follows virtio 1.x (required on the modern virtio-mmio transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: used_event / avail_event notification suppression.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
