//! Time for timeouts and rates: the TSC, whose frequency is taken from CPUID leaf 0x15 when it says,
//! else measured once against the PIT's channel 0 (about 20 ms), else assumed.
//!
//! Every timeout in the kit is approximate: a VMM without a PIT and without CPUID leaf 0x15 leaves the
//! kit assuming [`ASSUMED_TSC_HZ`]. Timeouts count only time the guest ran (see [`Deadline`]), and
//! sleeps are bounded by the local APIC timer ([`nap_us`]).

use core::arch::x86_64::__cpuid;
use core::cell::Cell;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::{self, rdtsc};
use crate::io::{inb, outb};

/// The TSC frequency assumed when it can be neither read nor measured.
pub const ASSUMED_TSC_HZ: u64 = 2_000_000_000;

/// The local APIC timer's vector, which bounds sleeps in `hlt`.
const TIMER_VECTOR: u8 = cpu::IRQ_BASE + 31;
/// Local APIC timer ticks per millisecond at divide 16: the timer counts a 1 GHz bus under KVM.
const TIMER_TICKS_PER_MS: u64 = 62_500;
/// A gap between two looks at a [`Deadline`] longer than this is time the guest did not run.
const STALL_MS: u64 = 500;

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

/// Converts milliseconds to TSC cycles.
pub fn ms_to_cycles(ms: u64) -> u64 {
    (u128::from(tsc_hz()) * u128::from(ms) / 1000) as u64
}

/// Converts microseconds to TSC cycles.
pub fn us_to_cycles(us: u64) -> u64 {
    (u128::from(tsc_hz()) * u128::from(us) / 1_000_000) as u64
}

/// Sleeps in the CPL0 wait service until an interrupt, at most about `us` microseconds: the BSP's
/// local APIC timer is armed one-shot to wake it (BSP only). Returns at once if a device interrupt
/// is pending (see [`cpu::wait_for_interrupt`]).
pub fn nap_us(us: u64) {
    let ticks = (us * TIMER_TICKS_PER_MS / 1000).clamp(1, u64::from(u32::MAX));
    crate::apic::arm_oneshot_timer(TIMER_VECTOR, ticks as u32);
    cpu::wait_for_interrupt();
}

/// A point in time (TSC) after which a wait gives up. Only time the guest ran counts: when two
/// looks at the deadline are more than [`STALL_MS`] apart, or the TSC went backwards, the VM was
/// paused or saved and restored, and the deadline moves by the gap. A wait the VMM interrupted thus
/// resumes with the time it had left, instead of failing at once because the TSC ran on.
#[derive(Debug)]
pub struct Deadline {
    end: Cell<u64>,
    last_look: Cell<u64>,
    stall: u64,
}

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        let now = rdtsc();
        Deadline {
            end: Cell::new(now.saturating_add(ms_to_cycles(ms))),
            last_look: Cell::new(now),
            stall: ms_to_cycles(STALL_MS),
        }
    }

    /// Whether the deadline has passed (in time the guest ran).
    pub fn passed(&self) -> bool {
        let now = rdtsc();
        let last = self.last_look.replace(now);
        let end = self.end.get();
        if now < last {
            // The TSC went backwards (a restored VM): the deadline moves back with it.
            self.end.set(end.saturating_sub(last - now));
        } else if now - last > self.stall {
            self.end.set(end.saturating_add(now - last));
        }
        now >= self.end.get()
    }
}
