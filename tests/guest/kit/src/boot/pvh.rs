//! PVH's `struct hvm_start_info` (Xen's public arch-x86/hvm/start_info.h): command line, modules (the
//! first is the initrd), RSDP and, from version 1 on, the memory map.

use super::{BootInfo, Initrd, MemoryRegion};
use crate::phys::{read_u32, read_u64};

const VERSION: u64 = 4;
const NR_MODULES: u64 = 12;
const MODLIST_PADDR: u64 = 16;
const CMDLINE_PADDR: u64 = 24;
const RSDP_PADDR: u64 = 32;
const MEMMAP_PADDR: u64 = 40;
const MEMMAP_ENTRIES: u64 = 48;
const MEMMAP_ENTRY_SIZE: u64 = 24;

/// Reads hvm_start_info at `start_info` into `boot` (the entry checked its magic).
pub(super) fn parse(start_info: u64, boot: &mut BootInfo) {
    boot.set_cmdline_from(read_u64(start_info + CMDLINE_PADDR));

    let modules = read_u64(start_info + MODLIST_PADDR);
    if read_u32(start_info + NR_MODULES) > 0 && modules != 0 {
        let (addr, size) = (read_u64(modules), read_u64(modules + 8));
        if size != 0 {
            boot.initrd = Some(Initrd { addr, size });
        }
    }

    let rsdp = read_u64(start_info + RSDP_PADDR);
    boot.rsdp_hint = (rsdp != 0).then_some(rsdp);

    if read_u32(start_info + VERSION) >= 1 {
        let table = read_u64(start_info + MEMMAP_PADDR);
        for index in 0..u64::from(read_u32(start_info + MEMMAP_ENTRIES)) {
            let entry = table + index * MEMMAP_ENTRY_SIZE;
            boot.push_region(MemoryRegion {
                start: read_u64(entry),
                size: read_u64(entry + 8),
                kind: read_u32(entry + 16),
            });
        }
    }
}
