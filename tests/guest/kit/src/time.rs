//! Time for timeouts and rates: the TSC, whose frequency is taken from CPUID leaf 0x15 when it says,
//! else measured once against the PIT's channel 0 (about 20 ms), else assumed.
//!
//! Every timeout in the kit is approximate: a VMM without a PIT and without CPUID leaf 0x15 leaves the
//! kit assuming [`ASSUMED_TSC_HZ`].

use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::rdtsc;
use crate::io::{inb, outb};

/// The TSC frequency assumed when it can be neither read nor measured.
pub const ASSUMED_TSC_HZ: u64 = 2_000_000_000;

const PIT_HZ: u64 = 1_193_182;
/// PIT ticks measured against: about 20 ms.
const PIT_TICKS: u64 = 23_864;
const PIT_CHANNEL0: u16 = 0x40;
const PIT_COMMAND: u16 = 0x43;
/// Channel 0, low then high byte, mode 2 (rate generator), binary.
const PIT_CHANNEL0_MODE2: u8 = 0x34;
/// Channel 0, latch the count.
const PIT_CHANNEL0_LATCH: u8 = 0x00;
/// Reads of an unchanging counter after which there is taken to be no PIT.
const PIT_STUCK_READS: u32 = 1000;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_SOURCE: AtomicU64 = AtomicU64::new(0);

/// Where the TSC frequency came from: `cpuid`, `pit` or `assumed`.
pub fn tsc_source() -> &'static str {
    tsc_hz();
    match TSC_SOURCE.load(Ordering::Relaxed) {
        1 => "cpuid",
        2 => "pit",
        _ => "assumed",
    }
}

/// The TSC frequency in Hz (determined on first use).
pub fn tsc_hz() -> u64 {
    let known = TSC_HZ.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    let (hz, source) = if let Some(hz) = cpuid_tsc_hz() {
        (hz, 1)
    } else if let Some(hz) = pit_tsc_hz() {
        (hz, 2)
    } else {
        (ASSUMED_TSC_HZ, 3)
    };
    TSC_SOURCE.store(source, Ordering::Relaxed);
    TSC_HZ.store(hz, Ordering::Relaxed);
    hz
}

/// CPUID leaf 0x15: TSC = crystal * EBX / EAX, when all three are given.
fn cpuid_tsc_hz() -> Option<u64> {
    if __cpuid(0).eax < 0x15 {
        return None;
    }
    let leaf = __cpuid(0x15);
    (leaf.eax != 0 && leaf.ebx != 0 && leaf.ecx != 0)
        .then(|| u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax))
}

/// Counts TSC cycles while the PIT's channel 0 counts [`PIT_TICKS`] (it is reprogrammed to count
/// down from 65535 over and over; its interrupt is masked everywhere). Channel 0 needs no gate, so
/// this works without the speaker port that QEMU's microvm lacks.
fn pit_tsc_hz() -> Option<u64> {
    outb(PIT_COMMAND, PIT_CHANNEL0_MODE2);
    outb(PIT_CHANNEL0, 0xff);
    outb(PIT_CHANNEL0, 0xff);
    let read = || {
        outb(PIT_COMMAND, PIT_CHANNEL0_LATCH);
        let low = inb(PIT_CHANNEL0);
        u16::from_le_bytes([low, inb(PIT_CHANNEL0)])
    };
    let mut last = read();
    let start = rdtsc();
    let (mut ticks, mut stuck) = (0u64, 0u32);
    while ticks < PIT_TICKS {
        let now = read();
        let delta = last.wrapping_sub(now);
        if delta == 0 {
            stuck += 1;
            if stuck == PIT_STUCK_READS {
                return None;
            }
            continue;
        }
        stuck = 0;
        ticks += u64::from(delta);
        last = now;
    }
    let cycles = rdtsc().wrapping_sub(start);
    let hz = cycles * PIT_HZ / ticks;
    (100_000_000..50_000_000_000).contains(&hz).then_some(hz)
}

/// Converts TSC cycles to microseconds.
pub fn cycles_to_us(cycles: u64) -> u64 {
    (u128::from(cycles) * 1_000_000 / u128::from(tsc_hz())) as u64
}

/// A point in time (TSC) after which a wait gives up.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        let cycles = u128::from(tsc_hz()) * u128::from(ms) / 1000;
        Deadline(rdtsc().saturating_add(cycles as u64))
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        rdtsc() >= self.0
    }
}
