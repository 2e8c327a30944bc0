//! The guest's serial console: a 16550A UART (vm-superio's 8250 model) on COM1.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::EventFdTrigger;

/// COM1's base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's interrupt line (ISA IRQ 4).
pub const COM1_IRQ: u32 = 4;
/// A UART owns eight ports.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Counters for the serial console, readable while the VM runs.
#[derive(Debug, Default)]
pub struct SerialMetrics {
    /// Bytes the guest wrote to the console.
    pub bytes_out: AtomicU64,
    /// Bytes the guest wrote that could not be delivered to the output.
    pub bytes_lost: AtomicU64,
    /// Bytes of input delivered to the guest.
    pub bytes_in: AtomicU64,
    /// Bytes typed at a terminal while the guest took no input and the host's buffer was full.
    pub bytes_in_dropped: AtomicU64,
}

crate::impl_counters!(SerialMetrics {
    bytes_out,
    bytes_lost,
    bytes_in,
    bytes_in_dropped
});

/// The eventfds of everyone feeding the receive FIFO (the terminal, a console socket client),
/// each signalled when the guest has drained it. Each input source has its own, so one source
/// reading its eventfd cannot hide the wake-up from another.
#[derive(Default)]
struct RoomSignals(Mutex<Vec<EventFd>>);

impl RoomSignals {
    fn signal(&self) {
        let signals = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for evt in signals.iter() {
            // Failing to wake an input source only delays its input until its next event.
            if let Err(e) = evt.write(1) {
                log::warn!("serial: cannot signal receive-FIFO space: {e}");
            }
        }
    }
}

/// Ties vm-superio's serial events to lockstep: counters, and a wake-up for the input sources
/// when the guest has drained the receive FIFO.
struct Events {
    metrics: Arc<SerialMetrics>,
    room: Arc<RoomSignals>,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.metrics.bytes_out.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.metrics.bytes_lost.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        self.room.signal();
    }
}

/// The registers of the UART and the bytes waiting in its receive FIFO: everything the guest
/// can observe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

type Uart = Serial<EventFdTrigger, Events, Box<dyn Write + Send>>;

/// COM1 as the guest sees it, writing the guest's output to a host sink.
pub struct SerialDevice {
    uart: Uart,
    metrics: Arc<SerialMetrics>,
    room: Arc<RoomSignals>,
}

impl SerialDevice {
    /// A UART in its reset state. `interrupt` raises the guest's IRQ.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        let metrics = Arc::new(SerialMetrics::default());
        let room = Arc::new(RoomSignals::default());
        let events = Events {
            metrics: metrics.clone(),
            room: room.clone(),
        };
        SerialDevice {
            uart: Serial::with_events(interrupt, events, out),
            metrics,
            room,
        }
    }

    /// A new eventfd, signalled each time the guest empties the receive FIFO: one per input
    /// source, which waits on it before sending more.
    pub fn room_signal(&self) -> std::io::Result<EventFd> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let ours = evt.try_clone()?;
        self.room
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ours);
        Ok(evt)
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        self.metrics.clone()
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => {
                self.metrics.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                log::warn!("serial: cannot raise the receive interrupt: {e}");
                0
            }
        }
    }

    /// Everything the guest can observe of the UART.
    pub fn save_state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Puts the UART back in a saved state (re-raising any interrupt that was pending).
    pub fn restore_state(&mut self, state: &SerialState) -> std::io::Result<()> {
        let interrupt = self.uart.interrupt_evt().try_clone()?;
        let events = Events {
            metrics: self.metrics.clone(),
            room: self.room.clone(),
        };
        // Swap the sink out rather than reopening it: it is the host's side and not guest state.
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(std::io::sink()));
        self.uart = Serial::from_state(&state.into(), interrupt, events, out).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("serial state: {e}"),
            )
        })?;
        Ok(())
    }
}

/// Register offsets and bits the device looks at itself.
const IER: u8 = 1;
const IIR: u8 = 2;
const IER_RDI: u8 = 0x01;
const IIR_NO_INT: u8 = 0x01;
const IIR_ID_MASK: u8 = 0x0f;
const IIR_RDA: u8 = 0x04;
/// The 16550A's receive FIFO.
const FIFO_SIZE: usize = 64;

impl SerialDevice {
    /// What the guest reads from the interrupt identification register. vm-superio forgets a
    /// received-data interrupt once the guest has read IIR or one byte, even with bytes left in
    /// the FIFO; a 16550's IIR shows it for as long as data is waiting. Linux's driver takes at
    /// most 256 bytes an interrupt and then relies on that: its next interrupt finds IIR saying
    /// "no interrupt" and leaves the rest in the FIFO for good, which stalls console input
    /// whenever the host refills the FIFO while the guest reads it.
    fn read_iir(&mut self) -> u8 {
        let iir = self.uart.read(IIR);
        let data_waiting = self.uart.fifo_capacity() < FIFO_SIZE;
        if iir & IIR_NO_INT != 0 && data_waiting && self.uart.read(IER) & IER_RDI != 0 {
            (iir & !IIR_ID_MASK) | IIR_RDA
        } else {
            iir
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A UART has byte-wide registers; wider accesses read the register and zero the rest.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = if offset == IIR {
                self.read_iir()
            } else {
                self.uart.read(offset)
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // vm-superio flushes each output byte, so a prompt without a newline shows at once.
            // A byte the sink refused is counted in `bytes_lost`.
            if let Err(e) = self.uart.write(offset, value) {
                log::debug!("serial: write to register {offset}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, SharedBuf, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let dev = SerialDevice::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(out.clone()),
        );
        let rx = dev.room_signal().unwrap();
        (dev, out, irq, rx)
    }

    #[test]
    fn output_reaches_the_sink_and_is_counted() {
        let (mut dev, out, _, _) = device();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(dev.metrics().bytes_out.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn input_raises_interrupt_when_enabled_and_signals_drain() {
        let (mut dev, _, irq, rx) = device();
        dev.write(1, &[0x01]); // IER: received-data interrupt.
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        dev.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data-ready");
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'b');
        assert_eq!(rx.read().unwrap(), 1, "FIFO drained");
    }

    /// Bytes left in the FIFO keep IIR showing received data, as on a 16550, even after the
    /// guest read IIR or some of the bytes.
    #[test]
    fn iir_shows_received_data_while_bytes_wait() {
        let (mut dev, _, _, _) = device();
        dev.write(1, &[0x01]); // IER: received-data interrupt.
        let mut b = [0u8];
        dev.read(2, &mut b);
        assert_eq!(b[0] & 0x0f, 0x01, "nothing pending");
        dev.enqueue_input(b"abc");
        dev.read(2, &mut b);
        assert_eq!(b[0] & 0x0f, 0x04);
        dev.read(2, &mut b);
        assert_eq!(b[0] & 0x0f, 0x04, "still data: still pending");
        dev.read(0, &mut b);
        dev.read(2, &mut b);
        assert_eq!(b[0] & 0x0f, 0x04, "two bytes left");
        dev.read(0, &mut b);
        dev.read(0, &mut b);
        dev.read(2, &mut b);
        assert_eq!(b[0] & 0x0f, 0x01, "FIFO empty");
        dev.write(1, &[0x00]); // Masked: no interrupt shown.
        dev.enqueue_input(b"x");
        dev.read(2, &mut b);
        assert_eq!(b[0] & 0x0f, 0x01);
    }

    #[test]
    fn full_fifo_takes_no_more() {
        let (mut dev, _, _, _) = device();
        let cap = dev.input_capacity();
        assert_eq!(dev.enqueue_input(&vec![b'x'; cap + 10]), cap);
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut dev, _, _, _) = device();
        let mut wide = [0xffu8; 4];
        dev.read(300, &mut wide);
        dev.read(2, &mut []);
        dev.write(9999, &[1]);
        dev.write(0, &[]);
    }

    #[test]
    fn state_round_trips() {
        let (mut dev, _, _, _) = device();
        dev.write(3, &[0x83]); // LCR with DLAB.
        dev.write(0, &[0x0c]);
        dev.write(3, &[0x03]);
        dev.write(7, &[0x5a]);
        dev.enqueue_input(b"xyz");
        let saved = dev.save_state();
        let (mut other, _, _, _) = device();
        other.restore_state(&saved).unwrap();
        assert_eq!(other.save_state(), saved);
        let mut b = [0u8];
        other.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        other.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }
}
