//! The KVM paravirtual clock: nanoseconds since the VM's clock started, from a pvclock structure
//! that KVM keeps up to date in guest memory once MSR_KVM_SYSTEM_TIME_NEW points at it. The MSR is
//! written by a CPL0 service (once, on first use); the structure is read at CPL3 together with the
//! TSC. Only the BSP's clock is set up, and only the BSP reads it.
//!
//! A VMM that saves and restores a VM sets the clock back to its saved value (KVM_SET_CLOCK), so the
//! nanoseconds a guest sees never go backwards across a restore.

use core::sync::atomic::{fence, AtomicU32, AtomicU8, Ordering};

use crate::cpu::{self, rdtsc};

/// `flags` bit: the TSC is stable across CPUs (KVM's master clock is in use).
const PVCLOCK_TSC_STABLE: u32 = 1;
/// Reads of the structure while KVM rewrites it before giving up.
const READ_TRIES: u32 = 1000;

/// `struct pvclock_vcpu_time_info` as 32-bit words: version, pad, tsc_timestamp (2 words),
/// system_time (2 words), tsc_to_system_mul, then tsc_shift (i8), flags (u8) and padding. KVM writes
/// it whenever it changes the clock; an odd version means an update is under way.
#[repr(C, align(64))]
struct PvClock([AtomicU32; 8]);

static PVCLOCK: PvClock = PvClock([const { AtomicU32::new(0) }; 8]);

const STATE_UNKNOWN: u8 = 0;
const STATE_ON: u8 = 1;
const STATE_UNAVAILABLE: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(STATE_UNKNOWN);

/// One consistent reading of the clock.
#[derive(Clone, Copy, Debug)]
pub struct Reading {
    /// Nanoseconds of the KVM clock.
    pub ns: u64,
    /// The TSC the nanoseconds were computed from.
    pub tsc: u64,
    /// Whether KVM says the TSC is stable (PVCLOCK_TSC_STABLE_BIT).
    pub stable: bool,
}

/// Enables the clock on first use; false if the VMM offers none (not KVM, or no CLOCKSOURCE2).
fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        STATE_ON => true,
        STATE_UNAVAILABLE => false,
        _ => {
            let addr = (&raw const PVCLOCK) as u64;
            let on = cpu::set_kvm_system_time(addr | 1);
            STATE.store(
                if on { STATE_ON } else { STATE_UNAVAILABLE },
                Ordering::Relaxed,
            );
            on
        }
    }
}

fn word(index: usize) -> u32 {
    PVCLOCK.0[index].load(Ordering::Relaxed)
}

fn dword(index: usize) -> u64 {
    u64::from(word(index)) | (u64::from(word(index + 1)) << 32)
}

/// Reads the KVM clock (BSP only); `None` without one, or if KVM never filled the structure in.
pub fn read() -> Option<Reading> {
    if !enabled() {
        return None;
    }
    for _ in 0..READ_TRIES {
        let version = word(0);
        // Acquire: the fields after the version.
        fence(Ordering::Acquire);
        let tsc_timestamp = dword(2);
        let system_time = dword(4);
        let mul = word(6);
        let [shift, flags, ..] = word(7).to_le_bytes();
        let tsc = rdtsc();
        fence(Ordering::Acquire);
        if version == 0 || version & 1 != 0 || word(0) != version {
            core::hint::spin_loop();
            continue;
        }
        // A TSC read just before KVM's timestamp counts as no time at all.
        let delta = tsc.saturating_sub(tsc_timestamp);
        let shift = shift as i8;
        let delta = if shift < 0 {
            delta >> shift.unsigned_abs()
        } else {
            delta << shift
        };
        let ns = system_time.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64);
        return Some(Reading {
            ns,
            tsc,
            stable: u32::from(flags) & PVCLOCK_TSC_STABLE != 0,
        });
    }
    None
}
