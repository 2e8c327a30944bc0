//! Boot entries and what the VMM hands over: the boot path taken, the command line, the memory map,
//! the initrd and a hint where the ACPI RSDP is. The entry assembly (`entry.s`) brings every CPU from
//! whichever entry it used to CPL3; this module then reads the boot data into a [`BootInfo`].

mod linux;
mod pvh;

use core::arch::global_asm;
use core::fmt::Write;

use crate::cpu::{self, entry_consts};

const KIND_LINUX64: u32 = 1;
const KIND_PVH: u32 = 2;
const KIND_LINUX32: u32 = 3;
/// Boot kind the AP trampoline passes to the shared 32-bit path.
pub(crate) const KIND_AP: u32 = 4;
const PVH_MAGIC: u32 = 0x336e_c578;

/// Longest command line kept (bytes, without the terminating NUL).
pub const CMDLINE_MAX: usize = 4095;
/// Most memory-map entries kept (the zero page holds at most 128).
pub const MEMORY_MAP_MAX: usize = 128;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

global_asm!(
    include_str!("entry.s"),
    pvh_magic = const PVH_MAGIC,
    kind_linux64 = const KIND_LINUX64,
    kind_pvh = const KIND_PVH,
    kind_linux32 = const KIND_LINUX32,
    kind_ap = const KIND_AP,
    sel_code32 = const cpu::SEL_CODE32,
    sel_code64 = const cpu::SEL_CODE64,
    sel_data = const cpu::SEL_DATA,
    sel_user_code = const cpu::SEL_USER_CODE,
    sel_user_data = const cpu::SEL_USER_DATA,
    sel_tss = const cpu::SEL_TSS,
    cr0_value = const entry_consts::CR0_VALUE,
    cr4_value = const entry_consts::CR4_VALUE,
    rflags_user = const entry_consts::RFLAGS_USER,
    kstack_size = const cpu::KSTACK_SIZE,
    ustack_size = const cpu::USTACK_SIZE,
    tss_size = const cpu::TSS_SIZE,
    max_cpus = const cpu::MAX_CPUS,
    bsp_main = sym crate::start::bsp_main,
    ap_main = sym crate::start::ap_main,
    options(att_syntax)
);

/// Which documented entry the VMM used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootKind {
    /// Linux x86-64 boot protocol: 64-bit entry at load address + 0x200, RSI = boot_params.
    Linux64,
    /// Linux 32-bit boot protocol: code32_start, ESI = boot_params.
    Linux32,
    /// PVH: the ELF note's 32-bit entry, EBX = hvm_start_info.
    Pvh,
}

impl BootKind {
    /// The name used in the report (`LKS boot=<name>`).
    pub fn name(self) -> &'static str {
        match self {
            BootKind::Linux64 => "linux64",
            BootKind::Linux32 => "linux32",
            BootKind::Pvh => "pvh",
        }
    }

    /// Decodes the kind the entry assembly passes on; `None` for an AP or garbage.
    pub(crate) fn from_entry(kind: u32) -> Option<Self> {
        match kind {
            KIND_LINUX64 => Some(BootKind::Linux64),
            KIND_LINUX32 => Some(BootKind::Linux32),
            KIND_PVH => Some(BootKind::Pvh),
            _ => None,
        }
    }
}

/// One memory-map entry, in e820 terms (type 1 = RAM, 2 = reserved, 3 = ACPI, 4 = NVS, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Physical start address.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type.
    pub kind: u32,
}

/// The initial RAM disk the VMM loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initrd {
    /// Physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Everything the guest read from the VMM's boot data, copied so the originals may be overwritten.
pub struct BootInfo {
    /// The entry the VMM used.
    pub kind: BootKind,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    memory: [MemoryRegion; MEMORY_MAP_MAX],
    memory_len: usize,
    /// The initrd, if the VMM gave one.
    pub initrd: Option<Initrd>,
    /// Where the boot data says the ACPI RSDP is, if it says.
    pub rsdp_hint: Option<u64>,
}

impl BootInfo {
    /// Reads the boot data the entry left a pointer to (`boot_params` or `hvm_start_info`).
    pub fn parse(kind: BootKind, info: u64) -> Self {
        let mut boot = BootInfo {
            kind,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            memory: [MemoryRegion::default(); MEMORY_MAP_MAX],
            memory_len: 0,
            initrd: None,
            rsdp_hint: None,
        };
        match kind {
            BootKind::Linux64 | BootKind::Linux32 => linux::parse(info, &mut boot),
            BootKind::Pvh => pvh::parse(info, &mut boot),
        }
        boot
    }

    /// The command line, as the bytes the VMM gave (no terminating NUL).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The words of the command line that have the form `key=value`, as (key, value) pairs. Words
    /// are separated by spaces outside double quotes; a value in double quotes (`key="a b"`) is
    /// returned without them.
    pub fn cmdline_options(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut rest = self.cmdline();
        core::iter::from_fn(move || {
            rest = rest.trim_ascii_start();
            if rest.is_empty() {
                return None;
            }
            let mut quoted = false;
            let end = rest
                .iter()
                .position(|b| {
                    if *b == b'"' {
                        quoted = !quoted;
                    }
                    *b == b' ' && !quoted
                })
                .unwrap_or(rest.len());
            let word = &rest[..end];
            rest = &rest[end..];
            Some(word)
        })
        .filter_map(|word| {
            let equals = word.iter().position(|b| *b == b'=')?;
            let value = &word[equals + 1..];
            let value = match value {
                [b'"', inner @ .., b'"'] => inner,
                _ => value,
            };
            Some((&word[..equals], value))
        })
    }

    /// The memory map, in the VMM's order.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.memory[..self.memory_len]
    }

    /// Total bytes of usable RAM (e820 type 1).
    pub fn usable_bytes(&self) -> u64 {
        self.memory_map()
            .iter()
            .filter(|r| r.kind == E820_RAM)
            .map(|r| r.size)
            .sum()
    }

    /// Copies a NUL-terminated command line from physical memory.
    fn set_cmdline_from(&mut self, addr: u64) {
        if addr == 0 {
            return;
        }
        let mut len = 0;
        while len < CMDLINE_MAX {
            let byte = crate::phys::read_u8(addr + len as u64);
            if byte == 0 {
                break;
            }
            self.cmdline[len] = byte;
            len += 1;
        }
        self.cmdline_len = len;
    }

    /// Appends a memory-map entry; empty entries (QEMU's PVH map ends with one) and entries past
    /// [`MEMORY_MAP_MAX`] are dropped.
    fn push_region(&mut self, region: MemoryRegion) {
        if region.size != 0 && self.memory_len < MEMORY_MAP_MAX {
            self.memory[self.memory_len] = region;
            self.memory_len += 1;
        }
    }
}

/// Shows bytes from the VMM (the command line) as text: printable ASCII as is, anything else as `\xNN`.
pub struct Printable<'a>(pub &'a [u8]);

impl core::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for byte in self.0 {
            match byte {
                0x20..=0x7e => f.write_char(char::from(*byte))?,
                _ => write!(f, "\\x{byte:02x}")?,
            }
        }
        Ok(())
    }
}
