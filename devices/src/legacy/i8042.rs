//! The i8042 keyboard controller, with just enough of a keyboard behind it for two jobs: its
//! "pulse reset line" command (0xFE on port 0x64) is how a guest asks for a reset, which ends a
//! lockstep VM; and the VMM can press Ctrl-Alt-Del on the keyboard so that a cooperating guest
//! shuts down. vm-superio's i8042 has only the reset line, so this one is lockstep's own.
//!
//! The controller answers the commands Linux's i8042 driver uses while probing (self-test,
//! interface test, reading and writing the command byte and the output port), has no auxiliary
//! (mouse) port, and delivers keyboard bytes through its output buffer with IRQ 1. Scancodes are
//! set 2, untranslated: the command byte starts without the translation bit.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::EventFdTrigger;

const DATA_PORT_OFFSET: u64 = 0;
const COMMAND_PORT_OFFSET: u64 = 4;

/// Status register bits.
const SR_OUTPUT_FULL: u8 = 0x01;
const SR_SYSTEM_FLAG: u8 = 0x04;
const SR_LAST_WAS_COMMAND: u8 = 0x08;
const SR_KEYBOARD_UNLOCKED: u8 = 0x10;

/// Command byte bits.
const CB_KBD_INTERRUPT: u8 = 0x01;
const CB_SYSTEM_FLAG: u8 = 0x04;

/// Keyboard answers.
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;

/// Bytes the output buffer may hold before keys are dropped (a guest that never reads it must
/// not make the VMM's memory grow).
const MAX_PENDING: usize = 64;

/// Ctrl, Alt and Delete pressed and released, in scancode set 2.
const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// The controller's guest-visible state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The command byte.
    pub command_byte: u8,
    /// The output port.
    pub output_port: u8,
    /// A command waiting for its data byte on port 0x60.
    pub pending_command: Option<u8>,
    /// Whether the last write went to the command port.
    pub last_was_command: bool,
    /// Bytes queued for the guest to read on port 0x60.
    pub output: VecDeque<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        I8042State {
            command_byte: CB_KBD_INTERRUPT | CB_SYSTEM_FLAG,
            output_port: 0x01,
            pending_command: None,
            last_was_command: false,
            output: VecDeque::new(),
        }
    }
}

/// The i8042 controller and its keyboard.
pub struct I8042 {
    reset: EventFdTrigger,
    irq: EventFdTrigger,
    state: I8042State,
}

impl I8042 {
    /// A controller that signals `reset` when the guest pulses the reset line and raises `irq`
    /// (ISA IRQ 1) when a key byte waits.
    pub fn new(reset: EventFdTrigger, irq: EventFdTrigger) -> Self {
        I8042 {
            reset,
            irq,
            state: I8042State::default(),
        }
    }

    /// Presses and releases Ctrl-Alt-Del. Fails if the guest has not read earlier keys.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), String> {
        if self.state.output.len() + CTRL_ALT_DEL.len() > MAX_PENDING {
            return Err("the guest is not reading its keyboard".into());
        }
        for code in CTRL_ALT_DEL {
            self.state.output.push_back(code);
        }
        self.raise_keyboard_interrupt();
        Ok(())
    }

    fn raise_keyboard_interrupt(&self) {
        if self.state.command_byte & CB_KBD_INTERRUPT != 0 && !self.state.output.is_empty() {
            if let Err(e) = self.irq.trigger() {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    /// Queues a byte for the guest (answers to commands come first, in order).
    fn respond(&mut self, byte: u8) {
        if self.state.output.len() < MAX_PENDING {
            self.state.output.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let mut status = SR_KEYBOARD_UNLOCKED;
        if !self.state.output.is_empty() {
            status |= SR_OUTPUT_FULL;
        }
        if self.state.command_byte & CB_SYSTEM_FLAG != 0 {
            status |= SR_SYSTEM_FLAG;
        }
        if self.state.last_was_command {
            status |= SR_LAST_WAS_COMMAND;
        }
        status
    }

    fn command(&mut self, command: u8) {
        match command {
            0x20 => self.respond(self.state.command_byte),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.state.pending_command = Some(command),
            // Self-test passed; keyboard interface test passed; aux interface test: no aux port.
            0xaa => self.respond(0x55),
            0xab => self.respond(0x00),
            0xa9 => self.respond(0xff),
            0xc0 => self.respond(0x00),
            0xd0 => self.respond(self.state.output_port),
            0xfe => {
                if let Err(e) = self.reset.trigger() {
                    log::error!("i8042: cannot signal the reset request: {e}");
                }
            }
            // Enable/disable the keyboard or aux port, pulse other output lines: nothing to do.
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        match self.state.pending_command.take() {
            Some(0x60) => {
                self.state.command_byte = byte;
                self.raise_keyboard_interrupt();
            }
            Some(0xd1) => {
                self.state.output_port = byte;
                // Bit 0 low holds the CPU in reset.
                if byte & 1 == 0 {
                    self.command(0xfe);
                }
            }
            // "Write keyboard output buffer": the byte comes back as if typed.
            Some(0xd2) => {
                self.respond(byte);
                self.raise_keyboard_interrupt();
            }
            // Aux port commands go nowhere: there is no mouse.
            Some(_) => {}
            // A command for the keyboard itself: acknowledge; a reset also reports its self-test.
            None => {
                self.respond(KBD_ACK);
                if byte == 0xff {
                    self.respond(KBD_SELF_TEST_PASSED);
                }
                self.raise_keyboard_interrupt();
            }
        }
    }

    /// The guest-visible state.
    pub fn save_state(&self) -> I8042State {
        self.state.clone()
    }

    /// Restores a saved state.
    pub fn restore_state(&mut self, state: &I8042State) {
        self.state = state.clone();
        self.state.output.truncate(MAX_PENDING);
        self.raise_keyboard_interrupt();
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            DATA_PORT_OFFSET => {
                let byte = self.state.output.pop_front().unwrap_or(0);
                self.raise_keyboard_interrupt();
                byte
            }
            COMMAND_PORT_OFFSET => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA_PORT_OFFSET => {
                self.state.last_was_command = false;
                self.data(byte);
            }
            COMMAND_PORT_OFFSET => {
                self.state.last_was_command = true;
                self.command(byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    fn device() -> (I8042, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(
            EventFdTrigger::new(reset.try_clone().unwrap()),
            EventFdTrigger::new(irq.try_clone().unwrap()),
        );
        (dev, reset, irq)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_only_on_the_command_port() {
        let (mut dev, reset, _) = device();
        dev.write(0, &[0xfe]);
        assert!(reset.read().is_err(), "data port must not reset");
        dev.write(4, &[0xaa]);
        assert!(reset.read().is_err(), "other commands must not reset");
        dev.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn answers_the_linux_probe() {
        let (mut dev, _, _) = device();
        dev.write(4, &[0xaa]);
        assert_ne!(read(&mut dev, 4) & SR_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, 0), 0x55);
        assert_eq!(read(&mut dev, 4) & SR_OUTPUT_FULL, 0);
        dev.write(4, &[0x20]);
        let cb = read(&mut dev, 0);
        assert_eq!(cb, CB_KBD_INTERRUPT | CB_SYSTEM_FLAG);
        dev.write(4, &[0x60]);
        dev.write(0, &[0x00]);
        dev.write(4, &[0x20]);
        assert_eq!(read(&mut dev, 0), 0x00);
        dev.write(4, &[0xab]);
        assert_eq!(read(&mut dev, 0), 0x00);
    }

    #[test]
    fn ctrl_alt_del_arrives_with_an_interrupt() {
        let (mut dev, _, irq) = device();
        dev.send_ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 1);
        let got: Vec<u8> = (0..CTRL_ALT_DEL.len()).map(|_| read(&mut dev, 0)).collect();
        assert_eq!(got, CTRL_ALT_DEL);
        assert_eq!(read(&mut dev, 4) & SR_OUTPUT_FULL, 0);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_queue() {
        let (mut dev, _, _) = device();
        let mut sent = 0;
        while dev.send_ctrl_alt_del().is_ok() {
            sent += 1;
        }
        assert!(sent >= 1 && dev.state.output.len() <= MAX_PENDING);
        for _ in 0..1000 {
            dev.write(0, &[0xff]);
        }
        assert!(dev.state.output.len() <= MAX_PENDING);
    }

    #[test]
    fn output_port_bit0_low_resets_and_state_round_trips() {
        let (mut dev, reset, _) = device();
        dev.write(4, &[0xd1]);
        dev.write(0, &[0x00]);
        assert_eq!(reset.read().unwrap(), 1);
        dev.send_ctrl_alt_del().unwrap();
        let saved = dev.save_state();
        let (mut other, _, _) = device();
        other.restore_state(&saved);
        assert_eq!(other.save_state(), saved);
        assert_eq!(read(&mut other, 0), 0x14);
    }
}
