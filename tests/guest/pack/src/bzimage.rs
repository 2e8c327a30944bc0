//! The bzImage container: boot sector and setup sectors carrying the Linux setup header
//! (Documentation/arch/x86/boot.rst), then the flat protected-mode payload loaded at 1 MiB.
//!
//! Only the header matters: VMMs such as lockstep (linux-loader's `BzImage`) read it, load the payload
//! at `code32_start` and enter at load address + 0x200 in 64-bit mode (`XLF_KERNEL_64`). The 16-bit
//! setup path is not implemented; its entry just halts.

use crate::{flat_image, PackError, LOAD_ADDRESS};

/// Setup sectors after the boot sector (the header needs one; four is the traditional minimum).
pub const SETUP_SECTS: u8 = 4;
const SECTOR: usize = 512;
const SETUP_SIZE: usize = (SETUP_SECTS as usize + 1) * SECTOR;

/// Offsets of the setup-header fields the packer writes, from the start of the file.
#[allow(missing_docs)]
pub mod field {
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const SYSSIZE: usize = 0x1f4;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const KERNEL_VERSION: usize = 0x20e;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const MIN_ALIGNMENT: usize = 0x235;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
}

/// Boot protocol 2.12: the first with `xloadflags`, so `XLF_KERNEL_64` declares the 64-bit entry.
pub const PROTOCOL_VERSION: u16 = 0x020c;
/// `loadflags`: the protected-mode payload is loaded at 0x100000.
pub const LOADED_HIGH: u8 = 0x01;
/// `xloadflags`: the kernel has the 64-bit entry at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 0x01;
/// Longest command line the guest keeps (without the NUL).
pub const CMDLINE_SIZE: u32 = 4095;
/// The guest reads an initrd anywhere below 2 GiB through its identity map.
pub const INITRD_ADDR_MAX: u32 = 0x7fff_ffff;

/// Where the 16-bit setup stub (an endless `hlt`) and the version string sit in the setup area.
const REAL_MODE_STUB: usize = 0x280;
const VERSION_STRING: usize = 0x300;
const VERSION_TEXT: &[u8] = b"lockstep test guest\0";

/// How a packed bzImage is laid out, for callers that check or describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BzImageLayout {
    /// Bytes before the payload: boot sector plus setup sectors.
    pub setup_size: usize,
    /// Length of the flat payload.
    pub payload_size: usize,
    /// Memory needed from the load address (`init_size`).
    pub init_size: u32,
}

fn put(image: &mut [u8], offset: usize, bytes: &[u8]) {
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// Builds a bzImage from a guest ELF: setup header, then the flat image of its loadable segments.
pub fn bzimage(elf: &[u8]) -> Result<Vec<u8>, PackError> {
    let flat = flat_image(elf)?;
    let payload_size = flat.bytes.len();
    let too_large = PackError::TooLarge(flat.mem_size);
    let syssize = u32::try_from(payload_size.div_ceil(16))
        .map_err(|_| PackError::TooLarge(payload_size as u64))?;
    let init_size = u32::try_from(flat.mem_size.next_multiple_of(4096)).map_err(|_| too_large)?;

    let mut image = vec![0u8; SETUP_SIZE];
    image[field::SETUP_SECTS] = SETUP_SECTS;
    put(&mut image, field::SYSSIZE, &syssize.to_le_bytes());
    put(&mut image, field::BOOT_FLAG, &0xaa55u16.to_le_bytes());
    // A short jump over the header to the real-mode stub.
    let jump = (REAL_MODE_STUB - (field::JUMP + 2)) as u8;
    put(&mut image, field::JUMP, &[0xeb, jump]);
    put(&mut image, field::HEADER, b"HdrS");
    put(&mut image, field::VERSION, &PROTOCOL_VERSION.to_le_bytes());
    put(
        &mut image,
        field::KERNEL_VERSION,
        &((VERSION_STRING - 0x200) as u16).to_le_bytes(),
    );
    image[field::LOADFLAGS] = LOADED_HIGH;
    put(
        &mut image,
        field::CODE32_START,
        &(LOAD_ADDRESS as u32).to_le_bytes(),
    );
    put(
        &mut image,
        field::INITRD_ADDR_MAX,
        &INITRD_ADDR_MAX.to_le_bytes(),
    );
    put(
        &mut image,
        field::KERNEL_ALIGNMENT,
        &0x1000u32.to_le_bytes(),
    );
    image[field::RELOCATABLE_KERNEL] = 0;
    image[field::MIN_ALIGNMENT] = 12;
    put(&mut image, field::XLOADFLAGS, &XLF_KERNEL_64.to_le_bytes());
    put(&mut image, field::CMDLINE_SIZE, &CMDLINE_SIZE.to_le_bytes());
    put(&mut image, field::PREF_ADDRESS, &LOAD_ADDRESS.to_le_bytes());
    put(&mut image, field::INIT_SIZE, &init_size.to_le_bytes());
    // 16-bit entry: cli; hlt; jmp back to the hlt. Nothing runs the real-mode path of this image.
    put(&mut image, REAL_MODE_STUB, &[0xfa, 0xf4, 0xeb, 0xfd]);
    put(&mut image, VERSION_STRING, VERSION_TEXT);

    image.extend_from_slice(&flat.bytes);
    Ok(image)
}

/// Describes a bzImage this crate produced (reads back setup_sects, syssize and init_size).
pub fn layout(image: &[u8]) -> Option<BzImageLayout> {
    let read_u32 = |offset: usize| {
        Some(u32::from_le_bytes(
            image.get(offset..offset + 4)?.try_into().ok()?,
        ))
    };
    let setup_size = (usize::from(*image.get(field::SETUP_SECTS)?) + 1) * SECTOR;
    Some(BzImageLayout {
        setup_size,
        payload_size: image.len().checked_sub(setup_size)?,
        init_size: read_u32(field::INIT_SIZE)?,
    })
}
