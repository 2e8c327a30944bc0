//! A virtio device's interrupt: the InterruptStatus register and the eventfd (a KVM irqfd) that
//! raises the device's IOAPIC pin.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// InterruptStatus bit: a used ring was updated.
pub const INTERRUPT_USED_RING: u32 = 1;
/// InterruptStatus bit: the configuration space changed (or the device needs a reset).
pub const INTERRUPT_CONFIG: u32 = 2;

/// The interrupt line of one virtio device, shared by the transport and the device.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl VirtioInterrupt {
    /// An interrupt with nothing pending, raised through `evt`.
    pub fn new(evt: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::error!("virtio: cannot raise the interrupt: {e}");
        }
    }

    /// InterruptStatus as the guest reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The guest's InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts InterruptStatus back to a saved value (no interrupt is raised).
    pub fn set_status(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// The eventfd that raises the line, for registering with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_sets_status_and_signals_ack_clears() {
        let i = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        i.trigger(INTERRUPT_USED_RING);
        i.trigger(INTERRUPT_CONFIG);
        assert_eq!(i.status(), 3);
        assert_eq!(i.eventfd().read().unwrap(), 2);
        i.ack(INTERRUPT_USED_RING);
        assert_eq!(i.status(), INTERRUPT_CONFIG);
    }
}
