//! Split virtqueues (virtio 1.x, section 2.7) in guest memory: descriptor table, available ring and
//! used ring in one block from [`Frames`], a free list threaded through the descriptors' `next`
//! fields, batched publication, and notification suppression both ways (VIRTIO_F_RING_EVENT_IDX, or
//! the ring flags without it).
//!
//! All ring accesses are single volatile loads and stores; fences order them against buffer contents
//! and against the device's view.

use core::sync::atomic::{fence, Ordering};

use super::mmio::{QueueAddresses, Transport};
use crate::frames::{DmaBuf, Frames};
use crate::phys::{load, store};

/// Largest queue the kit uses (the device may offer more).
pub const MAX_SIZE: u16 = 256;

const DESC_SIZE: u64 = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// One buffer of a request: where, how long, and whether the device writes it.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (else device-readable).
    pub write: bool,
}

impl Seg {
    /// A buffer the device reads.
    pub fn read(addr: u64, len: u32) -> Self {
        Seg {
            addr,
            len,
            write: false,
        }
    }

    /// A buffer the device writes.
    pub fn write(addr: u64, len: u32) -> Self {
        Seg {
            addr,
            len,
            write: true,
        }
    }
}

/// A descriptor exactly as it goes into the table (for the hostile tests, which write bad ones).
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// NEXT = 1, WRITE = 2, INDIRECT = 4.
    pub flags: u16,
    /// Next descriptor when NEXT is set.
    pub next: u16,
}

/// A completed request from the used ring.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    /// Head descriptor of the chain.
    pub id: u16,
    /// Bytes the device wrote.
    pub len: u32,
    /// Buffer address of the head descriptor (how receive buffers find their way back).
    pub addr: u64,
}

/// One split virtqueue.
pub struct Virtqueue {
    index: u16,
    size: u16,
    rings: QueueAddresses,
    _memory: DmaBuf,
    free_head: u16,
    num_free: u16,
    /// The avail index the driver has filled up to (published or not).
    avail_idx: u16,
    /// The avail index the device was last told about (notified or seen as not needing notice).
    kicked_idx: u16,
    last_used: u16,
    event_idx: bool,
    in_flight: [u64; MAX_SIZE as usize / 64],
    /// Used entries naming a descriptor that was not in flight (a device bug).
    pub bogus_used: u32,
}

impl Virtqueue {
    /// Allocates queue `index` of the largest power-of-two size up to `max` and [`MAX_SIZE`];
    /// `event_idx` says whether VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub fn new(frames: &mut Frames, index: u16, max: u16, event_idx: bool) -> Option<Self> {
        if max == 0 {
            return None;
        }
        let size = 1u16 << (15 - max.min(MAX_SIZE).leading_zeros());
        let n = u64::from(size);
        let avail_offset = DESC_SIZE * n;
        let used_offset = (avail_offset + 6 + 2 * n).next_multiple_of(4);
        let total = used_offset + 6 + 8 * n;
        let memory = frames.alloc(total as usize)?;
        let base = memory.addr();
        let mut queue = Virtqueue {
            index,
            size,
            rings: QueueAddresses {
                desc: base,
                avail: base + avail_offset,
                used: base + used_offset,
            },
            _memory: memory,
            free_head: 0,
            num_free: 0,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event_idx,
            in_flight: [0; MAX_SIZE as usize / 64],
            bogus_used: 0,
        };
        queue.clear();
        Some(queue)
    }

    /// Empties the rings and the driver's state, as after a device reset.
    pub fn clear(&mut self) {
        let n = u64::from(self.size);
        for i in 0..n {
            self.write_desc(
                i as u16,
                RawDesc {
                    addr: 0,
                    len: 0,
                    flags: 0,
                    next: (i as u16).wrapping_add(1),
                },
            );
        }
        for offset in (0..6 + 2 * n).step_by(2) {
            store::<u16>(self.rings.avail + offset, 0);
        }
        for offset in (0..6 + 8 * n).step_by(2) {
            store::<u16>(self.rings.used + offset, 0);
        }
        self.free_head = 0;
        self.num_free = self.size;
        self.avail_idx = 0;
        self.kicked_idx = 0;
        self.last_used = 0;
        self.in_flight = [0; MAX_SIZE as usize / 64];
        self.bogus_used = 0;
    }

    /// Hands the rings to the device (QueueNum, addresses, QueueReady).
    pub fn attach(&self, transport: &Transport) {
        transport.setup_queue(self.index, self.size, self.rings);
    }

    /// The queue's index on its device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Where the rings are.
    pub fn rings(&self) -> QueueAddresses {
        self.rings
    }

    /// Descriptors not in use.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains added with [`Virtqueue::add`] that the device has not returned yet.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.iter().map(|word| word.count_ones()).sum()
    }

    /// The descriptor the next [`Virtqueue::add`] will use as its head, if any is free.
    pub fn peek_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Writes descriptor `index`.
    pub fn write_desc(&mut self, index: u16, desc: RawDesc) {
        let at = self.rings.desc + DESC_SIZE * u64::from(index);
        store(at, desc.addr);
        store(at + 8, desc.len);
        store(at + 12, desc.flags);
        store(at + 14, desc.next);
    }

    fn desc_addr(&self, index: u16) -> u64 {
        load(self.rings.desc + DESC_SIZE * u64::from(index))
    }

    fn desc_flags_next(&self, index: u16) -> (u16, u16) {
        let at = self.rings.desc + DESC_SIZE * u64::from(index);
        (load(at + 12), load(at + 14))
    }

    /// Takes one descriptor off the free list for good (until [`Virtqueue::clear`]); for the
    /// hostile tests, which fill it with [`Virtqueue::write_desc`].
    pub fn take_desc(&mut self) -> Option<u16> {
        let head = self.peek_head()?;
        self.free_head = self.desc_flags_next(head).1;
        self.num_free -= 1;
        Some(head)
    }

    /// Chains `segs` into free descriptors and puts the chain in the available ring (unpublished
    /// until [`Virtqueue::publish`]). Returns the head, or `None` if there are too few descriptors.
    pub fn add(&mut self, segs: &[Seg]) -> Option<u16> {
        if segs.is_empty() || segs.len() > usize::from(self.num_free) {
            return None;
        }
        let head = self.free_head;
        let mut index = head;
        for (i, seg) in segs.iter().enumerate() {
            let next_free = self.desc_flags_next(index).1;
            let last = i + 1 == segs.len();
            let mut flags = if last { 0 } else { DESC_F_NEXT };
            if seg.write {
                flags |= DESC_F_WRITE;
            }
            self.write_desc(
                index,
                RawDesc {
                    addr: seg.addr,
                    len: seg.len,
                    flags,
                    next: if last { 0 } else { next_free },
                },
            );
            self.free_head = next_free;
            index = next_free;
        }
        self.num_free -= segs.len() as u16;
        self.in_flight[usize::from(head / 64)] |= 1 << (head % 64);
        self.push_avail(head);
        Some(head)
    }

    /// Puts any value into the next available-ring slot (the hostile tests pass bad heads).
    pub fn push_avail(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        store(self.rings.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Moves the driver's avail index by `delta` without filling slots (a hostile test).
    pub fn skip_avail(&mut self, delta: u16) {
        self.avail_idx = self.avail_idx.wrapping_add(delta);
    }

    /// Makes everything added so far visible to the device.
    pub fn publish(&mut self) {
        // Release: descriptors, ring slots and buffer contents before the index.
        fence(Ordering::Release);
        store(self.rings.avail + 2, self.avail_idx);
    }

    /// Publishes and notifies the device if it asked to be told (event index or flags).
    pub fn kick(&mut self, transport: &Transport) {
        self.publish();
        // The index store must be visible before the device's suppression state is read.
        fence(Ordering::SeqCst);
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        if old == new {
            return;
        }
        let needed = if self.event_idx {
            let avail_event: u16 = load(self.rings.used + 4 + 8 * u64::from(self.size));
            need_event(avail_event, new, old)
        } else {
            load::<u16>(self.rings.used) & USED_F_NO_NOTIFY == 0
        };
        if needed {
            transport.notify(self.index);
        }
    }

    /// Notifies the device unconditionally.
    pub fn notify(&mut self, transport: &Transport) {
        self.publish();
        self.kicked_idx = self.avail_idx;
        transport.notify(self.index);
    }

    fn used_idx(&self) -> u16 {
        let idx = load(self.rings.used + 2);
        // Acquire: entries and buffer contents after the index.
        fence(Ordering::Acquire);
        idx
    }

    /// Whether the device has returned buffers not yet popped.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next completed chain and frees its descriptors. Entries naming descriptors that
    /// are not in flight are counted in [`Virtqueue::bogus_used`] and skipped.
    pub fn pop(&mut self) -> Option<Used> {
        while self.has_used() {
            let slot = u64::from(self.last_used % self.size);
            let entry = self.rings.used + 4 + 8 * slot;
            let id: u32 = load(entry);
            let len: u32 = load(entry + 4);
            self.last_used = self.last_used.wrapping_add(1);
            let in_flight = id < u32::from(self.size)
                && self.in_flight[id as usize / 64] & (1 << (id % 64)) != 0;
            if !in_flight {
                self.bogus_used += 1;
                continue;
            }
            let id = id as u16;
            self.in_flight[usize::from(id / 64)] &= !(1 << (id % 64));
            let addr = self.desc_addr(id);
            self.free_chain(id);
            return Some(Used { id, len, addr });
        }
        None
    }

    fn free_chain(&mut self, head: u16) {
        let mut index = head;
        let mut count = 1;
        loop {
            let (flags, next) = self.desc_flags_next(index);
            if flags & DESC_F_NEXT == 0 || count == self.size {
                break;
            }
            index = next;
            count += 1;
        }
        let at = self.rings.desc + DESC_SIZE * u64::from(index);
        store(at + 14, self.free_head);
        self.free_head = head;
        self.num_free += count;
    }

    /// Asks the device to interrupt when the next buffer is used.
    pub fn enable_interrupts(&mut self) {
        if self.event_idx {
            store(
                self.rings.avail + 4 + 2 * u64::from(self.size),
                self.last_used,
            );
        } else {
            store::<u16>(self.rings.avail, 0);
        }
        fence(Ordering::SeqCst);
    }

    /// Asks the device not to interrupt (a hint; polling drivers still see interrupts rarely).
    pub fn disable_interrupts(&mut self) {
        if self.event_idx {
            // The device interrupts when the used index passes this: half the index space away.
            store(
                self.rings.avail + 4 + 2 * u64::from(self.size),
                self.last_used.wrapping_add(0x8000),
            );
        } else {
            store(self.rings.avail, AVAIL_F_NO_INTERRUPT);
        }
    }
}

/// The event-index test of section 2.7.10: whether moving an index from `old` to `new` passes
/// `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}
