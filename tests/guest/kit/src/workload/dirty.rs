//! `memdirty`: a guest that dirties its memory at a set rate, for live-migration tests and the
//! migration benchmark. A block of RAM is written page after page, pass after pass, paced by the
//! KVM clock; every page of pass `k` holds words derived from `k` and the page's number. Before a
//! page is rewritten it is checked for the previous pass, and at the end every page for the pass
//! it was last written in, so a write that was lost (a dirty page a migration did not send again)
//! is found even though the page is rewritten later.

use super::clock::tick;
use super::pattern::Fnv;
use super::{error, key_pressed, usage, Args, Machine};
use crate::cpu::{self, rdtsc};
use crate::time::cycles_to_us;
use crate::{keyboard, kvmclock, report};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;
const PAGES_PER_MIB: u64 = MIB / PAGE as u64;
/// Pages written in one go when they are due (64 KiB).
const CHUNK_PAGES: u64 = 16;
/// Longest run the command takes (one hour).
const SECONDS_MAX: u64 = 3600;
/// Longest tick interval (as `counter`'s).
const TICK_MAX_MS: u64 = 3_600_000;
/// Writing that falls behind by more than this (the VM was paused) is not caught up at full speed:
/// the pace starts again from now.
const MAX_LAG_NS: u64 = 20_000_000;
const NS_PER_S: u128 = 1_000_000_000;

/// Word `i` of page `page` in pass `pass`.
fn word(pass: u64, page: u64, i: usize) -> u64 {
    ((pass << 32) | page)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(i as u64)
}

/// Nanoseconds of the KVM clock (the TSC's microseconds without one).
fn now_ns() -> u64 {
    match kvmclock::read() {
        Some(reading) => reading.ns,
        None => cycles_to_us(rdtsc()).saturating_mul(1000),
    }
}

/// The block being dirtied: `pages` pages from `addr`.
struct Block {
    addr: u64,
    pages: u64,
}

impl Block {
    /// One page's words.
    fn page(&mut self, page: u64) -> &mut [u64] {
        debug_assert!(page < self.pages);
        // SAFETY: `Frames::take_top` gave this page-aligned, identity-mapped RAM to the command
        // alone for as long as it runs (it is given back when it ends), and no device is ever
        // pointed at it; `page` is below `pages`.
        unsafe {
            core::slice::from_raw_parts_mut(
                (self.addr + page * PAGE as u64) as *mut u64,
                WORDS_PER_PAGE,
            )
        }
    }

    fn write(&mut self, pass: u64, page: u64) {
        for (i, slot) in self.page(page).iter_mut().enumerate() {
            *slot = word(pass, page, i);
        }
    }

    /// Whether a page holds what pass `pass` wrote.
    fn holds(&mut self, pass: u64, page: u64) -> bool {
        self.page(page)
            .iter()
            .enumerate()
            .all(|(i, w)| *w == word(pass, page, i))
    }
}

/// Pages found holding something else than the pass last written to them.
#[derive(Default)]
struct Damage {
    bad: u64,
    first_bad: Option<u64>,
}

impl Damage {
    fn record(&mut self, block: &Block, page: u64) {
        self.bad += 1;
        self.first_bad
            .get_or_insert(block.addr + page * PAGE as u64);
    }
}

/// What a run of `memdirty` asked for.
struct Request {
    mib: u64,
    mib_per_s: u64,
    seconds: u64,
    tick_ms: Option<u64>,
}

/// `memdirty <MiB> <MiB_per_s> <seconds> [tick_ms]`: fills a block of `MiB` MiB (pass 0, at full
/// speed), prints `LKS memdirty start ...`, then rewrites it page by page at `MiB_per_s` for
/// `seconds` of the KVM clock (or until a key), printing a `counter` line every `tick_ms` if
/// given; then checks that every page holds the pass it was last written with.
pub(super) fn command(machine: &mut Machine, args: &mut Args) {
    const EXPECTED: &str = "<MiB> <MiB_per_s> <seconds 1..3600> [tick_ms 1..3600000]";
    let (Some(mib), Some(mib_per_s), Some(seconds)) = (args.number(), args.number(), args.number())
    else {
        return usage("memdirty", EXPECTED);
    };
    let tick_ms = args.number();
    if mib == 0
        || mib_per_s == 0
        || !(1..=SECONDS_MAX).contains(&seconds)
        || tick_ms.is_some_and(|t| !(1..=TICK_MAX_MS).contains(&t))
    {
        return usage("memdirty", EXPECTED);
    }
    let Some(bytes) = mib.checked_mul(MIB) else {
        return error("memdirty", "too-large");
    };
    let Some(addr) = machine.frames.take_top(bytes) else {
        return error("memdirty", "too-large");
    };
    let mut block = Block {
        addr,
        pages: mib * PAGES_PER_MIB,
    };
    run(
        &mut block,
        &Request {
            mib,
            mib_per_s,
            seconds,
            tick_ms,
        },
    );
    machine.frames.give_back_top(addr, bytes);
}

fn run(block: &mut Block, request: &Request) {
    for page in 0..block.pages {
        block.write(0, page);
        if page % CHUNK_PAGES == 0 {
            keyboard::check();
        }
    }
    report::line(format_args!(
        "memdirty start mib={} mib_per_s={} seconds={} addr={:#x}",
        request.mib, request.mib_per_s, request.seconds, block.addr
    ));
    let pages_per_s = u128::from(request.mib_per_s.saturating_mul(PAGES_PER_MIB));
    let tick_ns = request.tick_ms.map(|ms| ms * 1_000_000);
    let start = now_ns();
    let end = start.saturating_add(request.seconds * 1_000_000_000);
    // Pages are due at `pages_per_s` from `base`; `written` of them since `base` are done.
    let (mut base, mut written) = (start, 0u64);
    let (mut pass, mut cursor, mut total) = (1u64, 0u64, 0u64);
    let mut next_tick = start;
    let mut damage = Damage::default();
    let stopped_by = loop {
        cpu::take_pending_irqs();
        if key_pressed() {
            break "key";
        }
        let now = now_ns();
        if now >= end {
            break "time";
        }
        if let Some(interval) = tick_ns {
            if now >= next_tick {
                tick(Some(total * PAGE as u64 / 1024));
                next_tick = next_tick.saturating_add(interval).max(now);
            }
        }
        let due_ns =
            |base: u64, pages: u64| base + (u128::from(pages) * NS_PER_S / pages_per_s) as u64;
        if now > due_ns(base, written) + MAX_LAG_NS {
            // Paused (or starved) for a while: the pace starts again from now.
            base = now;
            written = 0;
        }
        let due = (u128::from(now.saturating_sub(base)) * pages_per_s / NS_PER_S) as u64;
        if due > written {
            for _ in 0..(due - written).min(CHUNK_PAGES) {
                if !block.holds(pass - 1, cursor) {
                    damage.record(block, cursor);
                }
                block.write(pass, cursor);
                cursor += 1;
                if cursor == block.pages {
                    cursor = 0;
                    pass += 1;
                }
                written += 1;
                total += 1;
            }
            continue;
        }
        let mut wake = due_ns(base, written + CHUNK_PAGES).min(end);
        if tick_ns.is_some() {
            wake = wake.min(next_tick);
        }
        keyboard::nap_us((wake.saturating_sub(now) / 1000).max(1));
    };
    let ms = now_ns().saturating_sub(start) / 1_000_000;
    let run = Run {
        pass,
        cursor,
        total,
        ms,
        stopped_by,
    };
    check(block, request, &run, damage);
}

/// Where the writing stopped.
struct Run<'a> {
    pass: u64,
    cursor: u64,
    /// Pages rewritten.
    total: u64,
    /// KVM-clock milliseconds it ran.
    ms: u64,
    stopped_by: &'a str,
}

/// Checksums the block and compares every page with the pass it was last written in: pages
/// before the cursor with the last pass, the others with the one before. `damage` is what the
/// checks before each rewrite found.
fn check(block: &mut Block, request: &Request, run: &Run, mut damage: Damage) {
    let started = rdtsc();
    let mut fnv = Fnv::new();
    for page in 0..block.pages {
        let expected = if page < run.cursor {
            run.pass
        } else {
            run.pass - 1
        };
        if !block.holds(expected, page) {
            damage.record(block, page);
        }
        for w in block.page(page).iter() {
            fnv.update(&w.to_le_bytes());
        }
        if page % CHUNK_PAGES == 0 {
            keyboard::check();
        }
    }
    let us = cycles_to_us(rdtsc() - started);
    let mut console = report::ConsoleGuard::lock();
    console.write(format_args!(
        "LKS memdirty mib={} mib_per_s={} seconds={} passes={} dirtied_mib={} ms={} stopped_by={} fnv1a64={:016x} us={us}",
        request.mib,
        request.mib_per_s,
        request.seconds,
        run.pass - 1,
        run.total / PAGES_PER_MIB,
        run.ms,
        run.stopped_by,
        fnv.value()
    ));
    match damage.first_bad {
        None => console.write(format_args!(" status=match\n")),
        Some(addr) => console.write(format_args!(
            " status=mismatch bad_pages={} first_bad_addr={addr:#x}\n",
            damage.bad
        )),
    }
}
