//! Guest physical memory: memfd mappings (shared, so that a same-host migration hands the pages
//! over) or a snapshot file's private mapping, tracked by vm-memory's atomic dirty bitmap (live
//! migration and FT read it to find pages the VMM itself wrote), and their KVM memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest's RAM as the VMM and the devices see it.
pub use lockstep_devices::GuestMemoryMmap;

/// Why guest memory could not be set up.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The host would not give us the mapping.
    #[error("cannot map {size} bytes of guest memory{}: {source}", if *.huge_pages { " with 2 MiB huge pages (are hugepages reserved in /proc/sys/vm/nr_hugepages?)" } else { "" })]
    Mmap {
        /// Size of the region asked for.
        size: usize,
        /// Whether huge pages were asked for.
        huge_pages: bool,
        /// What mmap said.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions did not form a valid guest memory map.
    #[error("invalid guest memory layout: {0}")]
    Layout(#[from] vm_memory::GuestRegionCollectionError),
    /// A region of a snapshot's memory map cannot be mapped.
    #[error("guest memory region at {base:#x} of {len:#x} bytes: {why}")]
    BadRegion {
        /// Its guest address.
        base: u64,
        /// Its length.
        len: u64,
        /// What is wrong.
        why: String,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot}: {source}")]
    SetSlot {
        /// The slot number.
        slot: u32,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges for `mem_bytes` of guest memory: everything below the 32-bit MMIO gap first,
/// the rest from 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Maps `mem_bytes` of guest memory, with dirty tracking of the VMM's own writes. Each region is
/// a memfd (on 2 MiB huge pages when asked) mapped shared, so that another lockstep process on
/// this host can map the same pages (same-host migration, `migration::local`); its size is
/// sealed, so that nobody holding it can shrink it under a mapping.
pub fn create_guest_memory(
    mem_bytes: u64,
    huge_pages: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(base, len)| {
            let file = create_memfd(len, huge_pages)?;
            map_memfd(file, base, len, huge_pages)
        })
        .collect::<Result<Vec<_>, MemoryError>>()?;
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// The seals every guest memory memfd carries: its size is fixed.
pub const MEMFD_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A new memfd of `len` bytes, its size sealed.
fn create_memfd(len: u64, huge_pages: bool) -> Result<std::fs::File, MemoryError> {
    use std::os::fd::FromRawFd;
    let fail = |e: std::io::Error| MemoryError::Mmap {
        size: len as usize,
        huge_pages,
        source: vm_memory::mmap::MmapRegionError::Mmap(e),
    };
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if huge_pages {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a NUL-terminated string; the call creates a new descriptor.
    let fd = unsafe { libc::memfd_create(c"lockstep-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).map_err(fail)?;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, MEMFD_SEALS) } < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Maps a whole memfd of `len` bytes shared, as the guest region at `base`.
pub fn map_memfd(
    file: std::fs::File,
    base: GuestAddress,
    len: u64,
    huge_pages: bool,
) -> Result<GuestRegionMmap<AtomicBitmap>, MemoryError> {
    let bad = |why: &str| MemoryError::BadRegion {
        base: base.0,
        len,
        why: why.to_string(),
    };
    let size = usize::try_from(len).map_err(|_| bad("larger than this host's address space"))?;
    let page_size = if huge_pages { 2 << 20 } else { 4096 };
    let bitmap = AtomicBitmap::new(
        size,
        std::num::NonZeroUsize::new(page_size).expect("non-zero"),
    );
    let mapping = MmapRegionBuilder::new_with_bitmap(size, bitmap)
        .with_file_offset(vm_memory::FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .with_hugetlbfs(huge_pages)
        .build()
        .map_err(|source| MemoryError::Mmap {
            size,
            huge_pages,
            source,
        })?;
    GuestRegionMmap::new(mapping, base)
        .ok_or_else(|| bad("it runs past the end of the address space"))
}

/// The memfd behind every region of `mem`, when all of them are shared memfd mappings from
/// offset 0 (fresh guest memory is; a snapshot's private file mapping is not).
pub fn memfds(mem: &GuestMemoryMmap) -> Option<Vec<&std::fs::File>> {
    mem.iter().map(shared_file).collect()
}

/// The file behind a region mapped shared from its offset 0 (a memfd of fresh guest memory);
/// None for anonymous memory and a snapshot's private file mapping.
fn shared_file(region: &GuestRegionMmap<AtomicBitmap>) -> Option<&std::fs::File> {
    let fo = region.file_offset()?;
    (fo.start() == 0 && region.flags() & libc::MAP_SHARED != 0).then(|| fo.file())
}

/// Which pages of a region hold data (one byte a page, bit 0 set), for skipping the others as
/// zeros; None when that cannot be known cheaply (then every page is read). Anonymous memory
/// asks the page tables (present or swapped); a memfd asks the file (`SEEK_DATA`, which counts
/// swapped pages and pages another process wrote); a snapshot's private file mapping cannot be
/// asked (untouched pages hold the file's data).
pub fn data_pages(region: &GuestRegionMmap<AtomicBitmap>) -> Option<Vec<u8>> {
    let len = region.len() as usize;
    if region.file_offset().is_none() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .ok()?;
        return crate::vm::snapshot::resident_pages(host, len);
    }
    file_data_pages(shared_file(region)?, len)
}

fn file_data_pages(file: &std::fs::File, len: usize) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let pages = len.div_ceil(4096);
    let mut map = vec![0u8; pages];
    let fd = file.as_raw_fd();
    let mut at: libc::off_t = 0;
    let end = libc::off_t::try_from(len).ok()?;
    while at < end {
        // SAFETY: lseek on a descriptor the region keeps open; no memory is touched.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data past `at`.
            return (std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO))
                .then_some(map);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let (first, last) = (
            data as usize / 4096,
            (hole as usize).div_ceil(4096).min(pages),
        );
        for page in &mut map[first.min(pages)..last] {
            *page = 1;
        }
        at = hole;
    }
    Some(map)
}

/// Maps guest memory from a snapshot's memory file, where `regions` (guest address, length) lie
/// back to back. The mapping is private: pages are read from the file when the guest first
/// touches them (so restoring does not grow with memory size) and guest writes never reach the
/// file.
pub fn map_memory_file(
    file: &std::fs::File,
    regions: &[(u64, u64)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut offset = 0u64;
    let mut mapped = Vec::with_capacity(regions.len());
    for &(base, len) in regions {
        let bad = |why: &str| MemoryError::BadRegion {
            base,
            len,
            why: why.to_string(),
        };
        let size =
            usize::try_from(len).map_err(|_| bad("larger than this host's address space"))?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| bad("the regions' lengths overflow"))?;
        let file = file.try_clone().map_err(|e| MemoryError::Mmap {
            size,
            huge_pages: false,
            source: vm_memory::mmap::MmapRegionError::Mmap(e),
        })?;
        let bitmap = AtomicBitmap::new(size, std::num::NonZeroUsize::new(4096).expect("non-zero"));
        let mapping = MmapRegionBuilder::new_with_bitmap(size, bitmap)
            .with_file_offset(vm_memory::FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Mmap {
                size,
                huge_pages: false,
                source,
            })?;
        mapped.push(
            GuestRegionMmap::new(mapping, GuestAddress(base))
                .ok_or_else(|| bad("it runs past the end of the address space"))?,
        );
        offset = end;
    }
    Ok(GuestMemoryMmap::from_regions(mapped)?)
}

/// The (guest address, length) of every region, in order.
pub fn region_layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Hands every region to KVM as a memory slot, numbered from 0.
pub fn register_memory_slots(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("offset 0 is inside every region");
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping lives as long as the guest memory object, which the VM owns and
        // keeps alive until the VM file descriptor is closed.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::SetSlot { slot, source })?;
    }
    Ok(())
}

/// Total RAM of the guest, in bytes.
pub fn total_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn memory_is_usable_and_vmm_writes_are_tracked() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        assert_eq!(total_bytes(&mem), 16 << 20);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x5000))
            .unwrap();
        let region = mem.find_region(GuestAddress(0x5000)).unwrap();
        use vm_memory::bitmap::Bitmap;
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x9000));
    }

    #[test]
    fn memory_is_memfds_that_know_their_unwritten_pages() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        assert_eq!(memfds(&mem).map(|f| f.len()), Some(1));
        mem.write_obj(1u8, GuestAddress(5 * 4096 + 7)).unwrap();
        let map = data_pages(mem.iter().next().unwrap()).unwrap();
        assert_eq!(map.len(), 4096);
        assert_eq!((map[4], map[5], map[6], map[4095]), (0, 1, 0, 0));
    }
}
