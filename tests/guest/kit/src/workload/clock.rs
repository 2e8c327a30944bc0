//! Time commands for pause and snapshot tests: `clock` reads the KVM clock and the TSC once;
//! `counter` prints a counter that lives in guest memory at a steady interval, with both clocks, so
//! that a VM saved and restored in another process visibly carries on from its last value and a
//! test can check that time did not go backwards.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{key_pressed, usage, Args};
use crate::cpu::{self, rdtsc};
use crate::time::{cycles_to_us, ms_to_cycles};
use crate::{keyboard, kvmclock, report};

/// The counter's last value: in guest memory, so a restored VM has it too.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Longest interval `counter` takes (one hour).
const INTERVAL_MAX_MS: u64 = 3_600_000;

/// A KVM clock reading as `<ns>`, or `none` without a KVM clock.
struct ShowNs(Option<kvmclock::Reading>);

impl fmt::Display for ShowNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(reading) => write!(f, "{}", reading.ns),
            None => f.write_str("none"),
        }
    }
}

/// `clock`: `LKS clock ns=<KVM clock ns>|none tsc=<tsc> stable=0|1 tsc_us=<TSC in microseconds>`.
pub(super) fn clock() {
    let reading = kvmclock::read();
    let tsc = reading.map_or_else(rdtsc, |r| r.tsc);
    report::line(format_args!(
        "clock ns={} tsc={tsc} stable={} tsc_us={}",
        ShowNs(reading),
        u8::from(reading.is_some_and(|r| r.stable)),
        cycles_to_us(tsc)
    ));
}

/// `counter <interval_ms> [count]`: a line `LKS counter=<n> ns=<ns> tsc=<tsc>` at once and then
/// every interval, `n` going on from the last value any `counter` printed, until `count` lines or
/// a key on the console: `LKS counter-end last=<n> ticks=<lines> stopped_by=count|key`. Between
/// lines the CPU sleeps in `hlt` (woken by the local APIC timer).
pub(super) fn counter(args: &mut Args) {
    let (Some(interval_ms), count) = (args.number(), args.number()) else {
        return usage("counter", "<interval_ms> [count]");
    };
    if !(1..=INTERVAL_MAX_MS).contains(&interval_ms) || count == Some(0) {
        return usage("counter", "<interval_ms 1..3600000> [count >= 1]");
    }
    let interval = ms_to_cycles(interval_ms);
    let mut next = rdtsc();
    let mut ticks = 0u64;
    let stopped_by = loop {
        if !sleep_until(&mut next, interval) {
            break "key";
        }
        tick(None);
        ticks += 1;
        if count.is_some_and(|count| ticks >= count) {
            break "count";
        }
        next = next_tick(next, interval, rdtsc());
    };
    report::line(format_args!(
        "counter-end last={} ticks={ticks} stopped_by={stopped_by}",
        COUNTER.load(Ordering::Relaxed)
    ));
}

/// Adds one to the counter and prints `LKS counter=<n> ns=<ns> tsc=<tsc>`, with
/// ` dirtied_kib=<k>` when given (`memdirty`'s ticks: one transcript check covers both).
pub(super) fn tick(dirtied_kib: Option<u64>) {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    let reading = kvmclock::read();
    let tsc = reading.map_or_else(rdtsc, |r| r.tsc);
    let mut console = report::ConsoleGuard::lock();
    console.write(format_args!(
        "LKS counter={n} ns={} tsc={tsc}",
        ShowNs(reading)
    ));
    match dirtied_kib {
        Some(kib) => console.write(format_args!(" dirtied_kib={kib}\n")),
        None => console.write(format_args!("\n")),
    }
}

/// When the tick after the one due at `due` is: one `interval` later, or, if that has passed
/// already (the VM was paused, or saved and restored, for longer), one `interval` after `now`.
pub(super) fn next_tick(due: u64, interval: u64, now: u64) -> u64 {
    let next = due.wrapping_add(interval);
    if next < now {
        now.wrapping_add(interval)
    } else {
        next
    }
}

/// Sleeps until the TSC reaches `*next`, looking at the console and the keyboard whenever the CPU
/// wakes; false if a key stopped it. A TSC that went backwards (a restored VM) makes the wait no
/// longer than one `interval`.
fn sleep_until(next: &mut u64, interval: u64) -> bool {
    loop {
        cpu::take_pending_irqs();
        if key_pressed() {
            return false;
        }
        let now = rdtsc();
        if now >= *next {
            return true;
        }
        if *next - now > interval {
            *next = now + interval;
        }
        keyboard::nap_us(cycles_to_us(*next - now).max(1));
    }
}
