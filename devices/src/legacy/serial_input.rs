//! Host input for the serial console, driven by the VM's event loop.
//!
//! Input is read from its descriptor into a host-side buffer as it comes, and moved from there
//! into COM1's 64-byte receive FIFO whenever the guest has emptied it. Reading never waits for
//! the guest, so a paste of any size arrives whole and in order, and a terminal's escape key is
//! always read, whatever the guest does with its UART.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::SerialDevice;

/// Bytes read from the input in one go.
const READ_CHUNK: usize = 4096;
/// Most reads for one readiness event, so one busy input cannot hold up the event loop.
const READS_PER_EVENT: usize = 16;
/// Most input held on the host while the guest has not taken it.
const PENDING_MAX: usize = 1 << 20;

/// What an input pump does when the guest leaves [`PENDING_MAX`] bytes untaken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Stop reading until the guest takes some: a program writing into a pipe or socket is
    /// paced by the guest and nothing is lost.
    Wait,
    /// Keep reading and drop what does not fit (as a UART overruns), counted in
    /// `bytes_in_dropped`: a person at a terminal must always reach the console escape.
    Drop,
}

/// Moves bytes from one host file descriptor into COM1's receive FIFO. The owner watches the
/// UART's room signal (see [`SerialDevice::room_signal`]) and calls [`InputPump::on_room`].
pub struct InputPump<R: Read + AsRawFd + Send> {
    input: R,
    serial: Arc<Mutex<SerialDevice>>,
    overflow: Overflow,
    /// Read from the input, not yet in the FIFO.
    pending: VecDeque<u8>,
    watching_input: bool,
    input_closed: bool,
}

impl<R: Read + AsRawFd + Send> InputPump<R> {
    /// A pump from `input` into `serial`; call [`InputPump::start`] to begin.
    pub fn new(input: R, serial: Arc<Mutex<SerialDevice>>, overflow: Overflow) -> Self {
        InputPump {
            input,
            serial,
            overflow,
            pending: VecDeque::new(),
            watching_input: false,
            input_closed: false,
        }
    }

    /// Input read before, not yet in the FIFO (another process's pump, handed over by a
    /// same-host migration), to go to the guest first; at most the pending limit is kept.
    pub fn preload(&mut self, bytes: &[u8]) {
        let room = PENDING_MAX.saturating_sub(self.pending.len());
        self.pending.extend(&bytes[..bytes.len().min(room)]);
    }

    /// What was read from the input and has not reached the FIFO yet.
    pub fn pending(&self) -> Vec<u8> {
        self.pending.iter().copied().collect()
    }

    /// The input descriptor.
    pub fn fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }

    /// True once the input has ended (EOF, hang-up or error).
    pub fn is_closed(&self) -> bool {
        self.input_closed
    }

    /// True once the input has ended and everything read from it has reached the FIFO.
    pub fn is_finished(&self) -> bool {
        self.input_closed && self.pending.is_empty()
    }

    /// Starts watching the input.
    pub fn start(&mut self, ops: &mut EventOps) {
        self.watch_input(ops, true);
    }

    /// Stops reading the input for good; what was read still goes to the guest.
    pub fn stop(&mut self, ops: &mut EventOps) {
        self.watch_input(ops, false);
        self.input_closed = true;
    }

    /// The guest emptied the FIFO: give it more, and read again if reading had stopped.
    pub fn on_room(&mut self, ops: &mut EventOps) {
        self.feed();
        if self.pending.len() < PENDING_MAX {
            self.watch_input(ops, true);
        }
    }

    /// An event on the input descriptor.
    pub fn on_input(&mut self, events: &Events, ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            self.read_input(ops);
        } else {
            // Hang-up or error with nothing left to read.
            self.stop(ops);
        }
        self.feed();
        if self.overflow == Overflow::Wait && self.pending.len() >= PENDING_MAX {
            self.watch_input(ops, false);
        }
    }

    fn watch_input(&mut self, ops: &mut EventOps, on: bool) {
        if self.input_closed || self.watching_input == on {
            return;
        }
        let events = Events::new_raw(self.input.as_raw_fd(), EventSet::IN);
        let result = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.watching_input = on,
            Err(e) => {
                // stdin may be a regular file or /dev/null, which epoll cannot watch.
                log::info!("serial: console input unavailable ({e}); the guest gets no input");
                self.input_closed = true;
            }
        }
    }

    fn lock_serial(&self) -> std::sync::MutexGuard<'_, SerialDevice> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads what the input has, a few chunks at most, into the pending buffer.
    fn read_input(&mut self, ops: &mut EventOps) {
        for _ in 0..READS_PER_EVENT {
            let room = PENDING_MAX.saturating_sub(self.pending.len());
            let want = match self.overflow {
                Overflow::Wait if room == 0 => return,
                Overflow::Wait => room.min(READ_CHUNK),
                Overflow::Drop => READ_CHUNK,
            };
            let mut buf = [0u8; READ_CHUNK];
            match self.input.read(&mut buf[..want]) {
                Ok(0) => {
                    log::debug!("serial: console input closed");
                    self.stop(ops);
                    return;
                }
                Ok(n) => {
                    let kept = n.min(room);
                    self.pending.extend(&buf[..kept]);
                    if kept < n {
                        self.count_dropped((n - kept) as u64);
                    }
                    if n < want {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("serial: reading console input: {e}");
                    self.stop(ops);
                    return;
                }
            }
        }
    }

    fn count_dropped(&self, bytes: u64) {
        let metrics = self.lock_serial().metrics();
        if metrics.bytes_in_dropped.fetch_add(bytes, Ordering::Relaxed) == 0 {
            log::warn!("serial: the guest is not reading its console; dropping typed input");
        }
    }

    /// Moves what fits from the pending buffer into the FIFO.
    fn feed(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let (front, _) = self.pending.as_slices();
        let taken = self.lock_serial().enqueue_input(front);
        self.pending.drain(..taken);
    }
}

/// Console input from one descriptor for the life of the VM (stdin, in `lockstep run`).
pub struct SerialInput<R: Read + AsRawFd + Send> {
    pump: InputPump<R>,
    room: EventFd,
}

impl<R: Read + AsRawFd + Send> SerialInput<R> {
    /// Input from `input` into `serial`, with a room signal of its own.
    pub fn new(
        input: R,
        serial: Arc<Mutex<SerialDevice>>,
        overflow: Overflow,
    ) -> std::io::Result<Self> {
        let room = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .room_signal()?;
        Ok(SerialInput {
            pump: InputPump::new(input, serial, overflow),
            room,
        })
    }
}

impl<R: Read + AsRawFd + Send> MutEventSubscriber for SerialInput<R> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.room, EventSet::IN)) {
            log::warn!("serial: cannot watch the receive FIFO: {e}");
        }
        self.pump.start(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.room.as_raw_fd() {
            let _ = self.room.read();
            self.pump.on_room(ops);
        } else if events.fd() == self.pump.fd() {
            self.pump.on_input(&events, ops);
        }
    }
}

#[cfg(test)]
mod tests;
