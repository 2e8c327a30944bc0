//! Snapshots: the whole machine state in one file, guest memory in another, and a VM rebuilt
//! from them.
//!
//! The state file is `LKSSNAP\0`, a format version (u32 LE), the length (u32 LE) and CRC-32
//! (u32 LE) of a JSON header, the header, then the machine state (bincode). The header names the
//! state's length and CRC-32 and the memory file's length, so a corrupt, truncated or
//! incompatible snapshot is refused before anything is built. The memory file is the guest's RAM
//! regions back to back; a restore maps it privately, so pages load when the guest touches them.

mod check;
pub mod files;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lockstep_api::{HostLimits, VmConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{
    attach_virtio_devices, create_vcpus, drive_files, new_kvm_vm, open_serial_output, Vm, VmError,
};
use crate::console::ConsoleClient;
use crate::device_manager::DeviceManager;
use crate::device_state::DevicesState;
use crate::exit::ExitSignal;
use crate::kvm::Hypervisor;
use crate::memory::{self, GuestMemoryMmap};
use crate::x86_64::vcpu_state::VcpuState;
use crate::x86_64::vm_state::VmState;

const MAGIC: &[u8; 8] = b"LKSSNAP\0";
/// The snapshot format this lockstep writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Longest header accepted (a corrupt length must not make us allocate gigabytes).
const MAX_HEADER: u32 = 64 << 10;
/// Largest state file accepted. A real one holds the config, some 16 KiB per vCPU and a few
/// KiB per device: far below this.
pub const MAX_STATE_FILE: u64 = 32 << 20;
/// Most bytes the state decoder may claim for lengths it reads (strings, byte vectors) in the
/// largest state file: a length prefix claiming more is refused before anything is allocated.
const DECODE_LIMIT: usize = 32 << 20;
/// Bytes before the header: magic, version, header length, header CRC.
const PREAMBLE: usize = 20;

/// Why a snapshot could not be written or used.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a lockstep snapshot at all.
    #[error("{} is not a lockstep snapshot (bad magic)", path.display())]
    NotASnapshot {
        /// The file.
        path: PathBuf,
    },
    /// A snapshot of another format version.
    #[error("{} is snapshot format version {found}; this lockstep reads version {FORMAT_VERSION}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Part of the snapshot does not match its checksum.
    #[error("{} is corrupt: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Which part.
        what: String,
    },
    /// Part of the snapshot is missing.
    #[error("{} is truncated: {what}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What is short.
        what: String,
    },
    /// A sound snapshot this host or this lockstep cannot restore.
    #[error("cannot restore {}: {why}", path.display())]
    Incompatible {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Reading the running VM's state failed.
    #[error("cannot read the VM's state: {0}")]
    Capture(String),
    /// A snapshot file is a FIFO, device, folder or socket: refused before any read.
    #[error("{}: the {what} is not a regular file", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// Which of the snapshot's files.
        what: String,
    },
    /// A snapshot file is larger than any snapshot this lockstep writes.
    #[error("{}: the {what} has {len} bytes, more than the {max} a snapshot can have", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Which of the snapshot's files.
        what: String,
        /// Its size.
        len: u64,
        /// The most accepted.
        max: u64,
    },
    /// A snapshot may not be written there.
    #[error("cannot write a snapshot to {}: {why}", path.display())]
    Destination {
        /// The destination.
        path: PathBuf,
        /// Why not.
        why: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a snapshot's two files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPaths {
    /// The state file.
    pub state: PathBuf,
    /// The guest memory file.
    pub memory: PathBuf,
}

/// The JSON header: what a reader checks before trusting the rest.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    lockstep_version: String,
    arch: String,
    vm_name: String,
    vcpus: u32,
    memory_bytes: u64,
    state_bytes: u64,
    state_crc32: u32,
}

/// Everything a snapshot holds besides guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineSnapshot {
    /// The VM's config, to rebuild its devices. Kept as its JSON text: it is the user-facing
    /// format, and the binary encoding cannot carry its flattened sections.
    #[serde(with = "config_as_json")]
    pub config: VmConfig,
    /// Guest memory regions (address, length), in memory-file order.
    pub regions: Vec<(u64, u64)>,
    /// Irqchip, PIT and clock.
    pub vm: VmState,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// Every device.
    pub devices: DevicesState,
}

mod config_as_json {
    use lockstep_api::VmConfig;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(config: &VmConfig, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(config).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VmConfig, D::Error> {
        let text = String::deserialize(d)?;
        VmConfig::from_json(&text).map_err(serde::de::Error::custom)
    }
}

/// Sizes of a written snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SnapshotStats {
    /// Bytes of machine state.
    pub state_bytes: u64,
    /// Bytes of guest memory.
    pub memory_bytes: u64,
}

/// The machine state in its binary form (the part of the state file after the header).
pub fn encode_state(snapshot: &MachineSnapshot) -> Result<Vec<u8>, SnapshotError> {
    bincode::serde::encode_to_vec(snapshot, bincode::config::standard())
        .map_err(|e| SnapshotError::Capture(format!("encoding: {e}")))
}

/// A whole state file around `state` (the binary machine state): magic, version, and a header
/// with the checksums a reader checks. `vcpus` and `memory_bytes` are what the state holds.
pub fn state_file_bytes(
    state: &[u8],
    vm_name: &str,
    vcpus: u32,
    memory_bytes: u64,
) -> Result<Vec<u8>, SnapshotError> {
    let header = Header {
        lockstep_version: env!("CARGO_PKG_VERSION").to_string(),
        arch: std::env::consts::ARCH.to_string(),
        vm_name: vm_name.to_string(),
        vcpus,
        memory_bytes,
        state_bytes: state.len() as u64,
        state_crc32: crc32fast::hash(state),
    };
    let header =
        serde_json::to_vec(&header).map_err(|e| SnapshotError::Capture(format!("header: {e}")))?;
    let header_len = u32::try_from(header.len())
        .map_err(|_| SnapshotError::Capture("the header is too long".into()))?;
    let mut out = Vec::with_capacity(PREAMBLE + header.len() + state.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(state);
    Ok(out)
}

/// Writes the state file and the memory file. The VM must be paused, and the caller has
/// checked the destinations ([`files::check_destinations`], before pausing: the host does it
/// against every running VM's files). Each file is written beside its destination and renamed
/// over it, so a failure midway leaves what was there.
pub fn write(
    paths: &SnapshotPaths,
    snapshot: &MachineSnapshot,
    mem: &GuestMemoryMmap,
) -> Result<SnapshotStats, SnapshotError> {
    let state = encode_state(snapshot)?;
    let memory_bytes = check::regions_total(&snapshot.regions)
        .ok_or_else(|| SnapshotError::Capture("the memory regions overflow".into()))?;
    let vcpus = u32::try_from(snapshot.vcpus.len())
        .map_err(|_| SnapshotError::Capture("too many vCPUs".into()))?;
    let file = state_file_bytes(&state, snapshot.config.display_name(), vcpus, memory_bytes)?;

    write_memory(&paths.memory, mem, memory_bytes).map_err(io_err(&paths.memory))?;

    // The state file goes last: a snapshot whose state file exists is complete.
    let mut out = files::AtomicFile::create(&paths.state).map_err(io_err(&paths.state))?;
    out.write_all(&file).map_err(io_err(&paths.state))?;
    out.commit().map_err(io_err(&paths.state))?;
    Ok(SnapshotStats {
        state_bytes: state.len() as u64,
        memory_bytes,
    })
}

/// Writes guest memory, regions back to back. Pages of anonymous memory that were never touched
/// (neither in memory nor swapped out) read as zero: they are left as holes in a sparse file
/// instead of being written, so a big, mostly idle guest snapshots quickly. The file is new (a
/// temporary renamed over `path` at the end): the old file at `path` may be what a restored VM's
/// memory maps, and truncating it would change that memory.
fn write_memory(path: &Path, mem: &GuestMemoryMmap, total: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let out = files::AtomicFile::create(path)?;
    let file = out.file();
    file.set_len(total)?;
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let slice = region
            .get_slice(vm_memory::MemoryRegionAddress(0), len)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let base = slice.ptr_guard().as_ptr();
        // A restored VM's memory maps the old snapshot: untouched pages hold data, so all of it
        // is written; fresh memory (a memfd) can be asked which pages exist.
        let resident = crate::memory::data_pages(region);
        let mut page = 0;
        let pages = len / PAGE;
        while page < pages {
            if resident.as_ref().is_some_and(|r| r[page] & 1 == 0) {
                page += 1;
                continue;
            }
            let mut end = page + 1;
            while end < pages
                && end - page < 512
                && resident.as_ref().is_none_or(|r| r[end] & 1 == 1)
            {
                end += 1;
            }
            // SAFETY: the range lies inside this region's mapping, which `mem` keeps alive; the
            // VM is paused, so nothing writes it while it is read.
            let bytes =
                unsafe { std::slice::from_raw_parts(base.add(page * PAGE), (end - page) * PAGE) };
            file.write_all_at(bytes, offset + (page * PAGE) as u64)?;
            page = end;
        }
        offset += len as u64;
    }
    out.commit()
}

/// One byte per page, 1 when the page holds data (in memory or swapped out), from
/// /proc/self/pagemap; None if the kernel will not say.
pub(crate) fn resident_pages(base: *const u8, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let pages = len.div_ceil(4096);
    let mut raw = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut raw, (base as u64 / 4096) * 8)
        .ok()?;
    Some(
        raw.chunks_exact(8)
            .map(|e| {
                let mut word = [0u8; 8];
                word.copy_from_slice(e);
                let entry = u64::from_le_bytes(word);
                u8::from(entry & (PRESENT | SWAPPED) != 0)
            })
            .collect(),
    )
}

/// Reads and checks a state file and opens the memory file, both refused unless they are
/// regular files; the state file is refused above [`MAX_STATE_FILE`] before it is read.
pub fn read(
    paths: &SnapshotPaths,
    limits: &HostLimits,
) -> Result<(MachineSnapshot, File), SnapshotError> {
    let (mut state_file, state_len) =
        files::open_regular(&paths.state, "snapshot state file", MAX_STATE_FILE)?;
    let (mem_file, mem_len) = files::open_regular(&paths.memory, "snapshot memory file", u64::MAX)?;
    let bytes = files::read_exact_len(&mut state_file, &paths.state, state_len)?;
    let snapshot = decode_and_check(paths, &bytes, mem_len, limits)?;
    Ok((snapshot, mem_file))
}

fn le_word(bytes: &[u8], at: usize) -> Option<u32> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(word))
}

/// Decodes the binary machine state (the part after the header), with a bounded decoder: the
/// lengths in it may claim at most the smallest of 64 KiB, 1 MiB, 8 MiB or [`DECODE_LIMIT`]
/// that holds the whole state, so a length prefix cannot make it allocate much more than the
/// state's own size. Every byte must belong to the state.
pub fn decode_state(state: &[u8]) -> Result<MachineSnapshot, String> {
    // The limit is a type parameter, hence one call per bound.
    macro_rules! decode_within {
        ($limit:expr) => {
            bincode::serde::decode_from_slice(
                state,
                bincode::config::standard().with_limit::<{ $limit }>(),
            )
        };
    }
    let decoded: Result<(MachineSnapshot, usize), _> = match state.len() {
        0..=0x1_0000 => decode_within!(0x1_0000),
        0x1_0001..=0x10_0000 => decode_within!(0x10_0000),
        0x10_0001..=0x80_0000 => decode_within!(0x80_0000),
        _ => decode_within!(DECODE_LIMIT),
    };
    let (snapshot, used) = decoded.map_err(|e| format!("does not decode ({e})"))?;
    if used != state.len() {
        return Err(format!("has {} bytes after its end", state.len() - used));
    }
    Ok(snapshot)
}

/// Total bytes of guest memory a region list describes, or None if it overflows.
pub fn regions_total(regions: &[(u64, u64)]) -> Option<u64> {
    check::regions_total(regions)
}

/// Decodes a state file's bytes and checks everything in it that can be checked without KVM:
/// checksums, bounded decoding, the header against the state, the memory file's length
/// (`mem_len`), and every region, vCPU and device against the config and `limits`. Nothing is
/// mapped or built; a hostile file gets an error naming the part that is wrong.
pub fn decode_and_check(
    paths: &SnapshotPaths,
    bytes: &[u8],
    mem_len: u64,
    limits: &HostLimits,
) -> Result<MachineSnapshot, SnapshotError> {
    let path = &paths.state;
    let truncated = |what: &str| SnapshotError::Truncated {
        path: path.clone(),
        what: what.to_string(),
    };
    let corrupt = |what: String| SnapshotError::Corrupt {
        path: path.clone(),
        what,
    };
    if bytes.get(..8) != Some(MAGIC.as_slice()) {
        return Err(SnapshotError::NotASnapshot { path: path.clone() });
    }
    let version = le_word(bytes, 8).ok_or_else(|| truncated("no format version"))?;
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.clone(),
            found: version,
        });
    }
    let header_len = le_word(bytes, 12).ok_or_else(|| truncated("no header length"))?;
    let header_crc = le_word(bytes, 16).ok_or_else(|| truncated("no header checksum"))?;
    if header_len > MAX_HEADER {
        return Err(corrupt(format!(
            "header length {header_len} is implausible"
        )));
    }
    let header_end = PREAMBLE + header_len as usize;
    let header_bytes = bytes
        .get(PREAMBLE..header_end)
        .ok_or_else(|| truncated("the header is cut short"))?;
    if crc32fast::hash(header_bytes) != header_crc {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let header: Header =
        serde_json::from_slice(header_bytes).map_err(|e| corrupt(format!("header: {e}")))?;
    if header.arch != std::env::consts::ARCH {
        return Err(SnapshotError::Incompatible {
            path: path.clone(),
            why: format!(
                "it was taken on {}, this host is {}",
                header.arch,
                std::env::consts::ARCH
            ),
        });
    }
    let state = bytes.get(header_end..).unwrap_or_default();
    if (state.len() as u64) < header.state_bytes {
        return Err(truncated(&format!(
            "{} of {} state bytes",
            state.len(),
            header.state_bytes
        )));
    }
    if state.len() as u64 != header.state_bytes {
        return Err(corrupt(format!(
            "{} bytes of state where the header says {}",
            state.len(),
            header.state_bytes
        )));
    }
    if crc32fast::hash(state) != header.state_crc32 {
        return Err(corrupt("state checksum mismatch".into()));
    }
    let snapshot = decode_state(state).map_err(|why| SnapshotError::Incompatible {
        path: path.clone(),
        why: format!(
            "its state {why}; taken by lockstep {}",
            header.lockstep_version
        ),
    })?;
    let memory_bytes = check::regions_total(&snapshot.regions)
        .ok_or_else(|| corrupt("memory regions: their lengths or ends overflow".into()))?;
    if memory_bytes != header.memory_bytes
        || u32::try_from(snapshot.vcpus.len()).ok() != Some(header.vcpus)
    {
        return Err(corrupt("the header does not match the state".into()));
    }
    if mem_len != memory_bytes {
        return Err(SnapshotError::Truncated {
            path: paths.memory.clone(),
            what: format!("{mem_len} bytes of guest memory where the snapshot has {memory_bytes}"),
        });
    }
    check::check_machine(&snapshot, limits).map_err(|why| SnapshotError::Incompatible {
        path: path.clone(),
        why,
    })?;
    Ok(snapshot)
}

impl Vm {
    /// Rebuilds a VM from a snapshot: the same devices from the saved config, guest memory mapped
    /// from the memory file, and every saved state put back. The vCPUs have not run yet; the VM
    /// continues where it was when [`Vm::run`] starts it.
    pub fn restore(hv: &Hypervisor, paths: &SnapshotPaths) -> Result<Vm, VmError> {
        Self::restore_with(hv, paths, |_| Ok(()))
    }

    /// [`Vm::restore`], letting `adjust` change the saved config first (a host gives a restored
    /// VM its own name and log); an error from it refuses the restore.
    pub fn restore_with(
        hv: &Hypervisor,
        paths: &SnapshotPaths,
        adjust: impl FnOnce(&mut VmConfig) -> Result<(), String>,
    ) -> Result<Vm, VmError> {
        let limits = hv.host_limits();
        // Everything the snapshot says is checked before anything outside the process changes.
        let (mut snapshot, mem_file) = read(paths, &limits)?;
        let mem_id = files::FileId::of_file(&mem_file).map_err(io_err(&paths.memory))?;
        adjust(&mut snapshot.config).map_err(|why| SnapshotError::Incompatible {
            path: paths.state.clone(),
            why,
        })?;
        let config = &snapshot.config;
        config.validate(&limits)?;
        if snapshot.vcpus.len() as u32 != config.machine_config.vcpu_count {
            return Err(SnapshotError::Incompatible {
                path: paths.state.clone(),
                why: "vCPU count differs from its config".into(),
            }
            .into());
        }
        // A failed restore leaves no serial log behind (sockets go with the devices).
        let mut created = files::CreatedFiles::default();
        if let Some(log) = &config.serial.output_path {
            created.note_if_new(log);
        }
        let started = std::time::Instant::now();
        let vm_fd = new_kvm_vm(hv)?;
        let memory = memory::map_memory_file(&mem_file, &snapshot.regions)?;
        // Handing the memory to KVM costs milliseconds on some backends (it sets up per-page
        // metadata); the devices are built meanwhile.
        let (slots, devices) = std::thread::scope(|scope| {
            let slots = scope.spawn(|| {
                memory::register_memory_slots(
                    &vm_fd,
                    &memory,
                    config.machine_config.track_dirty_pages,
                )
            });
            let devices = (|| -> Result<(DeviceManager, Option<ConsoleClient>), VmError> {
                let mut devices = DeviceManager::new(vm_fd.clone(), memory.clone())?;
                attach_virtio_devices(&mut devices, config)?;
                let (serial_out, console_client) = open_serial_output(config)?;
                devices.add_serial(serial_out)?;
                devices
                    .restore_state(&snapshot.devices, &memory)
                    .map_err(|why| SnapshotError::Incompatible {
                        path: paths.state.clone(),
                        why,
                    })?;
                Ok((devices, console_client))
            })();
            (
                slots
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                devices,
            )
        });
        slots?;
        let (devices, console_client) = devices?;
        log::debug!(
            "restore: memory and devices ready after {:?}",
            started.elapsed()
        );

        let (vcpus, msr_list) = create_vcpus(hv, &vm_fd, &devices, config)?;
        for (vcpu, state) in vcpus.iter().zip(&snapshot.vcpus) {
            state
                .restore(vcpu.fd())
                .map_err(|e| SnapshotError::Incompatible {
                    path: paths.state.clone(),
                    why: format!("vCPU {}: {e}", vcpu.index()),
                })?;
        }
        snapshot
            .vm
            .restore(&vm_fd)
            .map_err(|e| SnapshotError::Incompatible {
                path: paths.state.clone(),
                why: e.to_string(),
            })?;
        let mut backing = drive_files(config);
        backing.push(files::BackingFile {
            role: "snapshot memory file".into(),
            path: paths.memory.clone(),
            id: mem_id,
        });
        created.keep();
        log::info!(
            "{}: restored from {} in {:?}",
            config.display_name(),
            paths.state.display(),
            started.elapsed()
        );
        Ok(Vm {
            config: config.clone(),
            vcpus,
            vm_fd,
            memory,
            devices,
            entry: None,
            exit: Arc::new(ExitSignal::new().map_err(|e| VmError::EventLoop(e.to_string()))?),
            msr_list,
            console_client,
            backing,
        })
    }

    /// The parts of a snapshot the VM object itself holds (devices, memory layout, config),
    /// plus the given vCPU and VM state; the caller has paused the VM.
    pub(super) fn capture(&self, vcpus: Vec<VcpuState>) -> Result<MachineSnapshot, SnapshotError> {
        Ok(MachineSnapshot {
            config: self.config.clone(),
            regions: memory::region_layout(&self.memory),
            vm: VmState::save(&self.vm_fd).map_err(|e| SnapshotError::Capture(e.to_string()))?,
            vcpus,
            devices: self.devices.save_state(),
        })
    }
}

#[cfg(test)]
mod tests;
