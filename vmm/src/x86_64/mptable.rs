//! The Intel MultiProcessor Specification (1.4) table, by which the guest finds its vCPUs, its
//! IOAPIC and how ISA interrupts are routed. Linux and the test guests scan 0xF0000-0xFFFFF for
//! the floating pointer.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::cpuid::CpuTopology;
use super::layout::{APIC_START, IOAPIC_PINS, IOAPIC_START, MPTABLE_START};
use crate::memory::GuestMemoryMmap;

/// Why the MP table could not be written.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// More vCPUs than APIC IDs the table can describe.
    #[error("{0} vCPUs do not fit in an MP table")]
    TooManyCpus(u32),
    /// Guest memory does not reach the table's place.
    #[error("cannot write the MP table into guest memory: {0}")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6, as KVM's default CPU signature suggests; the guest reads the real one from CPUID.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer structure followed by the configuration table, as they will sit
/// at `base` in guest memory.
fn build(base: u64, topo: &CpuTopology, vcpus: u32) -> Result<Vec<u8>, MpTableError> {
    let last_apic_id = topo.apic_id(vcpus.saturating_sub(1));
    if vcpus == 0 || last_apic_id >= 254 {
        return Err(MpTableError::TooManyCpus(vcpus));
    }
    let ioapic_id = (last_apic_id + 1) as u8;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[
            ENTRY_PROCESSOR,
            topo.apic_id(cpu) as u8,
            APIC_VERSION,
            flags,
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n goes to IOAPIC pin n, edge-triggered and active-high (the ISA default, flags 0).
    for irq in 0..IOAPIC_PINS as u8 {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // The 8259 on every LAPIC's LINT0, NMI on LINT1.
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        1,
    ]);
    count += 2;

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_len = (HEADER_LEN + entries.len()) as u16;
    let table_addr = (base + FLOATING_LEN as u64) as u32;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum placeholder
    header.extend_from_slice(b"LOCKSTEP");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // no extended table
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, rev 1.4, no default config
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `vcpus` vCPUs at [`MPTABLE_START`].
pub fn write_mptable(
    mem: &GuestMemoryMmap,
    topo: &CpuTopology,
    vcpus: u32,
) -> Result<(), MpTableError> {
    let bytes = build(MPTABLE_START, topo, vcpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a table the way a guest does and returns the enabled processors' APIC IDs.
    fn cpus_in(bytes: &[u8]) -> Vec<u8> {
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(checksum(&bytes[..16]), 0, "floating pointer checksum");
        let ptr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        let table = &bytes[(ptr - MPTABLE_START) as usize..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(checksum(&table[..len]), 0, "table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        let mut cpus = Vec::new();
        let mut at = 44;
        for _ in 0..count {
            let size = if table[at] == ENTRY_PROCESSOR { 20 } else { 8 };
            if table[at] == ENTRY_PROCESSOR && table[at + 3] & CPU_ENABLED != 0 {
                cpus.push(table[at + 1]);
            }
            at += size;
        }
        assert_eq!(at, len, "entries fill the table exactly");
        cpus
    }

    #[test]
    fn lists_every_vcpu() {
        for n in [1, 2, 4, 32] {
            let bytes = build(MPTABLE_START, &CpuTopology::new(n, false), n).unwrap();
            assert_eq!(cpus_in(&bytes), (0..n as u8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn only_cpu0_is_bootstrap() {
        let bytes = build(MPTABLE_START, &CpuTopology::new(2, false), 2).unwrap();
        let table = &bytes[16..];
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTSTRAP);
        assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
    }

    #[test]
    fn fits_in_guest_memory() {
        let mem = crate::memory::create_guest_memory(16 << 20, false).unwrap();
        write_mptable(&mem, &CpuTopology::new(32, false), 32).unwrap();
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&buf, b"_MP_");
    }

    #[test]
    fn refuses_impossible_counts() {
        assert!(build(MPTABLE_START, &CpuTopology::new(1, false), 0).is_err());
        assert!(build(MPTABLE_START, &CpuTopology::new(300, false), 300).is_err());
    }
}
