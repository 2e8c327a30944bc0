//! ACPI: finds the RSDP and reads the MADT ("APIC" table) for CPUs, the IOAPIC and IRQ overrides.

use crate::phys::{read_u16, read_u32, read_u64, read_u8};
use crate::platform::{CpuSource, Platform};

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_V1_LENGTH: u64 = 20;
const HEADER_LENGTH: u64 = 36;
const MADT_ENTRIES: u64 = 44;

/// Returns the RSDP's address: the boot data's hint if valid, else a scan of the first KiB of the
/// EBDA and of 0xE0000..0xFFFFF on 16-byte boundaries.
pub fn find_rsdp(hint: Option<u64>) -> Option<u64> {
    if let Some(addr) = hint.filter(|addr| is_rsdp(*addr)) {
        return Some(addr);
    }
    let ebda = u64::from(read_u16(0x40e)) << 4;
    let ebda_scan = (ebda != 0).then_some((ebda, ebda + 1024));
    ebda_scan
        .into_iter()
        .chain(core::iter::once((0xe0000, 0x100000)))
        .find_map(|(start, end)| (start..end).step_by(16).find(|addr| is_rsdp(*addr)))
}

fn is_rsdp(addr: u64) -> bool {
    (0..8).all(|i| read_u8(addr + i) == RSDP_SIGNATURE[i as usize])
        && checksum_ok(addr, RSDP_V1_LENGTH)
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |sum, i| sum.wrapping_add(read_u8(addr + i))) == 0
}

fn signature(table: u64) -> [u8; 4] {
    read_u32(table).to_le_bytes()
}

/// Finds the MADT through the XSDT (ACPI 2.0+) or RSDT.
fn find_madt(rsdp: u64) -> Option<u64> {
    let revision = read_u8(rsdp + 15);
    let xsdt = if revision >= 2 {
        read_u64(rsdp + 24)
    } else {
        0
    };
    let (root, entry_size) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(read_u32(rsdp + 16)), 4)
    };
    if root == 0 || !checksum_ok(root, u64::from(read_u32(root + 4))) {
        return None;
    }
    let entries = (u64::from(read_u32(root + 4)).saturating_sub(HEADER_LENGTH)) / entry_size;
    (0..entries)
        .map(|i| {
            let slot = root + HEADER_LENGTH + i * entry_size;
            if entry_size == 8 {
                read_u64(slot)
            } else {
                u64::from(read_u32(slot))
            }
        })
        .find(|table| *table != 0 && signature(*table) == *b"APIC")
}

/// Reads the MADT: enabled local APICs and x2APICs, the IOAPICs, the overrides for IRQs 1 and 4.
pub fn read_madt(rsdp: u64) -> Option<Platform> {
    let madt = find_madt(rsdp)?;
    let length = u64::from(read_u32(madt + 4));
    if !checksum_ok(madt, length) {
        return None;
    }
    let mut platform = Platform::new(CpuSource::Madt);
    let mut entry = madt + MADT_ENTRIES;
    while entry + 2 <= madt + length {
        let entry_length = u64::from(read_u8(entry + 1));
        if entry_length < 2 {
            break;
        }
        match read_u8(entry) {
            0 if read_u32(entry + 4) & 1 != 0 => platform.add_cpu(u32::from(read_u8(entry + 3))),
            9 if read_u32(entry + 8) & 1 != 0 => platform.add_cpu(read_u32(entry + 4)),
            1 => platform.add_ioapic(u64::from(read_u32(entry + 4)), Some(read_u32(entry + 8))),
            2 => {
                platform.override_isa(read_u8(entry + 3), read_u32(entry + 4), read_u16(entry + 8))
            }
            _ => {}
        }
        entry += entry_length;
    }
    Some(platform)
}
