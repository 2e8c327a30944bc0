//! Packs a lockstep test guest, linked as an ELF at 1 MiB, as a bzImage: a boot sector and setup
//! header (Linux boot protocol 2.12, 64-bit entry at load address + 0x200) followed by the guest's
//! loadable segments as one flat protected-mode payload.
//!
//! The ELF itself is already bootable through the Linux 64-bit entry (`e_entry`) and PVH (its note);
//! the bzImage carries the same program for VMMs that load bzImages.

mod bzimage;
mod elf;

use std::fmt;
use std::path::{Path, PathBuf};

pub use bzimage::{
    bzimage, field, layout, BzImageLayout, PROTOCOL_VERSION, SETUP_SECTS, XLF_KERNEL_64,
};
pub use elf::{Elf, Segment};

/// Where every guest is linked and loaded (bzImage `code32_start` and `pref_address`).
pub const LOAD_ADDRESS: u64 = 0x10_0000;
/// The 64-bit entry's offset from the load address, fixed by the boot protocol.
pub const ENTRY64_OFFSET: u64 = 0x200;

/// Why an ELF could not be packed.
#[derive(Debug, PartialEq, Eq)]
pub enum PackError {
    /// The file is not a little-endian ELF64 x86-64 executable.
    NotElf64,
    /// A header or segment points past the end of the file.
    Truncated,
    /// There is no loadable segment.
    NoSegments,
    /// A loadable segment lies below the load address (the guest was linked elsewhere).
    BelowLoadAddress(u64),
    /// `e_entry` is not load address + 0x200, where the 64-bit boot protocol enters.
    WrongEntry(u64),
    /// The image does not fit the header's 32-bit size fields.
    TooLarge(u64),
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackError::NotElf64 => write!(f, "not a little-endian ELF64 x86-64 file"),
            PackError::Truncated => write!(f, "ELF header or segment extends past the end of the file"),
            PackError::NoSegments => write!(f, "ELF has no PT_LOAD segment"),
            PackError::BelowLoadAddress(addr) => {
                write!(f, "segment at {addr:#x} is below the load address {LOAD_ADDRESS:#x}; link the guest with the kit's link.ld")
            }
            PackError::WrongEntry(entry) => write!(
                f,
                "entry {entry:#x} is not {:#x} (load address + 0x200), where the 64-bit boot protocol enters",
                LOAD_ADDRESS + ENTRY64_OFFSET
            ),
            PackError::TooLarge(size) => write!(f, "image of {size} bytes is too large for a bzImage header"),
        }
    }
}

impl std::error::Error for PackError {}

/// The guest's loadable segments laid out from [`LOAD_ADDRESS`].
#[derive(Debug, PartialEq, Eq)]
pub struct FlatImage {
    /// File contents from the load address to the end of the last segment's file bytes.
    pub bytes: Vec<u8>,
    /// Memory the image needs from the load address, including zero-filled parts (.bss, stacks).
    pub mem_size: u64,
}

/// Lays an ELF's PT_LOAD segments out as one flat image starting at [`LOAD_ADDRESS`].
pub fn flat_image(elf_bytes: &[u8]) -> Result<FlatImage, PackError> {
    let elf = Elf::parse(elf_bytes)?;
    if elf.segments.is_empty() {
        return Err(PackError::NoSegments);
    }
    if elf.entry != LOAD_ADDRESS + ENTRY64_OFFSET {
        return Err(PackError::WrongEntry(elf.entry));
    }
    let mut bytes = Vec::new();
    let mut mem_size = 0;
    for segment in &elf.segments {
        let start = segment
            .paddr
            .checked_sub(LOAD_ADDRESS)
            .ok_or(PackError::BelowLoadAddress(segment.paddr))?;
        let file_end = start + segment.file_size;
        let too_large = |size| {
            if size > u64::from(u32::MAX) {
                Err(PackError::TooLarge(size))
            } else {
                Ok(())
            }
        };
        too_large(start + segment.mem_size)?;
        if bytes.len() < file_end as usize {
            bytes.resize(file_end as usize, 0);
        }
        let data =
            &elf_bytes[segment.offset as usize..(segment.offset + segment.file_size) as usize];
        bytes[start as usize..file_end as usize].copy_from_slice(data);
        mem_size = mem_size.max(start + segment.mem_size);
    }
    Ok(FlatImage { bytes, mem_size })
}

/// Writes `<out_dir>/<name>.elf` (a copy) and `<out_dir>/<name>.bzimage`; returns both paths.
pub fn pack_file(
    elf_path: &Path,
    out_dir: &Path,
    name: &str,
) -> Result<(PathBuf, PathBuf), Box<dyn std::error::Error>> {
    let elf =
        std::fs::read(elf_path).map_err(|e| format!("reading {}: {e}", elf_path.display()))?;
    let image = bzimage(&elf)?;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    let elf_out = out_dir.join(format!("{name}.elf"));
    let bz_out = out_dir.join(format!("{name}.bzimage"));
    std::fs::write(&elf_out, &elf).map_err(|e| format!("writing {}: {e}", elf_out.display()))?;
    std::fs::write(&bz_out, image).map_err(|e| format!("writing {}: {e}", bz_out.display()))?;
    Ok((elf_out, bz_out))
}
