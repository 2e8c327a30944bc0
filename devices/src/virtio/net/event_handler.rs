//! virtio-net on the VM's event loop: activation, two doorbells and the tap.
//!
//! The tap is watched edge-triggered. Level-triggered, a readable tap would wake the loop
//! again and again while the guest has no buffer to take its frames; edge-triggered, the
//! kernel wakes it once per arriving frame, and the device always either reads the tap until
//! EAGAIN, or stops because the guest is out of buffers (then the receive doorbell resumes
//! it), or stops at its budget (then it rings its own doorbell). EPOLLOUT is watched only
//! while a frame waits for room in the tap.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{RX_QUEUE, TX_QUEUE};
use super::Net;
use crate::virtio::VirtioDevice;

impl Net {
    /// The tap events the device needs now.
    fn wanted_tap_events(&self) -> EventSet {
        let mut events = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if self.tx_blocked {
            events |= EventSet::OUT;
        }
        events
    }

    /// Starts watching the tap (once, at the first activation) or updates what is watched.
    fn watch_tap(&mut self, ops: &mut EventOps) {
        let wanted = self.wanted_tap_events();
        let result = match self.tap_events {
            None => ops.add(Events::new(&self.tap, wanted)),
            Some(current) if current != wanted => ops.modify(Events::new(&self.tap, wanted)),
            Some(_) => return,
        };
        match result {
            Ok(()) => self.tap_events = Some(wanted),
            Err(e) => log::error!(
                "virtio-net {}: cannot watch tap {}: {e}",
                self.iface_id(),
                self.tap.name()
            ),
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.base().activate_evt(), EventSet::IN)) {
            log::error!(
                "virtio-net {}: cannot watch activation: {e}",
                self.iface_id()
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.base().activate_evt().as_raw_fd() {
            self.base_mut().watch_queues(ops);
            // Frames may be queued in the tap, or chains in the rings after a restore.
            self.process_rx();
            self.process_tx();
        } else if fd == self.tap.as_raw_fd() {
            let set = events.event_set();
            let failed = set.intersects(EventSet::ERROR | EventSet::HANG_UP);
            if failed {
                log::debug!(
                    "virtio-net {}: tap {} reports {set:?}",
                    self.iface_id(),
                    self.tap.name()
                );
            }
            if set.contains(EventSet::OUT) || failed {
                self.tx_blocked = false;
                self.process_tx();
            }
            if set.contains(EventSet::IN) || failed {
                self.process_rx();
            }
        } else {
            match self.base().doorbell(fd) {
                Some(RX_QUEUE) => self.process_rx(),
                Some(TX_QUEUE) => self.process_tx(),
                _ => {}
            }
        }
        if self.base().is_activated() || self.tap_events.is_some() {
            self.watch_tap(ops);
        }
    }
}
