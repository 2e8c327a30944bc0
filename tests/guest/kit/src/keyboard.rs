//! The i8042 keyboard, for one purpose: Ctrl-Alt-Del, which a VMM "presses" to ask the guest to shut
//! down. The guest then prints `LKS ctrl-alt-del` and `LKS shutdown` and resets through the i8042,
//! which ends the VM as if it had powered off (`lks.cad=ignore`: it prints `LKS ctrl-alt-del
//! ignored` and carries on, so that a test can see the VMM stop it by force).
//!
//! Ports 0x60 and 0x64 are open to CPL3 like every port (the shared TSS I/O bitmap allows all).
//! ISA IRQ 1 (or its MADT/MP override) is routed through the IOAPIC to [`VECTOR`], which wakes a
//! CPU sleeping in CPL0; the bytes themselves are read at CPL3 by [`check`], which every waiting
//! loop of the kit calls (the monitor's idle wait, the script runner, long-running commands, the
//! halt loop). It reads the controller when the keyboard interrupt was taken since the last look,
//! and otherwise at most every ~10 ms, so busy loops stay cheap.
//!
//! Scancodes are decoded in set 2 (an untranslated controller, as lockstep's) and in set 1 (a
//! translating one, as a PC's after its BIOS) at the same time; neither set's Ctrl-Alt-Del reads
//! as one in the other. Left or right Ctrl and Alt count, with Delete or the keypad's Delete.

use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::boot::BootInfo;
use crate::cpu::{self, rdtsc};
use crate::io::inb;
use crate::platform::{Platform, KEYBOARD_ISA_IRQ};
use crate::{apic, report};

/// The vector the keyboard interrupt arrives on.
pub const VECTOR: u8 = cpu::IRQ_BASE + KEYBOARD_ISA_IRQ;
/// Longest time between two looks at a controller whose interrupt is not taken: about 10 ms at 2 GHz
/// (a fixed cycle count, so that looking never waits for the TSC frequency to be measured).
const POLL_CYCLES: u64 = 20_000_000;
/// How long an idle wait sleeps when the keyboard must be polled (no IOAPIC carries its IRQ).
const POLL_NAP_US: u64 = 10_000;

const DATA_PORT: u16 = 0x60;
const STATUS_PORT: u16 = 0x64;
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_AUX_DATA: u8 = 0x20;
/// What the status port reads when nothing answers it.
const STATUS_ABSENT: u8 = 0xff;
/// Most bytes taken from the controller in one look.
const BYTES_PER_LOOK: u32 = 32;

const MODE_ABSENT: u8 = 0;
const MODE_POLLED: u8 = 1;
const MODE_IRQ: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(MODE_ABSENT);
static IGNORE_CAD: AtomicU8 = AtomicU8::new(0);
/// TSC of the last look at the controller, and how often the interrupt had been seen by then.
static LAST_LOOK: AtomicU64 = AtomicU64::new(0);
static LAST_IRQS: AtomicU32 = AtomicU32::new(0);
/// The two decoders' states: set 2 in the low half, set 1 in the high half.
static DECODERS: AtomicU32 = AtomicU32::new(0);

/// Finds the controller (the status port reads 0xff without one), reads `lks.cad=shutdown|ignore`
/// and routes IRQ 1 to [`VECTOR`] on this CPU. Bytes already waiting are read by the first
/// [`check`].
pub fn init(boot: &BootInfo, platform: &Platform) {
    for (key, value) in boot.cmdline_options() {
        match (key, value) {
            (b"lks.cad", b"ignore") => IGNORE_CAD.store(1, Ordering::Relaxed),
            (b"lks.cad", b"shutdown") => IGNORE_CAD.store(0, Ordering::Relaxed),
            _ => {}
        }
    }
    if inb(STATUS_PORT) == STATUS_ABSENT {
        return;
    }
    let routed = platform.route(platform.keyboard_route, VECTOR, apic::local_apic_id());
    MODE.store(
        if routed { MODE_IRQ } else { MODE_POLLED },
        Ordering::Relaxed,
    );
}

/// Looks at the keyboard if it interrupted since the last look or about 10 ms have passed, and
/// acts on Ctrl-Alt-Del (shuts down: does not return). BSP only.
pub fn check() {
    if MODE.load(Ordering::Relaxed) == MODE_ABSENT {
        return;
    }
    let irqs = cpu::irqs_seen(VECTOR) + u32::from(cpu::irq_pending(VECTOR));
    let now = rdtsc();
    let quiet = irqs == LAST_IRQS.load(Ordering::Relaxed)
        && now.wrapping_sub(LAST_LOOK.load(Ordering::Relaxed)) < POLL_CYCLES;
    if quiet {
        return;
    }
    LAST_IRQS.store(irqs, Ordering::Relaxed);
    LAST_LOOK.store(now, Ordering::Relaxed);
    for _ in 0..BYTES_PER_LOOK {
        let status = inb(STATUS_PORT);
        if status & STATUS_OUTPUT_FULL == 0 {
            break;
        }
        let byte = inb(DATA_PORT);
        if status & STATUS_AUX_DATA == 0 && decode(byte) {
            ctrl_alt_del();
        }
    }
}

/// Sleeps in CPL0 until an interrupt, as [`cpu::wait_for_interrupt`]; when the keyboard cannot
/// interrupt, for at most about 10 ms so that the next [`check`] comes soon. BSP only.
pub fn idle_wait() {
    if MODE.load(Ordering::Relaxed) == MODE_POLLED {
        crate::time::nap_us(POLL_NAP_US);
    } else {
        cpu::wait_for_interrupt();
    }
}

/// Sleeps as [`crate::time::nap_us`], but no longer than an idle wait would when the keyboard
/// must be polled.
pub fn nap_us(us: u64) {
    let us = if MODE.load(Ordering::Relaxed) == MODE_POLLED {
        us.min(POLL_NAP_US)
    } else {
        us
    };
    crate::time::nap_us(us);
}

/// The BSP's last occupation: sleeps for ever, waking only to look at the keyboard (halts at once
/// if there is none).
pub fn idle_forever() -> ! {
    if MODE.load(Ordering::Relaxed) == MODE_ABSENT {
        cpu::halt_forever();
    }
    loop {
        cpu::take_pending_irqs();
        check();
        idle_wait();
    }
}

fn ctrl_alt_del() {
    if IGNORE_CAD.load(Ordering::Relaxed) != 0 {
        report::line(format_args!("ctrl-alt-del ignored"));
        return;
    }
    report::line(format_args!("ctrl-alt-del"));
    report::line(format_args!("shutdown"));
    crate::reset::reset()
}

/// Feeds one byte to both decoders; true if it completes Ctrl-Alt-Del in either set.
fn decode(byte: u8) -> bool {
    let states = DECODERS.load(Ordering::Relaxed);
    let (set2, cad2) = SET2.feed(states as u16, byte);
    let (set1, cad1) = SET1.feed((states >> 16) as u16, byte);
    DECODERS.store(u32::from(set2) | (u32::from(set1) << 16), Ordering::Relaxed);
    cad2 || cad1
}

/// Decoder state bits: the modifiers held, and the prefixes seen.
const LEFT_CTRL: u16 = 1 << 0;
const RIGHT_CTRL: u16 = 1 << 1;
const LEFT_ALT: u16 = 1 << 2;
const RIGHT_ALT: u16 = 1 << 3;
const EXTENDED: u16 = 1 << 4;
const RELEASE: u16 = 1 << 5;
const CTRL: u16 = LEFT_CTRL | RIGHT_CTRL;
const ALT: u16 = LEFT_ALT | RIGHT_ALT;

/// The key codes of one scancode set.
struct ScancodeSet {
    ctrl: u8,
    alt: u8,
    delete: u8,
    /// Set 2 announces a release with a prefix byte.
    release_prefix: Option<u8>,
    /// Set 1 marks a release in the code's top bit.
    release_bit: u8,
}

/// Set 2: Ctrl 14, Alt 11, Delete (E0) 71; release F0 <code>.
const SET2: ScancodeSet = ScancodeSet {
    ctrl: 0x14,
    alt: 0x11,
    delete: 0x71,
    release_prefix: Some(0xf0),
    release_bit: 0,
};

/// Set 1: Ctrl 1D, Alt 38, Delete (E0) 53; release <code | 80>.
const SET1: ScancodeSet = ScancodeSet {
    ctrl: 0x1d,
    alt: 0x38,
    delete: 0x53,
    release_prefix: None,
    release_bit: 0x80,
};

impl ScancodeSet {
    /// The decoder's next state after `byte`, and whether the byte pressed Delete while Ctrl and
    /// Alt were held. E0 and E1 prefixes mark the next code as extended (right Ctrl, right Alt).
    fn feed(&self, state: u16, byte: u8) -> (u16, bool) {
        if byte == 0xe0 || byte == 0xe1 {
            return (state | EXTENDED, false);
        }
        if Some(byte) == self.release_prefix {
            return (state | RELEASE, false);
        }
        let released = state & RELEASE != 0 || byte & self.release_bit != 0;
        let code = byte & !self.release_bit;
        let extended = state & EXTENDED != 0;
        let held = state & (CTRL | ALT);
        let key = match code {
            _ if code == self.ctrl => [LEFT_CTRL, RIGHT_CTRL][usize::from(extended)],
            _ if code == self.alt => [LEFT_ALT, RIGHT_ALT][usize::from(extended)],
            _ => 0,
        };
        let held = if released { held & !key } else { held | key };
        let cad = !released && code == self.delete && held & CTRL != 0 && held & ALT != 0;
        (held, cad)
    }
}

/// The keyboard as the report shows it: `i8042 mode=irq|poll cad=shutdown|ignore`, or `none`.
pub struct Describe;

impl fmt::Display for Describe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match MODE.load(Ordering::Relaxed) {
            MODE_IRQ => "irq",
            MODE_POLLED => "poll",
            _ => return f.write_str("none"),
        };
        let cad = if IGNORE_CAD.load(Ordering::Relaxed) != 0 {
            "ignore"
        } else {
            "shutdown"
        };
        write!(f, "i8042 mode={mode} cad={cad}")
    }
}
