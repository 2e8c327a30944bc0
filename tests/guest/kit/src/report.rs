//! The serial report: lines of the form `LKS <key>=<value>` that host-side tests read. Output from all
//! CPUs goes through one lock so lines never interleave.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::serial::COM1;

static SERIAL_LOCK: AtomicBool = AtomicBool::new(false);

/// Formatted output collected into whole chunks before it reaches the UART: every transmission is a
/// trip into CPL0, so one per line rather than one per formatted fragment.
struct Buffered {
    buffer: [u8; 256],
    len: usize,
}

impl Buffered {
    const fn new() -> Self {
        Buffered {
            buffer: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, byte: u8) {
        if self.len == self.buffer.len() {
            self.flush();
        }
        self.buffer[self.len] = byte;
        self.len += 1;
    }

    fn flush(&mut self) {
        COM1.write_bytes(&self.buffer[..self.len]);
        self.len = 0;
    }
}

impl Write for Buffered {
    /// Buffers text, turning `\n` into CR LF.
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            if byte == b'\n' {
                self.push(b'\r');
            }
            self.push(byte);
        }
        Ok(())
    }
}

/// Writes formatted text to COM1 in as few transmissions as possible.
fn write_console(args: fmt::Arguments) {
    let mut out = Buffered::new();
    // Buffered never fails.
    let _ = out.write_fmt(args);
    out.flush();
}

/// Holds the console for several writes; released on drop.
pub struct ConsoleGuard(());

impl ConsoleGuard {
    /// Waits for and takes the console lock.
    pub fn lock() -> Self {
        while SERIAL_LOCK.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        ConsoleGuard(())
    }

    /// Writes formatted text (`\n` becomes CR LF).
    pub fn write(&mut self, args: fmt::Arguments) {
        write_console(args);
    }

    /// Writes raw bytes (e.g. echoed input).
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        COM1.write_bytes(bytes);
    }
}

impl Drop for ConsoleGuard {
    fn drop(&mut self) {
        SERIAL_LOCK.store(false, Ordering::Release);
    }
}

/// Prints one report line: `LKS <args>` and CR LF.
pub fn line(args: fmt::Arguments) {
    let mut console = ConsoleGuard::lock();
    console.write(format_args!("LKS {args}\n"));
}

/// Prints a report line without taking the lock: for the fault and panic paths, where the lock may be
/// held by the very code that failed.
pub fn fault_line(args: fmt::Arguments) {
    write_console(format_args!("\nLKS {args}\n"));
}

/// FNV-1a, 64-bit: the checksum the report gives for the initrd.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

/// Prints the boot report: boot path, command line, memory map, usable memory, initrd, CPUs and
/// keyboard.
pub fn boot_report(system: &crate::System) {
    let boot = &system.boot;
    line(format_args!("boot={}", boot.kind.name()));
    let mut console = ConsoleGuard::lock();
    console.write(format_args!(
        "LKS cmdline={}\n",
        crate::boot::Printable(boot.cmdline())
    ));
    for region in boot.memory_map() {
        console.write(format_args!(
            "LKS e820={:#x},{:#x},{}\n",
            region.start, region.size, region.kind
        ));
    }
    console.write(format_args!("LKS mem={}\n", boot.usable_bytes()));
    match boot.initrd {
        Some(initrd) if initrd.addr.saturating_add(initrd.size) > system.mapped_end => {
            console.write(format_args!(
                "LKS initrd addr={:#x} size={} fnv1a64=unmapped\n",
                initrd.addr, initrd.size
            ));
        }
        Some(initrd) => {
            // SAFETY: the initrd is RAM the VMM filled and nobody writes; it lies below the end of
            // the identity map (checked above).
            let bytes = unsafe { crate::phys::slice(initrd.addr, initrd.size as usize) };
            console.write(format_args!(
                "LKS initrd addr={:#x} size={} fnv1a64={:016x}\n",
                initrd.addr,
                initrd.size,
                fnv1a64(bytes)
            ));
        }
        None => console.write(format_args!("LKS initrd=none\n")),
    }
    let platform = &system.platform;
    console.write(format_args!(
        "LKS cpus={} source={}\n",
        platform.cpu_count(),
        platform.source.name()
    ));
    console.write(format_args!("LKS keyboard={}\n", crate::keyboard::Describe));
}
