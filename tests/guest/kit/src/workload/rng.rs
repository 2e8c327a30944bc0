//! `rng <nbytes>`: reads entropy and prints a checksum and a sanity check of the byte distribution.

use super::pattern::Fnv;
use super::{error, usage, Args, Machine};
use crate::report;

/// Bytes offered to the device per request.
const CHUNK: usize = 4096;
/// How long one request may take.
const TIMEOUT_MS: u64 = 5000;

/// `rng <nbytes>`
pub(super) fn command(machine: &mut Machine, args: &mut Args) {
    let Some(want) = args.number() else {
        return usage("rng", "<nbytes>");
    };
    let Some(buffer) = machine.frames.alloc(CHUNK) else {
        return error("rng", "out-of-memory");
    };
    let Some(rng) = machine.devices.rng() else {
        return error("rng", "no-rng-device");
    };
    let mut histogram = [0u64; 256];
    let mut fnv = Fnv::new();
    let (mut got, mut requests, mut ones) = (0u64, 0u64, 0u64);
    let mut failure = None;
    while got < want {
        let ask = (want - got).min(CHUNK as u64) as u32;
        requests += 1;
        match rng.fill(buffer.addr(), ask, TIMEOUT_MS) {
            Some(0) => {
                failure = Some("empty");
                break;
            }
            Some(len) => {
                let bytes = &buffer.bytes()[..len as usize];
                fnv.update(bytes);
                for byte in bytes {
                    histogram[usize::from(*byte)] += 1;
                    ones += u64::from(byte.count_ones());
                }
                got += u64::from(len);
            }
            None => {
                failure = Some("timeout");
                break;
            }
        }
    }
    let distinct = histogram.iter().filter(|c| **c > 0).count();
    let (min, max) = histogram
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), c| (lo.min(*c), hi.max(*c)));
    let ones_permille = if got > 0 { ones * 1000 / (got * 8) } else { 0 };
    report::line(format_args!(
        "rng bytes={got} requests={requests} fnv1a64={:016x} distinct={distinct} min_count={min} max_count={max} ones_permille={ones_permille} status={}",
        fnv.value(),
        failure.unwrap_or("ok")
    ));
}
