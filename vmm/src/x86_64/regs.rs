//! The register state a vCPU starts in: for the Linux 64-bit boot protocol (long mode, identity
//! paging of the first GiB, RSI -> boot_params) or for PVH (32-bit protected mode, paging off,
//! EBX -> hvm_start_info); and the local APIC's LINT pins wired as a PC has them.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

/// Why a vCPU's registers could not be set.
#[derive(Debug, Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("cannot write boot {what} into guest memory: {source}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM register ioctl failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux x86-64 boot protocol: 64-bit entry at this address.
    Linux64(u64),
    /// PVH: 32-bit entry at this address.
    Pvh(u64),
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Segment descriptor flags (access byte and the flags nibble, as laid out in bits 40..56).
const CODE64: u16 = 0xa09b;
const CODE32: u16 = 0xc09b;
const DATA: u16 = 0xc093;
const TSS: u16 = 0x808b;

const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of a GDT descriptor.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: 1 - bit(47),
        padding: 0,
    }
}

fn write_u64s(
    mem: &GuestMemoryMmap,
    at: u64,
    what: &'static str,
    values: &[u64],
) -> Result<(), RegsError> {
    for (i, v) in values.iter().enumerate() {
        mem.write_obj(*v, GuestAddress(at + 8 * i as u64))
            .map_err(|source| RegsError::GuestMemory { what, source })?;
    }
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages, for the 64-bit entry.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write_u64s(mem, PML4_START, "PML4", &[PDPTE_START | PRESENT_RW])?;
    write_u64s(mem, PDPTE_START, "PDPT", &[PDE_START | PRESENT_RW])?;
    let pde: Vec<u64> = (0..512u64)
        .map(|i| (i << 21) | PAGE_SIZE_2M | PRESENT_RW)
        .collect();
    write_u64s(mem, PDE_START, "page directory", &pde)
}

/// Sets up the boot vCPU's registers (and the GDT, IDT and page tables they point to).
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), RegsError> {
    let code = match entry {
        BootEntry::Linux64(_) => CODE64,
        BootEntry::Pvh(_) => CODE32,
    };
    let gdt = [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ];
    write_u64s(mem, BOOT_GDT_START, "GDT", &gdt)?;
    write_u64s(mem, BOOT_IDT_START, "IDT", &[0])?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment(gdt[1], CODE_SELECTOR);
    let data = segment(gdt[2], DATA_SELECTOR);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(gdt[3], TSS_SELECTOR);

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Linux64(rip) => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootEntry::Pvh(rip) => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = PVH_INFO_START;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("set FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to the 8259 (ExtINT) and LINT1 to NMI, as the MP table says.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("get LAPIC"))?;
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_kvm_segments() {
        let cs = segment(gdt_entry(CODE64, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!(
            (cs.type_, cs.s, cs.present, cs.l, cs.db, cs.g),
            (0xb, 1, 1, 1, 0, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.unusable), (0, 0xffff_ffff, 0));
        let cs32 = segment(gdt_entry(CODE32, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = segment(gdt_entry(DATA, 0, 0xfffff), DATA_SELECTOR);
        assert_eq!((ds.type_, ds.db), (0x3, 1));
        let tss = segment(gdt_entry(TSS, 0, 0xfffff), TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
        assert_eq!(gdt_entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        let based = segment(gdt_entry(DATA, 0x1234_5678, 0xff), 0);
        assert_eq!((based.base, based.limit), (0x1234_5678, 0xf_ffff));
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = crate::memory::create_guest_memory(16 << 20, false).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn delivery_mode_bits() {
        assert_eq!(with_delivery_mode(0x10700, APIC_MODE_NMI), 0x10400);
        let mut s = kvm_lapic_state::default();
        set_lapic_reg(&mut s, APIC_LVT1, 0x8040_0123);
        assert_eq!(lapic_reg(&s, APIC_LVT1), 0x8040_0123);
    }
}
