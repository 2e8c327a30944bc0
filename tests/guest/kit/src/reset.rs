//! Resetting the machine, which is how a guest stops itself: the VMM ends the VM.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::boot::BootInfo;
use crate::io::{inb, outb};

/// `lks.reset=impatient`: triple-fault straight after pulsing the reset line, so that a VMM which
/// acts on the pulse only later (from another thread) sees the fault first.
static IMPATIENT: AtomicBool = AtomicBool::new(false);

/// Reads `lks.reset=patient|impatient`.
pub fn init(boot: &BootInfo) {
    for (key, value) in boot.cmdline_options() {
        match (key, value) {
            (b"lks.reset", b"impatient") => IMPATIENT.store(true, Ordering::Relaxed),
            (b"lks.reset", b"patient") => IMPATIENT.store(false, Ordering::Relaxed),
            _ => {}
        }
    }
}

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
    if IMPATIENT.load(Ordering::Relaxed) {
        crate::cpu::triple_fault()
    }
    // A VMM handles the reset during the OUT; a real controller may take a moment.
    let start = crate::cpu::rdtsc();
    while crate::cpu::rdtsc().wrapping_sub(start) < 10_000_000 {
        core::hint::spin_loop();
    }
    crate::cpu::triple_fault()
}
