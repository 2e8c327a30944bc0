//! The Linux boot protocol's `struct boot_params` (the "zero page"), as a VMM fills it for the 64-bit
//! and 32-bit entries. Offsets are those of Documentation/arch/x86/zero-page.rst and boot.rst.

use super::{BootInfo, Initrd, MemoryRegion};
use crate::phys::{read_u32, read_u64, read_u8};

const ACPI_RSDP_ADDR: u64 = 0x070;
const EXT_RAMDISK_IMAGE: u64 = 0x0c0;
const EXT_RAMDISK_SIZE: u64 = 0x0c4;
const EXT_CMD_LINE_PTR: u64 = 0x0c8;
const E820_ENTRIES: u64 = 0x1e8;
const RAMDISK_IMAGE: u64 = 0x218;
const RAMDISK_SIZE: u64 = 0x21c;
const CMD_LINE_PTR: u64 = 0x228;
const E820_TABLE: u64 = 0x2d0;
const E820_ENTRY_SIZE: u64 = 20;

/// Reads boot_params at `zero_page` into `boot`.
pub(super) fn parse(zero_page: u64, boot: &mut BootInfo) {
    let low_high = |low: u64, high: u64| {
        u64::from(read_u32(zero_page + low)) | (u64::from(read_u32(zero_page + high)) << 32)
    };
    boot.set_cmdline_from(low_high(CMD_LINE_PTR, EXT_CMD_LINE_PTR));

    let entries = u64::from(read_u8(zero_page + E820_ENTRIES));
    for index in 0..entries {
        let entry = zero_page + E820_TABLE + index * E820_ENTRY_SIZE;
        boot.push_region(MemoryRegion {
            start: read_u64(entry),
            size: read_u64(entry + 8),
            kind: read_u32(entry + 16),
        });
    }

    let addr = low_high(RAMDISK_IMAGE, EXT_RAMDISK_IMAGE);
    let size = low_high(RAMDISK_SIZE, EXT_RAMDISK_SIZE);
    if addr != 0 && size != 0 {
        boot.initrd = Some(Initrd { addr, size });
    }

    let rsdp = read_u64(zero_page + ACPI_RSDP_ADDR);
    boot.rsdp_hint = (rsdp != 0).then_some(rsdp);
}
