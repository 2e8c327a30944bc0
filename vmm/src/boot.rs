//! Loading what the guest boots: the kernel (ELF with or without a PVH note, or bzImage), the
//! initrd and the command line, with errors that name the config field at fault.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{self, Elf, PvhBootCapability};
use linux_loader::loader::{bzimage, load_cmdline, BzImage, KernelLoader};
use lockstep_api::BootProtocol;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;
use crate::x86_64::boot_info::InitrdPlacement;
use crate::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::x86_64::regs::BootEntry;

/// The command line used when the config gives none.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

/// Offset of the 64-bit entry point from a bzImage's protected-mode load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Highest initrd address for kernels that do not say otherwise (boot protocol default).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;

/// Why the guest could not be loaded.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("boot-source.kernel_image_path: cannot read {}: {source}", path.display())]
    ReadKernel {
        /// The kernel path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not something lockstep can boot.
    #[error("boot-source.kernel_image_path: {} is not a kernel lockstep can boot: {reason}", path.display())]
    NotAKernel {
        /// The kernel path.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The kernel is larger than guest memory allows.
    #[error("boot-source.kernel_image_path: {} does not fit in guest memory (machine-config.mem_size_mib is {mem_mib})", path.display())]
    KernelTooBig {
        /// The kernel path.
        path: PathBuf,
        /// Guest memory, MiB.
        mem_mib: u64,
    },
    /// PVH entry was asked for but the kernel has none.
    #[error("boot-source.boot_protocol: \"pvh\" asked for, but {} has no PVH entry note", path.display())]
    NoPvhEntry {
        /// The kernel path.
        path: PathBuf,
    },
    /// The initrd file could not be read.
    #[error("boot-source.initrd_path: cannot read {}: {source}", path.display())]
    ReadInitrd {
        /// The initrd path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("boot-source.initrd_path: {} is {size} bytes but only {room} bytes of guest memory are free for it above the kernel; raise machine-config.mem_size_mib", path.display())]
    InitrdTooBig {
        /// The initrd path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room there was.
        room: u64,
    },
    /// The command line is malformed or too long.
    #[error("boot-source.boot_args: {0}")]
    Cmdline(String),
    /// Writing into guest memory failed.
    #[error("cannot write {what} into guest memory: {reason}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
}

/// A kernel in guest memory, ready to be entered.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// How and where to enter it.
    pub entry: BootEntry,
    /// First byte past the kernel image (BSS included).
    pub end: u64,
    /// The bzImage setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// Highest address the initrd may reach.
    fn initrd_addr_max(&self) -> u64 {
        match self.setup_header {
            Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
            _ => DEFAULT_INITRD_ADDR_MAX,
        }
    }
}

/// First bytes of the file, enough to tell an ELF from a bzImage, or fewer if it is shorter.
fn read_head(file: &mut File) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(0x206);
    file.by_ref().take(0x206).read_to_end(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(head)
}

/// Why an ELF cannot be booted, found before linux-loader places it.
enum ElfProblem {
    NotAKernel(String),
    TooBig,
}

/// Checks that an ELF is an x86-64 executable whose loadable segments are all in the file and
/// all fit below `mem_end`.
fn inspect_elf(file: &mut File, mem_end: u64) -> std::io::Result<Result<(), ElfProblem>> {
    let not = |s: String| Ok(Err(ElfProblem::NotAKernel(s)));
    let file_len = file.metadata()?.len();
    let mut ehdr = [0u8; 64];
    if file_len < 64 {
        return not("a truncated ELF header".into());
    }
    file.read_exact(&mut ehdr)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    if ehdr[4] != 2 {
        return not("a 32-bit ELF; lockstep boots 64-bit kernels".into());
    }
    let (e_type, e_machine) = (u16_at(&ehdr, 16), u16_at(&ehdr, 18));
    if e_machine != EM_X86_64 {
        return not(format!("an ELF for machine type {e_machine}, not x86-64"));
    }
    if e_type != ET_EXEC {
        return not(format!(
            "an ELF of type {e_type} (a kernel is a static executable, type 2)"
        ));
    }
    let (phoff, phentsize, phnum) = (
        u64_at(&ehdr, 32),
        u64::from(u16_at(&ehdr, 54)),
        u64::from(u16_at(&ehdr, 56)),
    );
    if phentsize != 56
        || phoff
            .checked_add(phentsize * phnum)
            .is_none_or(|end| end > file_len)
    {
        return not("a truncated or malformed ELF program header table".into());
    }
    file.seek(SeekFrom::Start(phoff))?;
    let mut phdr = [0u8; 56];
    for index in 0..phnum {
        file.read_exact(&mut phdr)?;
        const PT_LOAD: u32 = 1;
        if u32::from_le_bytes(phdr[0..4].try_into().expect("4 bytes")) != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) = (
            u64_at(&phdr, 8),
            u64_at(&phdr, 24),
            u64_at(&phdr, 32),
            u64_at(&phdr, 40),
        );
        if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
            return not(format!(
                "a truncated ELF: segment {index} extends past the end of the file"
            ));
        }
        if paddr
            .checked_add(memsz.max(filesz))
            .is_none_or(|end| end > mem_end)
        {
            return Ok(Err(ElfProblem::TooBig));
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(Ok(()))
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    protocol: BootProtocol,
) -> Result<LoadedKernel, BootError> {
    let read_err = |source| BootError::ReadKernel {
        path: path.to_owned(),
        source,
    };
    let not_a_kernel = |reason: String| BootError::NotAKernel {
        path: path.to_owned(),
        reason,
    };
    let too_big = || BootError::KernelTooBig {
        path: path.to_owned(),
        mem_mib: crate::memory::total_bytes(mem) >> 20,
    };

    let mut file = File::open(path).map_err(read_err)?;
    let head = read_head(&mut file).map_err(read_err)?;
    let loaded = if head.starts_with(b"\x7fELF") {
        match inspect_elf(&mut file, low_memory_end(mem)).map_err(read_err)? {
            Ok(()) => {}
            Err(ElfProblem::NotAKernel(reason)) => return Err(not_a_kernel(reason)),
            Err(ElfProblem::TooBig) => return Err(too_big()),
        }
        let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(
            |e| match e {
                linux_loader::loader::Error::Elf(elf::Error::ReadKernelImage) => too_big(),
                linux_loader::loader::Error::Elf(elf::Error::InvalidEntryAddress) => {
                    not_a_kernel("its entry point lies below 1 MiB".into())
                }
                other => not_a_kernel(other.to_string()),
            },
        )?;
        let entry = match (result.pvh_boot_cap, protocol) {
            (PvhBootCapability::PvhEntryPresent(addr), BootProtocol::Auto | BootProtocol::Pvh) => {
                BootEntry::Pvh(addr.0)
            }
            (_, BootProtocol::Pvh) => {
                return Err(BootError::NoPvhEntry {
                    path: path.to_owned(),
                })
            }
            _ => BootEntry::Linux64(result.kernel_load.0),
        };
        LoadedKernel {
            entry,
            end: result.kernel_end,
            setup_header: None,
        }
    } else if head.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
        if protocol == BootProtocol::Pvh {
            return Err(BootError::NoPvhEntry {
                path: path.to_owned(),
            });
        }
        let result =
            BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
                match e {
                    linux_loader::loader::Error::Bzimage(
                        bzimage::Error::ReadBzImageCompressedKernel,
                    ) => too_big(),
                    other => not_a_kernel(other.to_string()),
                }
            })?;
        let header = result
            .setup_header
            .ok_or_else(|| not_a_kernel("bzImage without a setup header".into()))?;
        if header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(not_a_kernel(
                "a bzImage without a 64-bit entry point (XLF_KERNEL_64)".into(),
            ));
        }
        LoadedKernel {
            entry: BootEntry::Linux64(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
            end: result.kernel_end,
            setup_header: Some(header),
        }
    } else {
        return Err(not_a_kernel("neither an ELF image nor a bzImage".into()));
    };
    if loaded.end > low_memory_end(mem) {
        return Err(too_big());
    }
    Ok(loaded)
}

/// End of the RAM region that starts at 0 (everything below the 32-bit MMIO gap).
fn low_memory_end(mem: &GuestMemoryMmap) -> u64 {
    mem.find_region(GuestAddress(0))
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0)
}

/// Places the initrd as high in low memory as the kernel allows, page-aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<InitrdPlacement, BootError> {
    const PAGE: u64 = 4096;
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = low_memory_end(mem).min(kernel.initrd_addr_max().saturating_add(1));
    let bottom = kernel.end.div_ceil(PAGE) * PAGE;
    let room = top.saturating_sub(bottom);
    if size > room {
        return Err(BootError::InitrdTooBig {
            path: path.to_owned(),
            size,
            room,
        });
    }
    let addr = (top - size) / PAGE * PAGE;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => read_err(source),
            other => BootError::GuestMemory {
                what: "the initrd",
                reason: other.to_string(),
            },
        })?;
    Ok(InitrdPlacement { addr, size })
}

/// Builds the command line from the config's `boot_args` (or the default) plus `extra` parameters
/// the VMM adds, and writes it at [`CMDLINE_START`]. Returns its length without the NUL.
pub fn write_cmdline(
    mem: &GuestMemoryMmap,
    boot_args: Option<&str>,
    extra: &[String],
) -> Result<usize, BootError> {
    let base = boot_args.unwrap_or(DEFAULT_BOOT_ARGS);
    let mut cmdline =
        Cmdline::try_from(base, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    for param in extra {
        cmdline
            .insert_str(param)
            .map_err(|e| BootError::Cmdline(format!("with lockstep's \"{param}\" added: {e}")))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|e| {
        BootError::GuestMemory {
            what: "the command line",
            reason: e.to_string(),
        }
    })?;
    let text = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(text.as_bytes().len())
}

/// Reads the NUL-terminated command line back from guest memory (for tests and diagnostics).
pub fn read_cmdline(mem: &GuestMemoryMmap, len: usize) -> Option<String> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(CMDLINE_START)).ok()?;
    String::from_utf8(buf).ok()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::memory::create_guest_memory;

    fn file_with(bytes: &[u8]) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().write_all(bytes).unwrap();
        f
    }

    /// A minimal x86-64 ELF executable with one PT_LOAD segment at 1 MiB and, optionally, a PVH
    /// note.
    fn tiny_elf(pvh_entry: Option<u32>, machine: u16) -> Vec<u8> {
        let code = [0xf4u8; 16]; // hlt
        let mut note = Vec::new();
        if let Some(entry) = pvh_entry {
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&18u32.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
        }
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let code_off = 64 + 56 * u64::from(phnum);
        let note_off = code_off + code.len() as u64;
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&ET_EXEC.to_le_bytes());
        f.extend_from_slice(&machine.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes());
        f.extend_from_slice(&56u16.to_le_bytes());
        f.extend_from_slice(&phnum.to_le_bytes());
        f.extend_from_slice(&[0; 6]);
        let phdr = |f: &mut Vec<u8>, p_type: u32, off: u64, addr: u64, size: u64| {
            f.extend_from_slice(&p_type.to_le_bytes());
            f.extend_from_slice(&5u32.to_le_bytes());
            for v in [off, addr, addr, size, size + 0x1000, 4] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        };
        phdr(&mut f, 1, code_off, 0x10_0000, code.len() as u64);
        if pvh_entry.is_some() {
            phdr(&mut f, 4, note_off, 0, note.len() as u64);
        }
        f.extend_from_slice(&code);
        f.extend_from_slice(&note);
        f
    }

    #[test]
    fn elf_without_note_enters_in_64_bit_mode() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let k = file_with(&tiny_elf(None, EM_X86_64));
        let loaded = load_kernel(&mem, k.as_path(), BootProtocol::Auto).unwrap();
        assert_eq!(loaded.entry, BootEntry::Linux64(0x10_0000));
        assert_eq!(loaded.end, 0x10_0000 + 16 + 0x1000);
        let b: u8 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(b, 0xf4);
        let err = load_kernel(&mem, k.as_path(), BootProtocol::Pvh).unwrap_err();
        assert!(err.to_string().contains("no PVH entry note"), "{err}");
    }

    #[test]
    fn elf_with_pvh_note_prefers_pvh_unless_told() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let k = file_with(&tiny_elf(Some(0x10_0008), EM_X86_64));
        let auto = load_kernel(&mem, k.as_path(), BootProtocol::Auto).unwrap();
        assert_eq!(auto.entry, BootEntry::Pvh(0x10_0008));
        let forced = load_kernel(&mem, k.as_path(), BootProtocol::Linux64).unwrap();
        assert_eq!(forced.entry, BootEntry::Linux64(0x10_0000));
    }

    #[test]
    fn non_kernels_are_named() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        for (bytes, needle) in [
            (
                b"#!/bin/sh\necho hi\n".to_vec(),
                "neither an ELF image nor a bzImage",
            ),
            (Vec::new(), "neither an ELF image nor a bzImage"),
            (tiny_elf(None, 183), "machine type 183"),
            (b"\x7fELF\x01".to_vec(), "truncated"),
            (
                tiny_elf(None, EM_X86_64)[..125].to_vec(),
                "extends past the end of the file",
            ),
        ] {
            let k = file_with(&bytes);
            let err = load_kernel(&mem, k.as_path(), BootProtocol::Auto)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("boot-source.kernel_image_path:"), "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn bzimage_without_64_bit_entry_is_refused() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let mut img = vec![0u8; 0x1000];
        img[0x1f1] = 1; // setup_sects
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20cu16.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        let k = file_with(&img);
        let err = load_kernel(&mem, k.as_path(), BootProtocol::Auto)
            .unwrap_err()
            .to_string();
        assert!(err.contains("XLF_KERNEL_64"), "{err}");
        img[0x236] = 1; // xloadflags
        let k = file_with(&img);
        let loaded = load_kernel(&mem, k.as_path(), BootProtocol::Auto).unwrap();
        assert_eq!(loaded.entry, BootEntry::Linux64(0x10_0200));
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let kernel = LoadedKernel {
            entry: BootEntry::Linux64(0x10_0000),
            end: 0x20_0000,
            setup_header: None,
        };
        let initrd = file_with(&[7u8; 5000]);
        let placed = load_initrd(&mem, initrd.as_path(), &kernel).unwrap();
        assert_eq!(placed.size, 5000);
        assert_eq!(placed.addr % 4096, 0);
        assert!(placed.addr + 5000 <= 16 << 20 && placed.addr >= 0x20_0000);
        let b: u8 = mem.read_obj(GuestAddress(placed.addr + 4999)).unwrap();
        assert_eq!(b, 7);

        let big = TempFile::new().unwrap();
        big.as_file().set_len(15 << 20).unwrap();
        let err = load_initrd(&mem, big.as_path(), &kernel)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("boot-source.initrd_path:"), "{err}");
        assert!(err.contains("mem_size_mib"), "{err}");
    }

    #[test]
    fn kernel_bigger_than_memory_is_named() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let mut elf = tiny_elf(None, EM_X86_64);
        // Grow p_memsz of the first segment past the end of memory.
        elf[64 + 40..64 + 48].copy_from_slice(&(32u64 << 20).to_le_bytes());
        let k = file_with(&elf);
        let err = load_kernel(&mem, k.as_path(), BootProtocol::Auto)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit in guest memory"), "{err}");
    }

    #[test]
    fn cmdline_is_written_with_extras() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let len =
            write_cmdline(&mem, Some("console=ttyS0 hello"), &["lks.x=1".to_string()]).unwrap();
        assert_eq!(
            read_cmdline(&mem, len).unwrap(),
            "console=ttyS0 hello lks.x=1"
        );
        let too_long = "a".repeat(3000);
        assert!(write_cmdline(&mem, Some(&too_long), &[])
            .unwrap_err()
            .to_string()
            .starts_with("boot-source.boot_args"));
    }
}
