//! Guest-physical memory for device rings and buffers: a bump allocator over the e820 RAM above the
//! guest image (and clear of the initrd), inside the identity map. Physical address == virtual
//! address, so what it hands out is both a pointer and a DMA address.
//!
//! Drivers allocate once when a device is probed; a monitor command takes a [`Mark`] first and
//! releases everything it allocated afterwards. A block that must outlive commands (`memfill`'s) is
//! taken from the top of a range instead.

use crate::boot::{BootInfo, E820_RAM};

const PAGE: u64 = 4096;
const MAX_RANGES: usize = 8;

extern "C" {
    /// End of the guest image, stacks and spare page tables included (kit/link.ld).
    static __image_end: u8;
}

/// A page-aligned, zeroed block of RAM that one owner hands to devices.
#[derive(Debug)]
pub struct DmaBuf {
    addr: u64,
    len: usize,
}

impl DmaBuf {
    /// Physical (= virtual) address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The bytes, for the driver to read while no device request covers them.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the block is identity-mapped RAM that the allocator gave to this owner alone; a
        // device writes it only while a request that the owner submitted is in flight.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// The bytes, for the driver to fill while no device request covers them.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`; `&mut self` makes this the only reference.
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Range {
    next: u64,
    end: u64,
}

/// Where each range's cursor stood; [`Frames::release`] goes back there.
#[derive(Clone, Copy, Debug)]
pub struct Mark([u64; MAX_RANGES]);

/// The allocator.
pub struct Frames {
    ranges: [Range; MAX_RANGES],
    count: usize,
}

impl Frames {
    /// Collects usable RAM: e820 type 1 above the image, below `mapped_end`, split around the initrd.
    pub fn new(boot: &BootInfo, mapped_end: u64) -> Self {
        let image_end = (&raw const __image_end) as u64;
        let mut frames = Frames {
            ranges: [Range::default(); MAX_RANGES],
            count: 0,
        };
        let initrd = boot.initrd.map(|i| (i.addr, i.addr.saturating_add(i.size)));
        for region in boot.memory_map().iter().filter(|r| r.kind == E820_RAM) {
            let start = region.start.max(image_end);
            let end = region.start.saturating_add(region.size).min(mapped_end);
            match initrd {
                Some((low, high)) if low < end && high > start => {
                    frames.add(start, low);
                    frames.add(high, end);
                }
                _ => frames.add(start, end),
            }
        }
        frames
    }

    fn add(&mut self, start: u64, end: u64) {
        let start = start.next_multiple_of(PAGE);
        let end = end & !(PAGE - 1);
        if start < end && self.count < MAX_RANGES {
            self.ranges[self.count] = Range { next: start, end };
            self.count += 1;
        }
    }

    /// Allocates `bytes` (rounded up to pages), zeroed; `None` when no range has room.
    pub fn alloc(&mut self, bytes: usize) -> Option<DmaBuf> {
        let size = (bytes as u64).max(1).next_multiple_of(PAGE);
        let range = self.ranges[..self.count]
            .iter_mut()
            .find(|r| r.end - r.next >= size)?;
        let addr = range.next;
        range.next += size;
        // SAFETY: the pages are usable RAM outside the image and the initrd, not handed out before
        // (or released by their previous owner), identity-mapped below the end of the map.
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, size as usize) };
        Some(DmaBuf { addr, len: bytes })
    }

    /// Takes `bytes` (rounded up to pages) from the top of the first range with room, not zeroed:
    /// a block that outlives monitor commands, because [`Frames::release`] only moves the bump
    /// cursors. Returns its address.
    pub fn take_top(&mut self, bytes: u64) -> Option<u64> {
        let size = bytes.max(1).next_multiple_of(PAGE);
        let range = self.ranges[..self.count]
            .iter_mut()
            .find(|r| r.end - r.next >= size)?;
        range.end -= size;
        Some(range.end)
    }

    /// Gives back a block [`Frames::take_top`] returned, the last one taken from its range.
    pub fn give_back_top(&mut self, addr: u64, bytes: u64) {
        let size = bytes.max(1).next_multiple_of(PAGE);
        if let Some(range) = self.ranges[..self.count].iter_mut().find(|r| r.end == addr) {
            range.end += size;
        }
    }

    /// Remembers the current allocation state.
    pub fn mark(&self) -> Mark {
        let mut mark = [0; MAX_RANGES];
        for (slot, range) in mark.iter_mut().zip(&self.ranges) {
            *slot = range.next;
        }
        Mark(mark)
    }

    /// Frees everything allocated since `mark`; the blocks must no longer be used.
    pub fn release(&mut self, mark: Mark) {
        for (range, next) in self.ranges.iter_mut().zip(mark.0) {
            range.next = range.next.min(next);
        }
    }
}
