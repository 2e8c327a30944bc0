//! Guest physical memory: anonymous mappings tracked by vm-memory's atomic dirty bitmap (live
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

/// Maps `mem_bytes` of anonymous guest memory, with dirty tracking of the VMM's own writes.
pub fn create_guest_memory(
    mem_bytes: u64,
    huge_pages: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    if huge_pages {
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    }
    let regions = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(base, len)| {
            let size = len as usize;
            let page_size = if huge_pages { 2 << 20 } else { 4096 };
            let bitmap = AtomicBitmap::new(
                size,
                std::num::NonZeroUsize::new(page_size).expect("non-zero"),
            );
            let mapping = MmapRegionBuilder::new_with_bitmap(size, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_hugetlbfs(huge_pages)
                .build()
                .map_err(|source| MemoryError::Mmap {
                    size,
                    huge_pages,
                    source,
                })?;
            // `base + len` cannot overflow: both are below 2^48 by construction.
            Ok(GuestRegionMmap::new(mapping, base).expect("region fits the address space"))
        })
        .collect::<Result<Vec<_>, MemoryError>>()?;
    Ok(GuestMemoryMmap::from_regions(regions)?)
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
}
