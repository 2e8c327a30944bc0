//! What the VMM tells the kernel at entry: the e820 memory map, the command line, the initrd,
//! written as Linux `boot_params` (the zero page) or as a PVH `hvm_start_info`.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::layout::{
    BIOS_END, CMDLINE_START, EBDA_END, EBDA_START, HIMEM_START, MPTABLE_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::memory::{ram_ranges, GuestMemoryMmap};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One range of the guest's physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map for `mem_bytes` of RAM: low RAM up to the EBDA, the EBDA and BIOS area
/// reserved (the MP table lives there), then RAM from 1 MiB, skipping the 32-bit MMIO gap.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: EBDA_END - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: MPTABLE_START,
            size: BIOS_END - MPTABLE_START,
            kind: E820_RESERVED,
        },
    ];
    for (base, len) in ram_ranges(mem_bytes) {
        let start = base.0.max(HIMEM_START);
        let end = base.0 + len;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// The initrd as placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Error writing boot information.
pub type BootInfoError = linux_loader::configurator::Error;

/// Writes the Linux zero page. `header` is the bzImage's own setup header, when there is one.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
) -> Result<(), BootInfoError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes the PVH start info, its memory map and (for an initrd) its module list.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
) -> Result<(), BootInfoError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

    #[test]
    fn map_for_small_memory() {
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 0x10_0000,
                size: (128 << 20) - 0x10_0000,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn map_for_large_memory_skips_gap() {
        let map = e820_map(5 << 30);
        let last = map[map.len() - 1];
        assert_eq!(last.addr, MMIO_GAP_END);
        assert_eq!(last.size, (5 << 30) - MMIO_GAP_START);
        assert_eq!(map[3].addr + map[3].size, MMIO_GAP_START);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_map() {
        let mem = crate::memory::create_guest_memory(64 << 20, false).unwrap();
        let map = e820_map(64 << 20);
        let initrd = InitrdPlacement {
            addr: 0x300_0000,
            size: 1234,
        };
        write_zero_page(&mem, None, 42, Some(initrd), &map).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!(p.e820_entries as usize, map.len());
        assert_eq!({ p.e820_table[3].addr }, HIMEM_START);
    }

    #[test]
    fn pvh_start_info_is_complete() {
        let mem = crate::memory::create_guest_memory(64 << 20, false).unwrap();
        let map = e820_map(64 << 20);
        let initrd = InitrdPlacement {
            addr: 0x200_0000,
            size: 99,
        };
        write_pvh_start_info(&mem, Some(initrd), &map).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries as usize, map.len());
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x200_0000, 99));
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e.addr, e.type_), (EBDA_START, E820_RESERVED));
    }
}
