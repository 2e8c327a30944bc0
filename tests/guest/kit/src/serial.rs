//! Polled 8250/16550 UART driver for COM1 (I/O port 0x3f8, ISA IRQ 4). Output is polled; input is
//! read when the line-status register says a byte is there, and the receive interrupt can be enabled
//! so that a reader sleeps until a byte arrives instead of spinning.

use crate::io::{inb, outb};

/// A UART at an I/O port base.
pub struct Uart {
    base: u16,
}

/// The first serial port, which carries the report and the monitor.
pub const COM1: Uart = Uart { base: 0x3f8 };

const THR: u16 = 0; // transmit holding (write), receive buffer (read)
const IER: u16 = 1; // interrupt enable; with DLAB: divisor high
const FCR: u16 = 2; // FIFO control
const LCR: u16 = 3; // line control
const MCR: u16 = 4; // modem control
const LSR: u16 = 5; // line status

const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
const FCR_ENABLE_AND_CLEAR: u8 = 0x07;
const MCR_DTR_RTS_OUT2: u8 = 0x0b; // OUT2 gates the interrupt line on PC-compatible boards
const IER_RX_AVAILABLE: u8 = 0x01;
const LSR_DATA_READY: u8 = 0x01;

impl Uart {
    /// Sets 115200 baud 8N1 with FIFOs on and interrupts off.
    pub fn init(&self) {
        outb(self.base + IER, 0);
        outb(self.base + LCR, LCR_DLAB);
        outb(self.base + THR, 1); // divisor 1: 115200 baud
        outb(self.base + IER, 0);
        outb(self.base + LCR, LCR_8N1);
        outb(self.base + FCR, FCR_ENABLE_AND_CLEAR);
        outb(self.base + MCR, MCR_DTR_RTS_OUT2);
    }

    /// Makes the UART raise its interrupt line while received data is waiting.
    pub fn enable_rx_interrupt(&self) {
        outb(self.base + IER, IER_RX_AVAILABLE);
    }

    /// Sends bytes, waiting for the transmitter before each FIFO-sized burst. The work is done by a
    /// CPL0 service (see [`crate::cpu::uart_write`]), where port access is cheaper on PVM.
    pub fn write_bytes(&self, bytes: &[u8]) {
        crate::cpu::uart_write(self.base, bytes);
    }

    /// Returns a received byte if one is waiting.
    pub fn try_read(&self) -> Option<u8> {
        if inb(self.base + LSR) & LSR_DATA_READY != 0 {
            Some(inb(self.base + THR))
        } else {
            None
        }
    }
}
