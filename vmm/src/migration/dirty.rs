//! Which guest pages changed: KVM's dirty log for the guest's writes, merged with vm-memory's
//! bitmap of the VMM's and the devices' writes.

use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vm::MigrationAccess;

/// Dirty pages of one region: one bit per 4 KiB page.
pub(crate) type Bits = Vec<u64>;

/// KVM's dirty log switched on for every memory slot while it lives (and back off, unless the
/// config keeps it on).
pub(crate) struct DirtyLog<'a> {
    access: &'a MigrationAccess,
}

impl<'a> DirtyLog<'a> {
    /// Starts logging; the VM must be paused. Each slot is removed and added back with logging
    /// on, so no page stays writable without a fault: PVM does not write-protect the pages of a
    /// slot whose flags merely change.
    pub(super) fn start(access: &'a MigrationAccess) -> Result<Self, String> {
        let log = DirtyLog { access };
        log.set_flags(None)?;
        log.set_flags(Some(true))?;
        // Whatever was written before now goes in round 0 anyway.
        log.take()?;
        Ok(log)
    }

    /// Sets every slot's dirty-logging flag (`None`: removes the slots).
    fn set_flags(&self, on: Option<bool>) -> Result<(), String> {
        for (slot, region) in self.access.memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| e.to_string())?;
            let flags = if on == Some(true) || self.access.track_dirty_pages {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            };
            let kvm_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: if on.is_some() { region.len() } else { 0 },
                userspace_addr: host as u64,
            };
            // SAFETY: the same slot with the same mapping the VM registered, which `memory`
            // (cloned from the VM's) keeps alive; only the dirty-logging flag changes.
            unsafe { self.access.vm_fd.set_user_memory_region(kvm_region) }
                .map_err(|e| format!("KVM will not log dirty pages of slot {slot}: {e}"))?;
        }
        Ok(())
    }

    /// Pages written since the last call (by the guest, per KVM, or by the VMM and devices, per
    /// vm-memory's bitmap), and clears both.
    pub(crate) fn take(&self) -> Result<Vec<Bits>, String> {
        self.access
            .memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let mut bits = self
                    .access
                    .vm_fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|e| format!("KVM dirty log of slot {slot}: {e}"))?;
                let vmm = vmm_bitmap(region);
                for (word, extra) in bits.iter_mut().zip(vmm.get_and_reset()) {
                    *word |= extra;
                }
                Ok(bits)
            })
            .collect()
    }
}

impl Drop for DirtyLog<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.set_flags(Some(false)) {
            log::warn!("migration: {e}");
        }
    }
}

/// The bitmap of the VMM's own writes to a region.
fn vmm_bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

pub(super) fn count(bits: &[Bits]) -> u64 {
    bits.iter()
        .flat_map(|b| b.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}
