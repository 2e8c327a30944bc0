//! Resetting the machine, which is how a guest stops itself: the VMM ends the VM.

use crate::io::{inb, outb};

const I8042_STATUS: u16 = 0x64;
const I8042_INPUT_FULL: u8 = 0x02;
const I8042_PULSE_RESET: u8 = 0xfe;

/// Asks the i8042 keyboard controller to pulse the reset line; if the machine is still running
/// afterwards (no i8042, as on QEMU's microvm), resets it by a triple fault.
pub fn reset() -> ! {
    // Bounded: with no controller the port reads 0xff (input "full") for ever.
    for _ in 0..16 {
        if inb(I8042_STATUS) & I8042_INPUT_FULL == 0 {
            break;
        }
    }
    outb(I8042_STATUS, I8042_PULSE_RESET);
    // A VMM handles the reset during the OUT; a real controller may take a moment.
    let start = crate::cpu::rdtsc();
    while crate::cpu::rdtsc().wrapping_sub(start) < 10_000_000 {
        core::hint::spin_loop();
    }
    crate::cpu::triple_fault()
}
