//! Packer tests on a synthetic guest ELF: header fields, payload placement, the 64-bit entry at
//! payload + 0x200, and loading through linux-loader's `BzImage` as lockstep does.

use std::io::Cursor;

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use lks_pack::{
    bzimage, field, flat_image, layout, PackError, LOAD_ADDRESS, PROTOCOL_VERSION, SETUP_SECTS,
    XLF_KERNEL_64,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Marker bytes the synthetic guest has at its 64-bit entry (load address + 0x200).
const ENTRY_MARKER: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// One PT_LOAD segment description for `make_elf`: physical address, file bytes, memory size.
struct Load<'a> {
    paddr: u64,
    bytes: &'a [u8],
    mem_size: u64,
}

/// Builds a minimal ELF64 x86-64 executable with the given entry and PT_LOAD segments.
fn make_elf(entry: u64, loads: &[Load]) -> Vec<u8> {
    let phoff = 64u64;
    let data_start = phoff + 56 * loads.len() as u64;
    let mut elf = vec![0u8; data_start as usize];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&entry.to_le_bytes());
    elf[32..40].copy_from_slice(&phoff.to_le_bytes());
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf[56..58].copy_from_slice(&(loads.len() as u16).to_le_bytes());
    for (index, load) in loads.iter().enumerate() {
        let offset = elf.len() as u64;
        elf.extend_from_slice(load.bytes);
        let header = (phoff + 56 * index as u64) as usize;
        let mut put = |at: usize, value: u64| {
            elf[header + at..header + at + 8].copy_from_slice(&value.to_le_bytes())
        };
        put(8, offset);
        put(16, load.paddr);
        put(24, load.paddr);
        put(32, load.bytes.len() as u64);
        put(40, load.mem_size);
        elf[header..header + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[header + 4..header + 8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    }
    elf
}

/// A guest like the kit links: code at 1 MiB with the entry marker at +0x200, data after a gap, .bss.
fn sample_elf() -> Vec<u8> {
    let mut text = vec![0x90u8; 0x300];
    text[0x200..0x204].copy_from_slice(&ENTRY_MARKER);
    let data = [0x11u8; 0x40];
    make_elf(
        LOAD_ADDRESS + 0x200,
        &[
            Load {
                paddr: LOAD_ADDRESS,
                bytes: &text,
                mem_size: text.len() as u64,
            },
            Load {
                paddr: LOAD_ADDRESS + 0x1000,
                bytes: &data,
                mem_size: 0x5000,
            },
        ],
    )
}

fn u16_at(image: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(image[offset..offset + 2].try_into().unwrap())
}

fn u32_at(image: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(image[offset..offset + 4].try_into().unwrap())
}

#[test]
fn flat_image_places_segments_from_the_load_address() {
    let flat = flat_image(&sample_elf()).unwrap();
    assert_eq!(flat.bytes.len(), 0x1040);
    assert_eq!(flat.bytes[0x200..0x204], ENTRY_MARKER);
    assert!(
        flat.bytes[0x300..0x1000].iter().all(|b| *b == 0),
        "the gap is zero-filled"
    );
    assert_eq!(flat.bytes[0x1000..0x1040], [0x11; 0x40]);
    assert_eq!(flat.mem_size, 0x6000);
}

#[test]
fn header_fields_follow_the_boot_protocol() {
    let image = bzimage(&sample_elf()).unwrap();
    assert_eq!(image[field::SETUP_SECTS], SETUP_SECTS);
    assert_eq!(u16_at(&image, field::BOOT_FLAG), 0xaa55);
    assert_eq!(&image[field::HEADER..field::HEADER + 4], b"HdrS");
    assert_eq!(u16_at(&image, field::VERSION), PROTOCOL_VERSION);
    const { assert!(PROTOCOL_VERSION >= 0x020c, "xloadflags needs protocol 2.12") };
    assert_eq!(image[field::LOADFLAGS] & 1, 1, "LOADED_HIGH");
    assert_eq!(u32_at(&image, field::CODE32_START), 0x10_0000);
    assert_eq!(
        u16_at(&image, field::XLOADFLAGS) & XLF_KERNEL_64,
        XLF_KERNEL_64
    );
    assert_eq!(u32_at(&image, field::PREF_ADDRESS), 0x10_0000);
    assert_eq!(u32_at(&image, field::INIT_SIZE), 0x6000);
    assert_eq!(u32_at(&image, field::SYSSIZE), 0x1040 / 16);
    assert_eq!(u32_at(&image, field::CMDLINE_SIZE), 4095);
    assert_eq!(image[field::RELOCATABLE_KERNEL], 0);
    // The 16-bit entry jumps over the header; kernel_version points at a NUL-terminated string.
    assert_eq!(image[field::JUMP], 0xeb);
    let version = usize::from(u16_at(&image, field::KERNEL_VERSION)) + 0x200;
    assert!(image[version..].starts_with(b"lockstep test guest\0"));
}

#[test]
fn payload_follows_the_setup_sectors_with_the_entry_at_0x200() {
    let image = bzimage(&sample_elf()).unwrap();
    let layout = layout(&image).unwrap();
    assert_eq!(layout.setup_size, (usize::from(SETUP_SECTS) + 1) * 512);
    assert_eq!(layout.payload_size, 0x1040);
    assert_eq!(layout.init_size, 0x6000);
    let payload = &image[layout.setup_size..];
    assert_eq!(payload, flat_image(&sample_elf()).unwrap().bytes.as_slice());
    assert_eq!(payload[0x200..0x204], ENTRY_MARKER);
}

#[test]
fn linux_loader_loads_the_payload_at_1_mib() {
    let image = bzimage(&sample_elf()).unwrap();
    let memory: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let result = BzImage::load(
        &memory,
        None,
        &mut Cursor::new(&image),
        Some(GuestAddress(LOAD_ADDRESS)),
    )
    .unwrap();
    assert_eq!(result.kernel_load, GuestAddress(LOAD_ADDRESS));
    assert_eq!(result.kernel_end, LOAD_ADDRESS + 0x1040);
    let header = result.setup_header.unwrap();
    assert_eq!({ header.xloadflags } & XLF_KERNEL_64, XLF_KERNEL_64);
    let mut entry = [0u8; 4];
    memory
        .read_slice(&mut entry, GuestAddress(LOAD_ADDRESS + 0x200))
        .unwrap();
    assert_eq!(
        entry, ENTRY_MARKER,
        "the 64-bit entry is at load address + 0x200"
    );
    let mut data = [0u8; 0x40];
    memory
        .read_slice(&mut data, GuestAddress(LOAD_ADDRESS + 0x1000))
        .unwrap();
    assert_eq!(data, [0x11; 0x40]);
}

#[test]
fn rejects_an_entry_not_at_load_address_plus_0x200() {
    let elf = make_elf(
        LOAD_ADDRESS,
        &[Load {
            paddr: LOAD_ADDRESS,
            bytes: &[0; 0x300],
            mem_size: 0x300,
        }],
    );
    assert_eq!(bzimage(&elf), Err(PackError::WrongEntry(LOAD_ADDRESS)));
}

#[test]
fn rejects_segments_below_the_load_address() {
    let elf = make_elf(
        LOAD_ADDRESS + 0x200,
        &[Load {
            paddr: 0x8000,
            bytes: &[0; 16],
            mem_size: 16,
        }],
    );
    assert_eq!(bzimage(&elf), Err(PackError::BelowLoadAddress(0x8000)));
}

#[test]
fn rejects_non_elf_input() {
    assert_eq!(
        bzimage(b"not an elf file at all, just some bytes long enough to pass the size check.."),
        Err(PackError::NotElf64)
    );
    assert_eq!(
        flat_image(&[0x7f, b'E', b'L', b'F']),
        Err(PackError::NotElf64)
    );
}

#[test]
fn rejects_a_truncated_segment() {
    let mut elf = sample_elf();
    elf.truncate(elf.len() - 8);
    assert_eq!(flat_image(&elf), Err(PackError::Truncated));
}
