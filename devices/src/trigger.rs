//! An interrupt line backed by an eventfd (registered with KVM as an irqfd by the VMM).

use std::io;
use std::ops::Deref;

use vmm_sys_util::eventfd::EventFd;

/// An eventfd that vm-superio devices use to raise an interrupt or signal an event.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an eventfd.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// A second handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}
