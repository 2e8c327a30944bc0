//! Page tables beyond the prebuilt 0..4 GiB identity map: RAM the VMM placed above 4 GiB is mapped
//! here, at CPL3, into spare page directories (the tables are user-accessible like all memory).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot::BootInfo;

const GIB: u64 = 1 << 30;
/// Page directories for GiB 4.. ; with them the identity map reaches 64 GiB.
const HIGH_DIRECTORIES: usize = 60;
/// The end of what can be identity-mapped.
pub const MAP_LIMIT: u64 = (4 + HIGH_DIRECTORIES as u64) * GIB;

const PTE_TABLE: u64 = 0x7; // present, writable, user
const PTE_LARGE: u64 = 0x87; // ... and 2 MiB page

#[repr(C, align(4096))]
struct Directories([[AtomicU64; 512]; HIGH_DIRECTORIES]);

/// Never zeroed (the section is not part of .bss): each directory is written whole before use.
#[link_section = ".lks_noinit.pagetables"]
static HIGH: Directories =
    Directories([const { [const { AtomicU64::new(0) }; 512] }; HIGH_DIRECTORIES]);

extern "C" {
    /// The prebuilt page-directory-pointer table (cpu/tables.s).
    static lks_pdpt: [AtomicU64; 512];
}

/// Identity-maps every GiB above 4 GiB that the memory map touches, up to [`MAP_LIMIT`]; returns the
/// end of the identity map.
pub fn map_high_memory(boot: &BootInfo) -> u64 {
    let top = boot
        .memory_map()
        .iter()
        .map(|r| r.start.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    let top = top.min(MAP_LIMIT);
    let mut end = 4 * GIB;
    while end < top {
        let gib = (end / GIB) as usize;
        let directory = &HIGH.0[gib - 4];
        for (index, entry) in directory.iter().enumerate() {
            entry.store(
                (end + ((index as u64) << 21)) | PTE_LARGE,
                Ordering::Relaxed,
            );
        }
        let table = directory.as_ptr() as u64;
        // SAFETY: lks_pdpt is a 4 KiB table in .data that only this function writes after start-up;
        // its entries are atomics, so sharing it is sound.
        let pdpt = unsafe { &lks_pdpt };
        // Release: the directory's entries are in memory before the CPU can walk through it.
        pdpt[gib].store(table | PTE_TABLE, Ordering::Release);
        end += GIB;
    }
    end
}
