//! lockstep's emulated devices. Device logic lives here, free of KVM: devices see register
//! accesses through [`bus::BusDevice`] and raise interrupts through eventfds that the VMM wires
//! to KVM.

pub mod bus;
pub mod legacy;
mod trigger;

pub use trigger::EventFdTrigger;
