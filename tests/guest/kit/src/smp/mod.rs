//! Starting the application processors the way firmware-less hardware expects: INIT-SIPI-SIPI from
//! the BSP through its local APIC, with a real-mode trampoline copied to a free page below 1 MiB
//! (`trampoline.s`). Each AP reaches CPL3 on its own stacks and checks in by bumping a counter.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::boot::{BootInfo, E820_RAM};
use crate::platform::Platform;
use crate::{apic, cpu};

global_asm!(
    include_str!("trampoline.s"),
    sel_code32 = const cpu::SEL_CODE32,
    sel_data = const cpu::SEL_DATA,
    kind_ap = const crate::boot::KIND_AP,
    gdt_limit = const cpu::SEL_TSS as usize + cpu::MAX_CPUS * 16 - 1,
    options(att_syntax)
);

extern "C" {
    static lks_trampoline_start: u8;
    static lks_trampoline_end: u8;
}

/// CPUs that have reached CPL3 (the BSP counts itself).
static ONLINE: AtomicU32 = AtomicU32::new(1);

const PAGE: u64 = 4096;
/// The trampoline must be below 1 MiB; this also keeps clear of the EBDA and VGA/BIOS areas.
const TRAMPOLINE_LIMIT: u64 = 0x9f000;
/// TSC cycles to wait after the first SIPI before sending the second (about 10 ms at 2 GHz).
const FIRST_SIPI_WAIT: u64 = 20_000_000;
/// TSC cycles to wait after the second SIPI for the remaining check-ins (about 1 s at 2 GHz).
const SECOND_SIPI_WAIT: u64 = 2_000_000_000;

/// How many CPUs have checked in so far.
pub fn online() -> u32 {
    ONLINE.load(Ordering::Acquire)
}

/// Called by each AP once it runs Rust code at CPL3.
pub(crate) fn check_in() {
    ONLINE.fetch_add(1, Ordering::AcqRel);
}

/// Picks a usable RAM page below [`TRAMPOLINE_LIMIT`], above page 0 (real-mode IVT and BIOS data),
/// that the initrd does not cover.
fn trampoline_page(boot: &BootInfo) -> Option<u64> {
    let initrd = boot.initrd.map(|i| (i.addr, i.addr + i.size));
    boot.memory_map()
        .iter()
        .filter(|r| r.kind == E820_RAM)
        .find_map(|region| {
            let first = region.start.max(PAGE).next_multiple_of(PAGE);
            let end = region
                .start
                .saturating_add(region.size)
                .min(TRAMPOLINE_LIMIT);
            (first..end.saturating_sub(PAGE - 1))
                .step_by(PAGE as usize)
                .find(|page| {
                    initrd.is_none_or(|(start, stop)| page + PAGE <= start || *page >= stop)
                })
        })
}

fn wait_for(expected: u32, cycles: u64) -> bool {
    let start = cpu::rdtsc();
    while online() < expected {
        if cpu::rdtsc().wrapping_sub(start) > cycles {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Starts every AP the platform lists and waits a bounded time for them; returns the CPUs online.
pub fn start_aps(boot: &BootInfo, platform: &Platform) -> u32 {
    let bsp = apic::local_apic_id();
    let aps = || {
        platform
            .apic_ids()
            .iter()
            .copied()
            .filter(move |id| *id != bsp)
    };
    let count = aps().count() as u32;
    if count == 0 {
        return online();
    }
    let Some(page) = trampoline_page(boot) else {
        return online();
    };
    // SAFETY: both are labels in the kit's own code (trampoline.s), start before end; the bytes
    // between them are the trampoline, read-only code.
    let code = unsafe {
        let start = &raw const lks_trampoline_start;
        let end = &raw const lks_trampoline_end;
        core::slice::from_raw_parts(start, end.offset_from(start) as usize)
    };
    crate::phys::write_bytes(page, code);

    let expected = online() + count;
    let vector = (page / PAGE) as u8;
    aps().for_each(apic::send_init);
    aps().for_each(|id| apic::send_startup(id, vector));
    if !wait_for(expected, FIRST_SIPI_WAIT) {
        // An AP that already started ignores the second SIPI.
        aps().for_each(|id| apic::send_startup(id, vector));
        wait_for(expected, SECOND_SIPI_WAIT);
    }
    online()
}
