use std::io::Write;
use std::os::unix::net::UnixStream;

use event_manager::{EventManager, SubscriberOps};

use super::*;
use crate::bus::BusDevice;
use crate::EventFdTrigger;

// 8250 registers and bits, as Linux's driver uses them.
const RBR_THR: u64 = 0;
const IER: u64 = 1;
const IIR: u64 = 2;
const LSR: u64 = 5;
const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IIR_NO_INT: u8 = 0x01;
const LSR_DR: u8 = 0x01;

/// The guest's side of COM1, behaving as Linux's 8250 driver does: interrupt driven (it looks
/// at the UART only when its IRQ fires or when IER is written), reading IIR, then LSR, then
/// characters while LSR says data is ready (at most 256 per interrupt), and masking IER around
/// console writes (printk), restoring it afterwards.
struct LinuxDriver {
    serial: Arc<Mutex<SerialDevice>>,
    irq: EventFd,
    ier: u8,
    received: Vec<u8>,
}

impl LinuxDriver {
    fn new(serial: Arc<Mutex<SerialDevice>>, irq: EventFd) -> Self {
        let driver = LinuxDriver {
            serial,
            irq,
            ier: IER_RDI | IER_RLSI,
            received: Vec::new(),
        };
        driver.write(IER, driver.ier);
        driver
    }

    fn read(&self, reg: u64) -> u8 {
        let mut b = [0u8];
        self.serial.lock().unwrap().read(reg, &mut b);
        b[0]
    }

    fn write(&self, reg: u64, value: u8) {
        self.serial.lock().unwrap().write(reg, &[value]);
    }

    /// Runs the interrupt handler if the IRQ fired; true if it did.
    fn interrupt(&mut self) -> bool {
        self.interrupt_while(&mut || {})
    }

    /// [`LinuxDriver::interrupt`], with `host` running between the bytes it reads, as the
    /// VMM's thread does while a vCPU is in the handler.
    fn interrupt_while(&mut self, host: &mut dyn FnMut()) -> bool {
        if self.irq.read().is_err() {
            return false;
        }
        if self.read(IIR) & IIR_NO_INT != 0 {
            return true;
        }
        let mut lsr = self.read(LSR);
        let mut budget = 256;
        while lsr & LSR_DR != 0 && budget > 0 {
            self.received.push(self.read(RBR_THR));
            budget -= 1;
            host();
            lsr = self.read(LSR);
        }
        true
    }

    /// A console write: IER masked, the bytes written, IER restored.
    fn console_write(&mut self, text: &[u8]) {
        self.write(IER, 0);
        for &b in text {
            self.write(RBR_THR, b);
        }
        self.write(IER, self.ier);
    }

    /// The tty layer starting and stopping transmission (echo), as `start_tx`/`stop_tx` do.
    fn toggle_thri(&mut self) {
        self.ier ^= IER_THRI;
        self.write(IER, self.ier);
    }
}

struct Rig {
    mgr: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    serial: Arc<Mutex<SerialDevice>>,
    driver: LinuxDriver,
}

fn rig(input: UnixStream, overflow: Overflow) -> Rig {
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        EventFdTrigger::new(irq.try_clone().unwrap()),
        Box::new(std::io::sink()),
    )));
    input.set_nonblocking(true).unwrap();
    let pump = SerialInput::new(input, serial.clone(), overflow).unwrap();
    let mut mgr = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    mgr.add_subscriber(Arc::new(Mutex::new(pump)));
    let driver = LinuxDriver::new(serial.clone(), irq);
    Rig {
        mgr,
        serial,
        driver,
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn a_paste_reaches_an_interrupt_driven_driver_whole_and_in_order() {
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let mut rig = rig(guest_side, Overflow::Wait);
    let sent = pattern(4096);
    host.write_all(&sent).unwrap();
    // Every step does a bounded amount of work; a stall shows as running out of steps.
    for step in 0..20_000 {
        if rig.driver.received.len() == sent.len() {
            break;
        }
        rig.mgr.run_with_timeout(1).unwrap();
        rig.driver.interrupt();
        // Echo and kernel messages happen while input arrives.
        if step % 7 == 0 {
            rig.driver.console_write(b"echo");
        }
        if step % 5 == 0 {
            rig.driver.toggle_thri();
        }
    }
    assert_eq!(rig.driver.received.len(), sent.len(), "input stalled");
    assert_eq!(rig.driver.received, sent);
}

/// The host refills the FIFO while the driver reads it, so one interrupt could go on for ever;
/// the driver stops after 256 bytes with some left, and must be interrupted again for them.
#[test]
fn a_driver_that_stops_after_256_bytes_gets_the_rest() {
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let mut rig = rig(guest_side, Overflow::Wait);
    let sent = pattern(2000);
    // A few bytes first; the rest arrives once the driver has read one, so the FIFO's
    // refills do not line up with the driver's 256.
    host.write_all(&sent[..10]).unwrap();
    rig.mgr.run_with_timeout(10).unwrap();
    let mut rest = Some(&sent[10..]);
    for _ in 0..2000 {
        if rig.driver.received.len() == sent.len() {
            break;
        }
        rig.mgr.run_with_timeout(1).unwrap();
        let mgr = &mut rig.mgr;
        let host = &mut host;
        rig.driver.interrupt_while(&mut || {
            if let Some(rest) = rest.take() {
                host.write_all(rest).unwrap();
            }
            mgr.run_with_timeout(0).unwrap();
        });
    }
    assert_eq!(rig.driver.received.len(), sent.len(), "input stalled");
    assert_eq!(rig.driver.received, sent);
}

#[test]
fn input_arriving_at_any_pace_is_never_held_back() {
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let mut rig = rig(guest_side, Overflow::Wait);
    let sent = pattern(3000);
    // Pieces of every size up to past the FIFO, each while the FIFO is in some other state.
    let mut at = 0;
    let mut size = 1;
    let mut steps = 0;
    while rig.driver.received.len() < sent.len() {
        if at < sent.len() {
            let end = (at + size).min(sent.len());
            host.write_all(&sent[at..end]).unwrap();
            at = end;
            size = size % 97 + 1;
        }
        rig.mgr.run_with_timeout(1).unwrap();
        // The driver services at most one interrupt between host wake-ups, so the FIFO is
        // often full or part-read when more input arrives.
        rig.driver.interrupt();
        steps += 1;
        assert!(
            steps < 50_000,
            "input stalled at {} of {} bytes",
            rig.driver.received.len(),
            sent.len()
        );
    }
    assert_eq!(rig.driver.received, sent);
}

#[test]
fn a_fifo_with_one_byte_of_room_does_not_end_the_input() {
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let mut rig = rig(guest_side, Overflow::Wait);
    // 63 bytes leave exactly one byte of room in the FIFO.
    host.write_all(&[b'a'; 63]).unwrap();
    rig.mgr.run_with_timeout(10).unwrap();
    assert_eq!(rig.serial.lock().unwrap().input_capacity(), 1);
    host.write_all(b"bcdef").unwrap();
    for _ in 0..100 {
        rig.mgr.run_with_timeout(1).unwrap();
        rig.driver.interrupt();
    }
    let mut expect = vec![b'a'; 63];
    expect.extend_from_slice(b"bcdef");
    assert_eq!(rig.driver.received, expect);
}

#[test]
fn input_that_ends_is_still_delivered() {
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let mut rig = rig(guest_side, Overflow::Wait);
    let sent = pattern(1000);
    host.write_all(&sent).unwrap();
    drop(host);
    for _ in 0..1000 {
        rig.mgr.run_with_timeout(1).unwrap();
        rig.driver.interrupt();
    }
    assert_eq!(rig.driver.received, sent);
}

/// A guest that never reads its UART: the terminal's input keeps being read (so the escape is
/// seen), what does not fit is dropped and counted; a pipe's input waits instead.
#[test]
fn a_guest_that_reads_nothing_holds_back_a_pipe_but_not_a_terminal() {
    for overflow in [Overflow::Drop, Overflow::Wait] {
        let (host, guest_side) = UnixStream::pair().unwrap();
        host.set_nonblocking(true).unwrap();
        let mut rig = rig(guest_side, overflow);
        let chunk = vec![b'x'; 64 << 10];
        let mut written = 0usize;
        for _ in 0..500 {
            match (&host).write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            rig.mgr.run_with_timeout(1).unwrap();
        }
        let dropped = rig
            .serial
            .lock()
            .unwrap()
            .metrics()
            .bytes_in_dropped
            .load(Ordering::Relaxed);
        match overflow {
            Overflow::Drop => {
                assert!(
                    written > 2 * PENDING_MAX,
                    "the terminal was read: {written}"
                );
                assert!(dropped > 0);
            }
            Overflow::Wait => {
                assert!(written < 2 * PENDING_MAX, "the pipe was paced: {written}");
                assert_eq!(dropped, 0);
            }
        }
    }
}
