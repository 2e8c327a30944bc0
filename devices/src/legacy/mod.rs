//! Legacy PC devices on the port I/O bus: the COM1 serial port and the i8042 reset line.

mod i8042;
mod serial;
mod serial_input;

pub use i8042::{I8042State, I8042};
pub use serial::{SerialDevice, SerialMetrics, SerialState, COM1_IRQ, COM1_PORT, SERIAL_PORT_LEN};
pub use serial_input::{InputPump, Overflow, SerialInput};

/// The i8042's keyboard interrupt line (ISA IRQ 1).
pub const I8042_IRQ: u32 = 1;
/// Base port and length of the i8042 keyboard controller (data 0x60, command/status 0x64).
pub const I8042_PORT: u64 = 0x60;
/// Ports owned by the i8042, 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
