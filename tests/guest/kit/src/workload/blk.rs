//! Block commands (`blk <n> ...`) and benchmarks (`bench blk-*`). Transfers are split into requests
//! of at most 1 MiB (or the device's segment limits) with several in flight at once; `blk stream`
//! keeps 4 KiB requests in flight for as long as a pause test needs.

use super::pattern::{check_sectors, fill_sectors, Fnv, XorShift, SECTOR};
use super::{error, key_pressed, usage, Args, Machine};
use crate::report;
use crate::time::cycles_to_us;
use crate::virtio::blk::{Blk, Status, ID_LEN, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use crate::virtio::{Completion, Waiter};

/// How long one request may take before the command gives up.
pub(super) const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Largest request of the commands and the sequential benchmarks.
const REQUEST_MAX: u64 = 1 << 20;
/// Requests in flight for commands and sequential benchmarks.
const DEPTH: usize = 4;
/// Most requests in flight the pipeline tracks.
const DEPTH_MAX: usize = 64;
/// Sectors per request of `blk stream` (4 KiB).
const STREAM_SECTORS: u64 = 8;

/// One request of a pipelined transfer.
pub(super) struct Request {
    pub kind: u32,
    pub sector: u64,
    pub addr: u64,
    pub len: u64,
}

/// Runs `total` requests with up to `depth` in flight, notifying once per batch; `make(i, slot)`
/// describes request `i`, which may use buffer slot `slot` (< depth) until it completes. Returns
/// the first failed status, if any, after every request finished.
pub(super) fn pipeline(
    blk: &mut Blk,
    total: u64,
    depth: usize,
    mut make: impl FnMut(u64, usize) -> Request,
) -> Result<(), Status> {
    let depth = depth.clamp(1, DEPTH_MAX);
    let mut slot_of_head = [0u8; 256];
    let mut free_slots: u64 = if depth == 64 {
        u64::MAX
    } else {
        (1 << depth) - 1
    };
    let (mut issued, mut done) = (0u64, 0u64);
    let mut failure = None;
    while done < total {
        while issued < total && free_slots != 0 {
            let slot = free_slots.trailing_zeros() as usize;
            let request = make(issued, slot);
            let Some(head) = blk.submit(request.kind, request.sector, request.addr, request.len)
            else {
                break;
            };
            slot_of_head[usize::from(head)] = slot as u8;
            free_slots &= !(1 << slot);
            issued += 1;
        }
        blk.kick();
        let waiter = Waiter::new(REQUEST_TIMEOUT_MS);
        let Some(mut completed) = blk.wait(&waiter) else {
            return Err(Status::Timeout);
        };
        loop {
            let (head, status) = completed;
            free_slots |= 1 << slot_of_head[usize::from(head)];
            done += 1;
            if status != Status::Ok {
                failure.get_or_insert(status);
            }
            match blk.poll() {
                Some(next) => completed = next,
                None => break,
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

fn status_name(result: Result<(), Status>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(status) => status.name(),
    }
}

/// `blk <n> info|id|flush|write|read ...`
pub(super) fn command(machine: &mut Machine, args: &mut Args) {
    let Some(n) = args.number().map(|n| n as usize) else {
        return usage(
            "blk",
            "<n> info|id|flush|write <sector> <count> <seed>|read <sector> <count> [seed]|stream <sector> <count> <seed> <passes>",
        );
    };
    let page = machine.frames.alloc(4096).map(|page| page.addr());
    let Some(blk) = machine.devices.blk(n) else {
        return error("blk", "no-such-blk-device");
    };
    match args.word() {
        Some(b"info") => {
            let mut id = [0u8; ID_LEN];
            let status = get_id(blk, page, &mut id);
            report::line(format_args!(
                "blk info dev={n} capacity={} bytes={} ro={} flush={} blk_size={} features={:#x} id_status={} id={}",
                blk.capacity,
                blk.capacity * SECTOR as u64,
                u8::from(blk.read_only()),
                u8::from(blk.has_flush()),
                blk.blk_size,
                blk.features,
                status.name(),
                printable_id(&id),
            ));
        }
        Some(b"id") => {
            let mut id = [0u8; ID_LEN];
            let status = get_id(blk, page, &mut id);
            report::line(format_args!(
                "blk id dev={n} status={} id={}",
                status.name(),
                printable_id(&id)
            ));
        }
        Some(b"flush") => {
            if !blk.has_flush() {
                return report::line(format_args!(
                    "blk flush dev={n} status=skipped reason=no-flush-feature"
                ));
            }
            let status = blk.request(T_FLUSH, 0, 0, 0, REQUEST_TIMEOUT_MS);
            report::line(format_args!("blk flush dev={n} status={}", status.name()));
        }
        Some(kind @ (b"write" | b"read")) => {
            let write = kind == b"write";
            let (Some(sector), Some(count)) = (args.number(), args.number()) else {
                return usage(
                    "blk",
                    "<n> write <sector> <count> <seed> | read <sector> <count> [seed]",
                );
            };
            let seed = args.number();
            if write && seed.is_none() {
                return usage("blk", "<n> write <sector> <count> <seed>");
            }
            transfer(machine, n, write, sector, count, seed);
        }
        Some(b"stream") => {
            let (Some(sector), Some(count), Some(seed), Some(passes)) =
                (args.number(), args.number(), args.number(), args.number())
            else {
                return usage("blk", "<n> stream <sector> <count> <seed> <passes>");
            };
            stream(machine, n, (sector, count), seed, passes);
        }
        _ => usage("blk", "<n> info|id|flush|write|read|stream ..."),
    }
}

/// Reads the device ID into `id` through the scratch page.
fn get_id(blk: &mut Blk, page: Option<u64>, id: &mut [u8; ID_LEN]) -> Status {
    let Some(page) = page else {
        return Status::NotQueued;
    };
    let status = blk.request(T_GET_ID, 0, page, ID_LEN as u64, REQUEST_TIMEOUT_MS);
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = crate::phys::read_u8(page + i as u64);
    }
    status
}

/// The ID string up to its first NUL, as printable text.
fn printable_id(id: &[u8; ID_LEN]) -> crate::boot::Printable<'_> {
    let end = id.iter().position(|b| *b == 0).unwrap_or(ID_LEN);
    crate::boot::Printable(&id[..end])
}

/// `blk <n> write|read <sector> <count> [seed]`: the whole transfer in one buffer, in 1 MiB requests.
fn transfer(
    machine: &mut Machine,
    n: usize,
    write: bool,
    sector: u64,
    count: u64,
    seed: Option<u64>,
) {
    let name = if write { "blk write" } else { "blk read" };
    let bytes = count * SECTOR as u64;
    let Some(mut buffer) = machine.frames.alloc(bytes as usize) else {
        return error(name, "too-large");
    };
    let blk = machine.devices.blk(n).expect("the caller checked");
    let beyond = sector
        .checked_add(count)
        .is_none_or(|end| end > blk.capacity);
    if write {
        fill_sectors(buffer.bytes_mut(), seed.unwrap_or(0), sector);
    }
    let chunk = REQUEST_MAX.min(blk.max_request_bytes()) / SECTOR as u64 * SECTOR as u64;
    let requests = bytes.div_ceil(chunk);
    let base = buffer.addr();
    let kind = if write { T_OUT } else { T_IN };
    let result = pipeline(blk, requests, DEPTH, |i, _| Request {
        kind,
        sector: sector + i * chunk / SECTOR as u64,
        addr: base + i * chunk,
        len: chunk.min(bytes - i * chunk),
    });
    let mut fnv = Fnv::new();
    fnv.update(buffer.bytes());
    let mut console = report::ConsoleGuard::lock();
    console.write(format_args!(
        "LKS {name} dev={n} sector={sector} count={count} status={} fnv1a64={:016x}",
        status_name(result),
        fnv.value()
    ));
    if beyond {
        console.write(format_args!(" beyond_capacity=1"));
    }
    if let (false, Some(seed)) = (write, seed) {
        let (bad, first_bad) = check_sectors(buffer.bytes(), seed, sector);
        match first_bad {
            None => console.write(format_args!(" pattern=match")),
            Some(first) => console.write(format_args!(
                " pattern=mismatch bad_sectors={bad} first_bad={first}"
            )),
        }
    }
    console.write(format_args!("\n"));
}

/// Runs 4 KiB requests of `kind` over `range` (first sector, count) from `buffer`, [`DEPTH`] in
/// flight.
fn stream_pass(blk: &mut Blk, kind: u32, range: (u64, u64), buffer: u64) -> Result<(), Status> {
    let (sector, count) = range;
    pipeline(blk, count.div_ceil(STREAM_SECTORS), DEPTH, |i, _| {
        let first = i * STREAM_SECTORS;
        Request {
            kind,
            sector: sector + first,
            addr: buffer + first * SECTOR as u64,
            len: STREAM_SECTORS.min(count - first) * SECTOR as u64,
        }
    })
}

/// `blk <n> stream <sector> <count> <seed> <passes>`: pass `p` writes the pattern of seed
/// `seed + p` over the range in 4 KiB requests, [`DEPTH`] in flight, so that a pause or snapshot
/// taken at any time catches requests in flight; each pass prints a line. A key on the console
/// stops it between passes. Then the range is read back and compared with the last pass's pattern:
/// a lost write leaves an older pass's data, a request the device replayed late puts one back.
fn stream(machine: &mut Machine, n: usize, range: (u64, u64), seed: u64, passes: u64) {
    let (sector, count) = range;
    let Some(mut buffer) = machine.frames.alloc((count * SECTOR as u64) as usize) else {
        return error("blk stream", "too-large");
    };
    let blk = machine.devices.blk(n).expect("the caller checked");
    if count == 0
        || sector
            .checked_add(count)
            .is_none_or(|end| end > blk.capacity)
    {
        return error("blk stream", "beyond-capacity");
    }
    let requests = count.div_ceil(STREAM_SECTORS);
    let bogus_before = blk.queue_mut().bogus_used;
    report::line(format_args!(
        "blk stream start dev={n} sector={sector} count={count} passes={passes} requests_per_pass={requests}"
    ));
    let start = crate::cpu::rdtsc();
    let (mut done, mut result, mut stopped_by) = (0, Ok(()), "count");
    while done < passes {
        if key_pressed() {
            stopped_by = "key";
            break;
        }
        let pass_seed = seed.wrapping_add(done);
        fill_sectors(buffer.bytes_mut(), pass_seed, sector);
        result = stream_pass(blk, T_OUT, range, buffer.addr());
        report::line(format_args!(
            "blk stream pass={done} dev={n} seed={pass_seed} status={}",
            status_name(result)
        ));
        if result.is_err() {
            stopped_by = "error";
            break;
        }
        done += 1;
    }
    let us = cycles_to_us(crate::cpu::rdtsc() - start);
    let readback = stream_pass(blk, T_IN, range, buffer.addr());
    let bad_used = blk.queue_mut().bogus_used - bogus_before;
    let mut fnv = Fnv::new();
    fnv.update(buffer.bytes());
    let mut console = report::ConsoleGuard::lock();
    console.write(format_args!(
        "LKS blk stream dev={n} sector={sector} count={count} passes={done} requests={} status={} stopped_by={stopped_by} bad_used={bad_used} us={us} fnv1a64={:016x}",
        done * requests,
        status_name(result),
        fnv.value()
    ));
    match (done, readback) {
        (0, _) => console.write(format_args!(" readback=none\n")),
        (_, Err(status)) => console.write(format_args!(" readback={}\n", status.name())),
        (_, Ok(())) => {
            let last_seed = seed.wrapping_add(done - 1);
            match check_sectors(buffer.bytes(), last_seed, sector) {
                (_, None) => console.write(format_args!(" last_seed={last_seed} readback=match\n")),
                (bad, Some(first)) => console.write(format_args!(
                    " last_seed={last_seed} readback=mismatch bad_sectors={bad} first_bad={first}\n"
                )),
            }
        }
    }
}

/// Prints the end of a benchmark: `LKS bench done bytes=<n> ops=<n> ...`.
pub(super) fn bench_done(name: &str, bytes: u64, ops: u64, cycles: u64, status: &str) {
    report::line(format_args!(
        "bench done bytes={bytes} ops={ops} name={name} us={} status={status}",
        cycles_to_us(cycles)
    ));
}

/// `bench blk-seq-read|blk-seq-write <n> <MiB>`: 1 MiB requests, [`DEPTH`] in flight, polled.
pub(super) fn bench_sequential(machine: &mut Machine, args: &mut Args, write: bool) {
    let name = if write {
        "blk-seq-write"
    } else {
        "blk-seq-read"
    };
    let (Some(n), Some(mib)) = (args.number(), args.number()) else {
        return usage("bench", "blk-seq-read|blk-seq-write <n> <MiB>");
    };
    let Some(mut buffer) = machine.frames.alloc((DEPTH as u64 * REQUEST_MAX) as usize) else {
        return error("bench", "out-of-memory");
    };
    let Some(blk) = machine.devices.blk(n as usize) else {
        return error("bench", "no-such-blk-device");
    };
    let chunk = REQUEST_MAX.min(blk.max_request_bytes()) / SECTOR as u64 * SECTOR as u64;
    let sectors_per = chunk / SECTOR as u64;
    let span = blk.capacity / sectors_per;
    if span == 0 {
        return error("bench", "device-too-small");
    }
    fill_sectors(buffer.bytes_mut(), n, 0);
    let requests = mib * (1 << 20) / chunk;
    let base = buffer.addr();
    let kind = if write { T_OUT } else { T_IN };
    let completion = blk.completion();
    blk.set_completion(Completion::Poll);
    report::line(format_args!(
        "bench start {name} dev={n} bytes={} request={chunk} depth={DEPTH}",
        requests * chunk
    ));
    let start = crate::cpu::rdtsc();
    let result = pipeline(blk, requests, DEPTH, |i, slot| Request {
        kind,
        sector: (i % span) * sectors_per,
        addr: base + slot as u64 * chunk,
        len: chunk,
    });
    let cycles = crate::cpu::rdtsc() - start;
    blk.set_completion(completion);
    bench_done(
        name,
        requests * chunk,
        requests,
        cycles,
        status_name(result),
    );
}

/// `bench blk-rand-read <n> <requests> <qd>`: 4 KiB reads at random 4 KiB-aligned offsets, `qd`
/// in flight, polled.
pub(super) fn bench_random(machine: &mut Machine, args: &mut Args) {
    const BLOCK: u64 = 4096;
    let (Some(n), Some(requests), Some(qd)) = (args.number(), args.number(), args.number()) else {
        return usage("bench", "blk-rand-read <n> <requests> <qd>");
    };
    let Some(blk) = machine.devices.blk(n as usize) else {
        return error("bench", "no-such-blk-device");
    };
    let depth = (qd as usize)
        .clamp(1, DEPTH_MAX)
        .min(blk.max_in_flight(BLOCK));
    let blocks = blk.capacity / (BLOCK / SECTOR as u64);
    if blocks == 0 {
        return error("bench", "device-too-small");
    }
    let Some(buffer) = machine.frames.alloc(depth * BLOCK as usize) else {
        return error("bench", "out-of-memory");
    };
    let blk = machine.devices.blk(n as usize).expect("checked above");
    let base = buffer.addr();
    let mut random = XorShift::new(0x5eed ^ requests);
    let completion = blk.completion();
    blk.set_completion(Completion::Poll);
    report::line(format_args!(
        "bench start blk-rand-read dev={n} requests={requests} qd={depth} request={BLOCK}"
    ));
    let start = crate::cpu::rdtsc();
    let result = pipeline(blk, requests, depth, |_, slot| Request {
        kind: T_IN,
        sector: random.next_u64() % blocks * (BLOCK / SECTOR as u64),
        addr: base + slot as u64 * BLOCK,
        len: BLOCK,
    });
    let cycles = crate::cpu::rdtsc() - start;
    blk.set_completion(completion);
    bench_done(
        "blk-rand-read",
        requests * BLOCK,
        requests,
        cycles,
        status_name(result),
    );
}
