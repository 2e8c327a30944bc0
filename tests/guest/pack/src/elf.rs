//! Just enough ELF64 reading to lay the guest's loadable segments out as a flat image.

use crate::PackError;

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;

/// One PT_LOAD segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Physical load address.
    pub paddr: u64,
    /// Offset of its bytes in the file.
    pub offset: u64,
    /// Bytes present in the file.
    pub file_size: u64,
    /// Bytes in memory (the rest is zero: .bss and friends).
    pub mem_size: u64,
}

/// The parts of an x86-64 ELF executable the packer needs.
#[derive(Debug)]
pub struct Elf {
    /// `e_entry`.
    pub entry: u64,
    /// PT_LOAD segments in file order.
    pub segments: Vec<Segment>,
}

fn field(bytes: &[u8], offset: u64, len: usize) -> Result<u64, PackError> {
    let start = usize::try_from(offset).map_err(|_| PackError::Truncated)?;
    let slice = bytes.get(start..start + len).ok_or(PackError::Truncated)?;
    let mut buffer = [0u8; 8];
    buffer[..len].copy_from_slice(slice);
    Ok(u64::from_le_bytes(buffer))
}

impl Elf {
    /// Parses the ELF header and program headers of a little-endian ELF64 x86-64 file.
    pub fn parse(bytes: &[u8]) -> Result<Self, PackError> {
        if bytes.len() < 64 || bytes[..4] != *b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
            return Err(PackError::NotElf64);
        }
        if field(bytes, 18, 2)? != u64::from(EM_X86_64) {
            return Err(PackError::NotElf64);
        }
        let entry = field(bytes, 24, 8)?;
        let phoff = field(bytes, 32, 8)?;
        let phentsize = field(bytes, 54, 2)?;
        let phnum = field(bytes, 56, 2)?;
        let mut segments = Vec::new();
        for index in 0..phnum {
            let header = phoff + index * phentsize;
            if field(bytes, header, 4)? as u32 != PT_LOAD {
                continue;
            }
            let segment = Segment {
                offset: field(bytes, header + 8, 8)?,
                paddr: field(bytes, header + 24, 8)?,
                file_size: field(bytes, header + 32, 8)?,
                mem_size: field(bytes, header + 40, 8)?,
            };
            if segment
                .offset
                .checked_add(segment.file_size)
                .is_none_or(|end| end > bytes.len() as u64)
            {
                return Err(PackError::Truncated);
            }
            segments.push(segment);
        }
        Ok(Elf { entry, segments })
    }
}
