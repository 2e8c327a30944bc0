//! Guest-memory commands for snapshot tests (`memfill`, `memcheck`): a block of RAM filled with the
//! sector pattern and checksummed, kept across commands, so that a test can fill it, snapshot the
//! VM, restore it in another process and check that the contents survived. Both run at CPL3 at
//! native speed, a 64 KiB chunk at a time (pattern and checksum while the chunk is in the cache).

use super::pattern::{check_sectors, fill_sectors, Fnv, SECTOR};
use super::{error, usage, Args, Machine};
use crate::cpu::rdtsc;
use crate::time::cycles_to_us;
use crate::{keyboard, report};

const MIB: u64 = 1 << 20;
/// Bytes handled between two looks at the keyboard.
const CHUNK: usize = 64 * 1024;

/// The block `memfill` filled last.
pub(super) struct Fill {
    addr: u64,
    mib: u64,
    seed: u64,
}

impl Fill {
    /// The block's bytes.
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `Frames::take_top` gave this identity-mapped RAM to the `Fill` alone (it is given
        // back only when the `Fill` is dropped), and no device is ever pointed at it.
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, (self.mib * MIB) as usize) }
    }
}

/// `memfill <MiB> <seed>`: fills a block of `MiB` MiB (the previous one is given back first) with
/// the sector pattern of `seed`, sector `s` being bytes `512 s ..` of the block.
pub(super) fn fill(machine: &mut Machine, args: &mut Args) {
    let (Some(mib), Some(seed)) = (args.number(), args.number()) else {
        return usage("memfill", "<MiB> <seed>");
    };
    if mib == 0 {
        return usage("memfill", "<MiB> <seed>");
    }
    if let Some(old) = machine.fill.take() {
        machine.frames.give_back_top(old.addr, old.mib * MIB);
    }
    let Some(addr) = mib
        .checked_mul(MIB)
        .and_then(|bytes| machine.frames.take_top(bytes))
    else {
        return error("memfill", "too-large");
    };
    let mut block = Fill { addr, mib, seed };
    let start = rdtsc();
    let mut fnv = Fnv::new();
    for (index, chunk) in block.bytes().chunks_mut(CHUNK).enumerate() {
        fill_sectors(chunk, seed, (index * CHUNK / SECTOR) as u64);
        fnv.update(chunk);
        keyboard::check();
    }
    let us = cycles_to_us(rdtsc() - start);
    machine.fill = Some(block);
    report::line(format_args!(
        "memfill mib={mib} seed={seed} addr={addr:#x} fnv1a64={:016x} us={us}",
        fnv.value()
    ));
}

/// `memcheck`: checksums the block again and compares it with the pattern it was filled with.
pub(super) fn check(machine: &mut Machine) {
    let Some(block) = machine.fill.as_mut() else {
        return error("memcheck", "no-fill");
    };
    let start = rdtsc();
    let mut fnv = Fnv::new();
    let (mut bad, mut first_bad) = (0, None);
    let (addr, mib, seed) = (block.addr, block.mib, block.seed);
    for (index, chunk) in block.bytes().chunks(CHUNK).enumerate() {
        fnv.update(chunk);
        let (bad_here, first) = check_sectors(chunk, seed, (index * CHUNK / SECTOR) as u64);
        bad += bad_here;
        first_bad = first_bad.or(first);
        keyboard::check();
    }
    let us = cycles_to_us(rdtsc() - start);
    let mut console = report::ConsoleGuard::lock();
    console.write(format_args!(
        "LKS memcheck mib={mib} seed={seed} addr={addr:#x} fnv1a64={:016x} us={us}",
        fnv.value()
    ));
    match first_bad {
        None => console.write(format_args!(" status=match\n")),
        Some(sector) => console.write(format_args!(
            " status=mismatch bad_sectors={bad} first_bad_addr={:#x}\n",
            addr + sector * SECTOR as u64
        )),
    }
}
