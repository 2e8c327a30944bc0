//! virtio-net on the VM's event loop: activation, two doorbells and the tap.
//!
//! The tap is watched edge-triggered. Level-triggered, a readable tap would wake the loop
//! again and again while the guest has no buffer to take its frames; edge-triggered, the
//! kernel wakes it once per arriving frame, and the device always either reads the tap until
//! EAGAIN, or stops because the guest is out of buffers (then the receive doorbell resumes
//! it), or stops at its budget (then it rings its own doorbell). EPOLLOUT is watched only
//! while a frame waits for room in the tap. While reception is moderated (frames arriving
//! back to back, see [`super::moderation`]), the tap is not watched for input: a periodic
//! timer reads it instead.

use std::os::fd::AsRawFd;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{RX_QUEUE, TX_QUEUE};
use super::moderation::TimerChange;
use super::Net;
use crate::virtio::VirtioDevice;

impl Net {
    /// The tap events the device needs now.
    fn wanted_tap_events(&self) -> EventSet {
        let mut events = EventSet::EDGE_TRIGGERED;
        if !self.rx_moderation.is_on() {
            events |= EventSet::IN;
        }
        if self.tx_blocked {
            events |= EventSet::OUT;
        }
        events
    }

    /// Applies a moderation decision to the receive timer (the tap's watch follows at the end
    /// of the event). A timer that cannot be armed leaves reception driven by the tap.
    pub(super) fn change_rx_timer(&mut self, change: TimerChange) {
        let result = match change {
            TimerChange::Keep => return,
            TimerChange::Arm(period) => self.rx_timer.reset(period, Some(period)),
            TimerChange::Stop => self.rx_timer.clear(),
        };
        if let Err(e) = result {
            log::warn!(
                "virtio-net {}: cannot set the receive timer: {e}",
                self.iface_id()
            );
            if self.rx_moderation.stop() == TimerChange::Stop {
                let _ = self.rx_timer.clear();
            }
        }
    }

    /// A receive pass woken by the tap or by the driver.
    fn receive(&mut self) {
        let now = Instant::now();
        let (delivered, drained) = self.process_rx();
        let change = self.rx_moderation.after_woken_pass(now, delivered, drained);
        if let TimerChange::Arm(_) = change {
            self.count_moderation_start();
        }
        self.change_rx_timer(change);
    }

    /// A receive pass on the moderation timer.
    fn receive_tick(&mut self) {
        // Non-blocking: nothing to read when the timer was re-armed since it fired.
        let _ = self.rx_timer.wait();
        if !self.rx_moderation.is_on() {
            // A timer that could not be cleared when moderation ended: try again.
            let _ = self.rx_timer.clear();
            return;
        }
        let (delivered, _) = self.process_rx();
        self.count_moderated_frames(delivered);
        let change = self.rx_moderation.after_tick(delivered);
        self.change_rx_timer(change);
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
        for (what, fd) in [
            ("activation", self.base().activate_evt().as_raw_fd()),
            ("its receive timer", self.rx_timer.as_raw_fd()),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio-net {}: cannot watch {what}: {e}", self.iface_id());
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.base().activate_evt().as_raw_fd() {
            self.base_mut().watch_queues(ops);
            // Frames may be queued in the tap, or chains in the rings after a restore.
            self.receive();
            self.process_tx();
        } else if fd == self.rx_timer.as_raw_fd() {
            self.receive_tick();
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
                self.receive();
            }
        } else {
            match self.base().doorbell(fd) {
                Some(RX_QUEUE) => self.receive(),
                Some(TX_QUEUE) => self.process_tx(),
                _ => {}
            }
        }
        if self.base().is_activated() || self.tap_events.is_some() {
            self.watch_tap(ops);
        }
    }
}
