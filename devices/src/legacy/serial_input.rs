//! Host input for the serial console, driven by the VM's event loop.

use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::SerialDevice;

/// Most bytes moved from the host to the UART in one go (the 16550A FIFO is 64 bytes).
const CHUNK: usize = 64;

/// Moves bytes from one host file descriptor into COM1's receive FIFO, watching the descriptor
/// only while the FIFO has room: a fast writer is paced by the guest and no byte is dropped.
/// The owner watches the UART's "FIFO drained" eventfd and calls [`InputPump::on_room`].
pub struct InputPump<R: Read + AsRawFd + Send> {
    input: R,
    serial: Arc<Mutex<SerialDevice>>,
    watching_input: bool,
    input_closed: bool,
}

impl<R: Read + AsRawFd + Send> InputPump<R> {
    /// A pump from `input` into `serial`; call [`InputPump::start`] to begin.
    pub fn new(input: R, serial: Arc<Mutex<SerialDevice>>) -> Self {
        InputPump {
            input,
            serial,
            watching_input: false,
            input_closed: false,
        }
    }

    /// The input descriptor.
    pub fn fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }

    /// True once the input has ended (EOF, hang-up or error).
    pub fn is_closed(&self) -> bool {
        self.input_closed
    }

    /// Starts watching the input.
    pub fn start(&mut self, ops: &mut EventOps) {
        self.watch_input(ops, true);
    }

    /// Stops watching the input for good.
    pub fn stop(&mut self, ops: &mut EventOps) {
        self.watch_input(ops, false);
        self.input_closed = true;
    }

    /// The FIFO has room again.
    pub fn on_room(&mut self, ops: &mut EventOps) {
        self.watch_input(ops, true);
    }

    /// An event on the input descriptor.
    pub fn on_input(&mut self, events: &Events, ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            self.pump(ops);
        } else {
            // Hang-up or error with nothing left to read.
            self.stop(ops);
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

    /// Reads what fits in the FIFO; stops watching the input while the FIFO is full.
    fn pump(&mut self, ops: &mut EventOps) {
        let room = self.lock_serial().input_capacity().min(CHUNK);
        if room == 0 {
            self.watch_input(ops, false);
            return;
        }
        let mut buf = [0u8; CHUNK];
        match self.input.read(&mut buf[..room]) {
            Ok(0) => {
                log::debug!("serial: console input closed");
                self.stop(ops);
            }
            Ok(n) => {
                self.lock_serial().enqueue_input(&buf[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => {
                log::warn!("serial: reading console input: {e}");
                self.stop(ops);
            }
        }
    }
}

/// Console input from one descriptor for the life of the VM (stdin, in `lockstep run`).
pub struct SerialInput<R: Read + AsRawFd + Send> {
    pump: InputPump<R>,
    rx_ready: EventFd,
}

impl<R: Read + AsRawFd + Send> SerialInput<R> {
    /// `rx_ready` must be the eventfd given to [`SerialDevice::new`] for this UART.
    pub fn new(input: R, serial: Arc<Mutex<SerialDevice>>, rx_ready: EventFd) -> Self {
        SerialInput {
            pump: InputPump::new(input, serial),
            rx_ready,
        }
    }
}

impl<R: Read + AsRawFd + Send> MutEventSubscriber for SerialInput<R> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.rx_ready, EventSet::IN)) {
            log::warn!("serial: cannot watch the receive FIFO: {e}");
        }
        self.pump.start(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.rx_ready.as_raw_fd() {
            let _ = self.rx_ready.read();
            self.pump.on_room(ops);
        } else if events.fd() == self.pump.fd() {
            self.pump.on_input(&events, ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::EventFdTrigger;

    #[test]
    fn input_paced_by_fifo_space_loses_nothing() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let rx = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new(irq),
            rx.try_clone().unwrap(),
            Box::new(std::io::sink()),
        )));
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        guest_side.set_nonblocking(true).unwrap();
        let input = SerialInput::new(guest_side, serial.clone(), rx);
        let mut mgr = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        mgr.add_subscriber(Arc::new(Mutex::new(input)));

        let sent: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        host.write_all(&sent).unwrap();
        let mut received = Vec::new();
        while received.len() < sent.len() {
            mgr.run_with_timeout(100).unwrap();
            let mut s = serial.lock().unwrap();
            let mut b = [0u8];
            loop {
                use crate::bus::BusDevice;
                s.read(5, &mut b);
                if b[0] & 1 == 0 {
                    break;
                }
                s.read(0, &mut b);
                received.push(b[0]);
            }
        }
        assert_eq!(received, sent);
    }
}
