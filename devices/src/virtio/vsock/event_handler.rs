//! virtio-vsock on the VM's event loop. Besides activation and the three doorbells it watches
//! the listening socket (while the driver is active), every host socket with just the events
//! its connection can use now, a timer for connection deadlines, and a wake-up eventfd for
//! changes made from the vCPU thread (reset, restore).
//!
//! After every event the watch list is brought in line with the connection table: a socket the
//! device cannot serve (no guest credit, no RX buffer) is not watched for input, so a busy host
//! program cannot make the loop spin, and a closed connection's socket leaves epoll before it is
//! closed.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Vsock;
use crate::virtio::VirtioDevice;

impl Vsock {
    /// Brings epoll's watch list and the timer in line with the connections.
    fn sync_watches(&mut self, ops: &mut EventOps) {
        for stream in self.backend.take_retired() {
            if self.watched.remove(&stream.as_raw_fd()).is_some() {
                let _ = ops.remove(Events::empty(&stream));
            }
        }
        let mut wanted: Vec<_> = self.backend.sockets().collect();
        let listening = self.base().running_memory().is_some();
        wanted.push((
            self.backend.listener_fd(),
            listening.then_some(EventSet::IN),
        ));
        for (fd, events) in wanted {
            let current = self.watched.get(&fd).copied();
            let result = match (current, events) {
                (None, Some(set)) => ops.add(Events::new_raw(fd, set)),
                (Some(old), Some(set)) if old != set => ops.modify(Events::new_raw(fd, set)),
                (Some(_), None) => ops.remove(Events::empty_raw(fd)),
                _ => continue,
            };
            match (result, events) {
                (Ok(()), Some(set)) => {
                    self.watched.insert(fd, set);
                }
                (Ok(()), None) => {
                    self.watched.remove(&fd);
                }
                (Err(e), _) => log::warn!("virtio-vsock: cannot watch socket {fd}: {e}"),
            }
        }
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        let deadline = self.backend.next_deadline();
        if deadline == self.timer_deadline {
            return;
        }
        self.timer_deadline = deadline;
        let result = match deadline {
            // A zero duration would disarm the timer; a passed deadline fires at once.
            Some(d) => self.timer.reset(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            log::warn!("virtio-vsock: cannot arm the connection timer: {e}");
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (what, fd) in [
            ("activation", self.base().activate_evt().as_raw_fd()),
            ("wake-ups", self.wake_evt.as_raw_fd()),
            ("its timer", self.timer.as_raw_fd()),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio-vsock: cannot watch {what}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let now = Instant::now();
        if fd == self.base().activate_evt().as_raw_fd() {
            self.base_mut().watch_queues(ops);
            // Packets may already be waiting (after a restore, or a notify before activation).
            self.process_queues();
        } else if fd == self.wake_evt.as_raw_fd() {
            let _ = self.wake_evt.read();
        } else if fd == self.timer.as_raw_fd() {
            // Non-blocking: nothing to read when the timer was re-armed since it fired.
            let _ = self.timer.wait();
            self.timer_deadline = None;
            self.backend.on_timer(now);
            self.process_queues();
        } else if fd == self.backend.listener_fd() {
            self.backend.accept();
        } else if self.base().doorbell(fd).is_some()
            || self.backend.on_socket_event(fd, events.event_set())
        {
            self.process_queues();
        } else {
            log::debug!("virtio-vsock: event on unknown descriptor {fd}");
            let _ = ops.remove(Events::empty_raw(fd));
            self.watched.remove(&fd);
        }
        self.sync_watches(ops);
    }
}
