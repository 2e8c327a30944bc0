//! x86 port I/O. Allowed at CPL3 by the TSS I/O-permission bitmap, which grants every port.

use core::arch::asm;

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O has no effect on Rust-owned memory; the I/O bitmap allows it at CPL3.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: as for `inb`.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}
