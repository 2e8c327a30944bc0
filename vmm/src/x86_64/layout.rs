//! Where things sit in the guest's physical address space.
//!
//! ```text
//! 0x0000_0500  GDT (boot-time, built by the VMM)       0x0000_6000  PVH start info + module list
//! 0x0000_7000  zero page (boot_params) / PVH memmap     0x0000_8ff0  boot stack top
//! 0x0000_9000  page tables (PML4, PDPT, PD)             0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)                          0x000f_0000  MP table (reserved)
//! 0x0010_0000  kernel load address, RAM up to the MMIO gap
//! 0xc000_0000  MMIO gap: virtio-mmio windows from 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB
//! ```

/// The boot-time GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot-time IDT (empty; the guest installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: one page each for the PML4, the PDPT and the page directory.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table for the first 512 GiB.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory mapping the first GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room reserved for the command line, NUL included (the x86 boot protocol's limit).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below it is usable, from it to 1 MiB is not.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the EBDA (the VGA hole follows).
pub const EBDA_END: u64 = 0xa0000;
/// The BIOS area where the MP floating pointer and config table live (Linux scans it).
pub const MPTABLE_START: u64 = 0xf0000;
/// End of the low megabyte.
pub const BIOS_END: u64 = 0x10_0000;
/// Where kernels are loaded and high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// First address of the 32-bit MMIO gap: RAM beyond it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The IOAPIC's MMIO window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO window.
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the real-mode TSS on Intel hosts, inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u32 = 24;
