//! The Intel MultiProcessor Specification 1.4 table: the "_MP_" floating pointer and the "PCMP"
//! configuration table with processor, bus, IOAPIC and I/O interrupt entries.

use crate::phys::{read_u16, read_u32, read_u8};
use crate::platform::{CpuSource, Platform};

const FLOATING_SIGNATURE: u32 = u32::from_le_bytes(*b"_MP_");
const TABLE_SIGNATURE: u32 = u32::from_le_bytes(*b"PCMP");
const TABLE_HEADER_LENGTH: u64 = 44;

/// Searches for the floating pointer, as the specification says: the first KiB of the EBDA, the last
/// KiB of base memory, then the BIOS ROM at 0xF0000..0xFFFFF. Returns its address.
pub fn find() -> Option<u64> {
    let ebda = u64::from(read_u16(0x40e)) << 4;
    let base_kib = u64::from(read_u16(0x413));
    let base_end = if base_kib != 0 {
        base_kib * 1024
    } else {
        640 * 1024
    };
    let areas = [(ebda, 1024), (base_end - 1024, 1024), (0xf0000, 0x10000)];
    areas
        .into_iter()
        .filter(|(start, _)| *start != 0)
        .find_map(|(start, len)| {
            (start..start + len)
                .step_by(16)
                .find(|addr| is_floating_pointer(*addr))
        })
}

fn is_floating_pointer(addr: u64) -> bool {
    read_u32(addr) == FLOATING_SIGNATURE && checksum_ok(addr, u64::from(read_u8(addr + 8)) * 16)
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    len != 0 && (0..len).fold(0u8, |sum, i| sum.wrapping_add(read_u8(addr + i))) == 0
}

/// Reads the configuration table the floating pointer at `floating` points to: enabled processors,
/// the enabled IOAPICs and the routing of ISA IRQ 4. Default configurations (no table) are not
/// supported: no VMM uses them.
pub fn read(floating: u64) -> Option<Platform> {
    let table = u64::from(read_u32(floating + 4));
    if table == 0 || read_u32(table) != TABLE_SIGNATURE {
        return None;
    }
    let length = u64::from(read_u16(table + 4));
    if !checksum_ok(table, length) {
        return None;
    }
    let mut platform = Platform::new(CpuSource::MpTable);
    let mut isa_bus = None;
    // Walk by the table's length, not its entry count: some firmware (qboot) leaves the count at 0.
    let mut entry = table + TABLE_HEADER_LENGTH;
    while entry < table + length {
        entry += match read_u8(entry) {
            0 => {
                if read_u8(entry + 3) & 1 != 0 {
                    platform.add_cpu(u32::from(read_u8(entry + 1)));
                }
                20
            }
            1 => {
                if (0..3).all(|i| read_u8(entry + 2 + i) == b"ISA"[i as usize]) {
                    isa_bus = Some(read_u8(entry + 1));
                }
                8
            }
            2 => {
                if read_u8(entry + 3) & 1 != 0 {
                    platform.add_ioapic(u64::from(read_u32(entry + 4)), None);
                }
                8
            }
            3 => {
                let is_isa = read_u8(entry + 1) == 0 // vectored interrupt
                    && Some(read_u8(entry + 4)) == isa_bus;
                if is_isa {
                    platform.override_isa(
                        read_u8(entry + 5),
                        u32::from(read_u8(entry + 7)),
                        read_u16(entry + 2),
                    );
                }
                8
            }
            _ => break, // unknown base-table entry: its length is unknown
        };
    }
    Some(platform)
}
