//! lockstep's emulated devices. Device logic lives here, free of KVM: devices see register
//! accesses through [`bus::BusDevice`] and raise interrupts through eventfds that the VMM wires
//! to KVM.

pub mod bus;
pub mod legacy;
pub mod metrics;
mod trigger;
pub mod virtio;

pub use trigger::EventFdTrigger;

/// Guest memory as devices see it: vm-memory mappings with the atomic dirty bitmap, so that
/// every byte a device writes into the guest is recorded for live migration.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
