//! virtio-net frames in guest memory, with no tap and no eventfds: reading a transmit chain into a
//! frame, placing a received frame into one or more receive buffers (VIRTIO_NET_F_MRG_RXBUF), and
//! publishing used buffers in batches. The guest writes the chains, so each one is checked
//! (direction, bounds, size, loops) before the device uses it.

use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::{fence, Ordering};

use smallvec::SmallVec;
use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::tap::Tap;
use crate::GuestMemoryMmap;

/// Size of `struct virtio_net_hdr_v1` (virtio 1.x always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame, vnet header included: room for a 64 KiB GSO packet with its link-layer
/// headers (the limit Firecracker uses too).
pub const MAX_FRAME_LEN: usize = 65562;
/// More descriptors than this in one chain is no buffer a driver needs (a direct chain cannot
/// be longer than the queue anyway); it bounds the work one indirect table can cause.
const MAX_CHAIN_DESCRIPTORS: usize = 256;
const HDR_FLAGS: usize = 0;
const HDR_GSO_TYPE: usize = 1;
const HDR_NUM_BUFFERS: usize = 10;
const VRING_USED_HEADER: u64 = 4;
const VRING_USED_ELEM: u64 = 8;
const VRING_AVAIL_HEADER: u64 = 4;

/// Why a chain cannot be used; it is returned to the driver with nothing written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BadChain {
    /// The chain loops, names a descriptor beyond the table, or its table cannot be read.
    #[error("the chain loops or breaks off")]
    Broken,
    /// More descriptors than any frame needs.
    #[error("the chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A transmit buffer the device would write, or a receive buffer it would read.
    #[error("a buffer has the wrong direction")]
    WrongDirection,
    /// A buffer is not inside guest memory.
    #[error("a buffer lies outside guest memory")]
    OutsideMemory,
    /// Smaller than the 12-byte vnet header.
    #[error("the chain is too short for the vnet header")]
    TooShort,
    /// A transmit frame longer than [`MAX_FRAME_LEN`].
    #[error("the frame is longer than {MAX_FRAME_LEN} bytes")]
    TooLong,
    /// The header asks for a checksum or segmentation offload the driver did not negotiate.
    #[error("the header asks for an offload that was not negotiated")]
    UnnegotiatedOffload,
}

/// Why a frame from the tap was not given to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameDrop {
    /// Shorter than the vnet header.
    #[error("shorter than the vnet header")]
    Runt,
    /// Needs an offload (partial checksum, segmentation) the driver cannot receive.
    #[error("uses an offload the driver did not accept")]
    Offload,
    /// Larger than the driver's receive buffers can hold, or than [`MAX_FRAME_LEN`].
    #[error("larger than the receive buffers")]
    TooBig,
}

/// The mask of feature bit `bit`.
pub(super) fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Walks a chain, handing each buffer to `each`; every buffer must have the direction given
/// (`device_writes`), and the chain must end properly.
fn walk<M>(
    chain: DescriptorChain<M>,
    device_writes: bool,
    mut each: impl FnMut(GuestAddress, u32) -> Result<(), BadChain>,
) -> Result<(), BadChain>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut count = 0;
    let mut ended = false;
    // The iterator stops quietly on a loop (after queue-size steps), a bad next index or an
    // unreadable table; in each case the last descriptor it gave still says NEXT.
    for desc in chain {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(BadChain::TooManyDescriptors);
        }
        if desc.is_write_only() != device_writes {
            return Err(BadChain::WrongDirection);
        }
        each(desc.addr(), desc.len())?;
        ended = !desc.has_next();
    }
    if ended {
        Ok(())
    } else {
        Err(BadChain::Broken)
    }
}

/// A transmit chain's buffers in order, and the frame's length: the chain ends properly, the
/// device only reads it, and it holds a vnet header and at most [`MAX_FRAME_LEN`] bytes.
struct TxChain {
    segments: SmallVec<[(GuestAddress, u32); 4]>,
    len: usize,
}

impl TxChain {
    fn parse<M>(chain: DescriptorChain<M>) -> Result<TxChain, BadChain>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut segments = SmallVec::new();
        let mut len = 0usize;
        walk(chain, false, |addr, desc_len| {
            len = len
                .checked_add(desc_len as usize)
                .filter(|&end| end <= MAX_FRAME_LEN)
                .ok_or(BadChain::TooLong)?;
            segments.push((addr, desc_len));
            Ok(())
        })?;
        if len < VNET_HDR_LEN {
            return Err(BadChain::TooShort);
        }
        Ok(TxChain { segments, len })
    }

    /// Copies the frame into the start of `buf`; returns that part of it.
    fn copy_into<'b>(
        &self,
        mem: &GuestMemoryMmap,
        buf: &'b mut [u8],
    ) -> Result<&'b mut [u8], BadChain> {
        let frame = buf.get_mut(..self.len).ok_or(BadChain::TooLong)?;
        let mut at = 0;
        for &(addr, seg_len) in &self.segments {
            let end = at + seg_len as usize;
            mem.read_slice(&mut frame[at..end], addr)
                .map_err(|_| BadChain::OutsideMemory)?;
            at = end;
        }
        Ok(frame)
    }
}

/// Copies the frame a transmit chain holds (vnet header first) into `buf`; returns its length.
pub fn read_tx_frame<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<usize, BadChain>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let tx = TxChain::parse(chain)?;
    Ok(tx.copy_into(mem, buf)?.len())
}

/// Copies the frame a transmit chain holds (vnet header first) into a buffer of its own and
/// checks its header against the negotiated offloads (`acked`), for a frame the device keeps
/// after returning its chain (the FT output gate). The chain is parsed whole first, so the
/// allocation is the frame's checked length, at most [`MAX_FRAME_LEN`].
pub fn copy_tx_frame<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    acked: u64,
) -> Result<Box<[u8]>, BadChain>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let tx = TxChain::parse(chain)?;
    let mut frame = vec![0u8; tx.len].into_boxed_slice();
    tx.copy_into(mem, &mut frame)?;
    check_tx_header(&frame, acked)?;
    Ok(frame)
}

/// Sends the frame a transmit chain holds (vnet header first) to the tap. The header is copied
/// out and checked against the negotiated offloads (`acked`), so the guest cannot change it
/// after the check; the rest goes to the kernel straight from guest memory (one copy, by the
/// kernel), or through `bounce` when a buffer is not one contiguous mapping (or lies outside
/// guest memory, which the copy then reports). Returns the frame's length and what the tap said
/// of it. The chain is parsed as [`read_tx_frame`] parses it, whole, before its memory is
/// touched, so both refuse the same chains for the same reasons.
pub fn send_tx_frame<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    tap: &Tap,
    acked: u64,
    bounce: &mut [u8],
) -> Result<(usize, std::io::Result<usize>), BadChain>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let tx = TxChain::parse(chain)?;
    let mut slices: SmallVec<[_; 4]> = SmallVec::new();
    for &(addr, seg_len) in &tx.segments {
        match vm_memory::GuestMemoryBackend::get_slice(mem, addr, seg_len as usize) {
            Ok(slice) => slices.push(slice),
            Err(_) => return send_bounced(&tx, mem, tap, acked, bounce),
        }
    }
    let mut header = [0u8; VNET_HDR_LEN];
    let mut copied = 0;
    let mut rest: SmallVec<[libc::iovec; 4]> = SmallVec::new();
    for slice in &slices {
        let take = (VNET_HDR_LEN - copied).min(slice.len());
        if take > 0 {
            let head = slice
                .subslice(0, take)
                .map_err(|_| BadChain::OutsideMemory)?;
            copied += head.copy_to(&mut header[copied..copied + take]);
        }
        if slice.len() > take {
            let tail = slice.offset(take).map_err(|_| BadChain::OutsideMemory)?;
            rest.push(libc::iovec {
                iov_base: tail.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: tail.len(),
            });
        }
    }
    check_tx_header(&header, acked)?;
    let mut iovecs: SmallVec<[libc::iovec; 5]> = SmallVec::new();
    iovecs.push(libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    });
    iovecs.extend(rest);
    // SAFETY: the first iovec is `header`, alive until the call returns; the others are
    // checked ranges of mapped guest memory (`mem` keeps it mapped for the call). Their guards
    // are gone already, which is sound because guest memory is mapped once, up front (the xen
    // feature of vm-memory, which maps on demand, is not used).
    let sent = unsafe { tap.write_from(&iovecs) };
    Ok((tx.len, sent))
}

/// [`send_tx_frame`] through a copy, for chains whose buffers span memory regions.
fn send_bounced(
    tx: &TxChain,
    mem: &GuestMemoryMmap,
    tap: &Tap,
    acked: u64,
    bounce: &mut [u8],
) -> Result<(usize, std::io::Result<usize>), BadChain> {
    let frame = tx.copy_into(mem, bounce)?;
    check_tx_header(frame, acked)?;
    Ok((tx.len, tap.write(frame)))
}

/// Checks that a transmit header only uses offloads the driver negotiated (`acked` features).
pub fn check_tx_header(frame: &[u8], acked: u64) -> Result<(), BadChain> {
    if frame.len() < VNET_HDR_LEN {
        return Err(BadChain::TooShort);
    }
    let has = |bit| acked & feature(bit) != 0;
    let flags = u32::from(frame[HDR_FLAGS]);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_CSUM) {
        return Err(BadChain::UnnegotiatedOffload);
    }
    let allowed = match u32::from(frame[HDR_GSO_TYPE]) {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        // UDP fragmentation, ECN and anything newer are not offered.
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(BadChain::UnnegotiatedOffload)
    }
}

/// Makes the header the tap wrote fit what the driver negotiated (`acked`): without
/// GUEST_CSUM the flags must be zero (virtio 1.2, 5.1.6.4.1), and segmented frames need the
/// matching GUEST_TSO feature.
pub fn prepare_rx_header(frame: &mut [u8], acked: u64) -> Result<(), FrameDrop> {
    if frame.len() < VNET_HDR_LEN {
        return Err(FrameDrop::Runt);
    }
    let has = |bit| acked & feature(bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        if u32::from(frame[HDR_FLAGS]) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return Err(FrameDrop::Offload);
        }
        frame[HDR_FLAGS] = 0;
    }
    let allowed = match u32::from(frame[HDR_GSO_TYPE]) {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(FrameDrop::Offload)
    }
}

/// The chains one frame goes into: usually one, so kept inline (no allocation per frame).
type Buffers = SmallVec<[RxBuffer; 2]>;

/// A receive chain the device may fill: its device-writable buffers, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxBuffer {
    head: u16,
    segments: SmallVec<[(GuestAddress, u32); 4]>,
    capacity: usize,
}

impl RxBuffer {
    /// Checks a receive chain: only device-writable buffers, all in guest memory, room for at
    /// least the vnet header. On error, the chain's head goes back to the driver unused.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, (u16, BadChain)>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut segments = SmallVec::new();
        let mut capacity = 0usize;
        walk(chain, true, |addr, len| {
            if !mem.check_range(addr, len as usize, Permissions::Write) {
                return Err(BadChain::OutsideMemory);
            }
            segments.push((addr, len));
            capacity = capacity.saturating_add(len as usize);
            Ok(())
        })
        .map_err(|why| (head, why))?;
        if capacity < VNET_HDR_LEN {
            return Err((head, BadChain::TooShort));
        }
        Ok(RxBuffer {
            head,
            segments,
            capacity,
        })
    }

    /// The chain's head descriptor, which goes into the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Bytes the chain can take.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Reads the first `out.len()` bytes of the buffer.
    fn read_start(&self, mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<(), BadChain> {
        let mut done = 0;
        for &(addr, len) in &self.segments {
            if done == out.len() {
                break;
            }
            let n = (len as usize).min(out.len() - done);
            mem.read_slice(&mut out[done..done + n], addr)
                .map_err(|_| BadChain::OutsideMemory)?;
            done += n;
        }
        if done == out.len() {
            Ok(())
        } else {
            Err(BadChain::TooShort)
        }
    }

    /// Writes the start of `data` into the buffer; returns how much it took.
    fn fill(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<usize, BadChain> {
        let mut done = 0;
        for &(addr, len) in &self.segments {
            if done == data.len() {
                break;
            }
            let n = (len as usize).min(data.len() - done);
            // Guest writes through vm-memory mark the pages dirty for migration.
            mem.write_slice(&data[done..done + n], addr)
                .map_err(|_| BadChain::OutsideMemory)?;
            done += n;
        }
        Ok(done)
    }
}

/// What became of a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written into this many of the guest's buffers (visible once the batch is published).
    Delivered(u16),
    /// Not enough buffers yet: none was consumed; the frame must wait for more.
    NoBuffers,
    /// The frame can never fit this driver's buffers; no buffer was consumed.
    Dropped(FrameDrop),
}

pub use crate::virtio::device::next_chain;

/// What became of [`receive_direct`]'s attempt.
#[derive(Debug)]
pub enum Direct {
    /// A frame of this length (vnet header included) is in the chain, pushed to `batch`.
    Delivered(usize),
    /// The driver has no chain available.
    NoBuffers,
    /// The tap has no frame; the chain stays available.
    TapEmpty,
    /// The tap failed; the chain stays available.
    TapFailed(std::io::Error),
    /// The frame was read and dropped; the chain stays available.
    Dropped(FrameDrop),
    /// The next chain was malformed and went back to the driver empty; try the next one.
    BadChain,
    /// The chain cannot be read into directly (a buffer spans two memory regions); it stays
    /// available, for the copying path.
    Indirect,
}

/// Reads the tap's next frame straight into the driver's next receive chain, for drivers
/// without MRG_RXBUF (each chain holds a whole frame): one copy, by the kernel, instead of two.
/// Marks the written guest pages dirty, fixes up the vnet header in place and returns the chain
/// to the used ring through `batch`. Whenever no frame is delivered the chain stays available.
pub fn receive_direct(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &Tap,
    acked: u64,
    batch: &mut UsedBatch,
) -> Result<Direct, virtio_queue::Error> {
    let Some(chain) = next_chain(queue, mem)? else {
        return Ok(Direct::NoBuffers);
    };
    let buffer = match RxBuffer::parse(chain, mem) {
        Ok(buffer) => buffer,
        Err((head, why)) => {
            log::debug!("virtio-net: receive buffer {head} returned unused: {why}");
            batch.push(queue, mem, head, 0)?;
            return Ok(Direct::BadChain);
        }
    };
    let mut slices: SmallVec<[_; 4]> = SmallVec::new();
    for &(addr, len) in &buffer.segments {
        match vm_memory::GuestMemoryBackend::get_slice(mem, addr, len as usize) {
            Ok(slice) => slices.push(slice),
            Err(_) => {
                queue.go_to_previous_position();
                return Ok(Direct::Indirect);
            }
        }
    }
    // One byte past the chain catches a frame that does not fit even where the reader reports
    // only what it copied (the tap reports the frame's full length anyway).
    let mut overflow = [0u8; 1];
    let mut iovecs: SmallVec<[libc::iovec; 5]> = slices
        .iter()
        .map(|slice| libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        })
        .collect();
    iovecs.push(libc::iovec {
        iov_base: overflow.as_mut_ptr().cast(),
        iov_len: overflow.len(),
    });
    // SAFETY: each iovec but the last is a checked, device-writable range of mapped guest
    // memory (`mem` keeps it mapped for the call), which Rust code only reaches through
    // volatile accesses; the last is `overflow`, alive until the call returns.
    let read = unsafe { tap.read_into(&iovecs) };
    let len = match read {
        Ok(len) => len,
        Err(e) => {
            queue.go_to_previous_position();
            return Ok(if e.kind() == std::io::ErrorKind::WouldBlock {
                Direct::TapEmpty
            } else {
                Direct::TapFailed(e)
            });
        }
    };
    // Dirty after the write, so that a migration pass that clears the bits in between cannot
    // miss it.
    let mut left = len.min(buffer.capacity);
    for slice in &slices {
        let n = left.min(slice.len());
        slice.bitmap().mark_dirty(0, n);
        left -= n;
    }
    let drop = |queue: &mut Queue, why| {
        queue.go_to_previous_position();
        Ok(Direct::Dropped(why))
    };
    if len > buffer.capacity {
        return drop(queue, FrameDrop::TooBig);
    }
    if len < VNET_HDR_LEN {
        return drop(queue, FrameDrop::Runt);
    }
    let mut header = [0u8; VNET_HDR_LEN];
    if buffer.read_start(mem, &mut header).is_err() {
        return drop(queue, FrameDrop::Runt);
    }
    if let Err(why) = prepare_rx_header(&mut header, acked) {
        return drop(queue, why);
    }
    header[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
    if buffer.fill(mem, &header).is_err() {
        return drop(queue, FrameDrop::Runt);
    }
    batch.push(queue, mem, buffer.head(), len as u32)?;
    Ok(Direct::Delivered(len))
}

/// True when the driver has made at least one chain available that the device has not taken.
pub fn buffers_available(
    queue: &Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    if !queue.ready() {
        return Ok(false);
    }
    Ok(queue.avail_idx(mem, Ordering::Acquire)? != Wrapping(queue.next_avail()))
}

/// Asks the driver to notify the device when it adds any buffer, even while chains the device
/// could not use yet are still available (with EVENT_IDX, `avail_event` goes to the driver's
/// current index rather than to the device's position, which the driver has passed). Returns
/// true when buffers arrived meanwhile, so the caller tries again instead of waiting.
pub fn request_buffer_notification(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    if !queue.ready() {
        return Ok(false);
    }
    let resume_at = queue.next_avail();
    let avail = queue.avail_idx(mem, Ordering::Acquire)?;
    queue.set_next_avail(avail.0);
    let arrived = queue.enable_notification(mem);
    queue.set_next_avail(resume_at);
    arrived
}

/// Places `frame` (vnet header first) into the receive queue: one chain, or with `mergeable`
/// (MRG_RXBUF) as many as it needs, whose count goes into the header's `num_buffers`. Chains
/// are only consumed when the whole frame fits; malformed ones are returned empty (used length
/// 0, counted in `bad_buffers`), which the driver takes as a runt and recycles.
pub fn deliver_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    batch: &mut UsedBatch,
    bad_buffers: &mut u64,
) -> Result<Delivery, virtio_queue::Error> {
    loop {
        let buffers = match gather(queue, mem, frame.len(), mergeable, batch, bad_buffers)? {
            Ok(buffers) => buffers,
            Err(delivery) => return Ok(delivery),
        };
        let count = buffers.len() as u16;
        frame[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
        let mut rest: &[u8] = frame;
        let mut written: SmallVec<[u32; 4]> = SmallVec::new();
        for buffer in &buffers {
            match buffer.fill(mem, rest) {
                Ok(n) => {
                    written.push(n as u32);
                    rest = &rest[n..];
                }
                // Checked when parsed; only a change of guest memory gets here.
                Err(_) => break,
            }
        }
        if written.len() < buffers.len() {
            for buffer in &buffers {
                batch.push(queue, mem, buffer.head(), 0)?;
            }
            *bad_buffers += u64::from(count);
            continue;
        }
        for (buffer, &len) in buffers.iter().zip(written.iter()) {
            batch.push(queue, mem, buffer.head(), len)?;
        }
        return Ok(Delivery::Delivered(count));
    }
}

/// Takes chains until they hold `len` bytes (or one chain without `mergeable`). When that is
/// not possible yet, puts every chain back and says what to do with the frame instead.
fn gather(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    len: usize,
    mergeable: bool,
    batch: &mut UsedBatch,
    bad_buffers: &mut u64,
) -> Result<Result<Buffers, Delivery>, virtio_queue::Error> {
    let mut gathered = Buffers::new();
    let mut room = 0usize;
    let mut descriptors = 0usize;
    while room < len {
        let Some(chain) = next_chain(queue, mem)? else {
            // Every descriptor is posted and the frame still does not fit: it never will.
            let ring_full = descriptors >= usize::from(queue.size());
            for _ in 0..gathered.len() {
                queue.go_to_previous_position();
            }
            return Ok(Err(if ring_full {
                Delivery::Dropped(FrameDrop::TooBig)
            } else {
                Delivery::NoBuffers
            }));
        };
        match RxBuffer::parse(chain, mem) {
            Ok(buffer) if !mergeable && buffer.capacity() < len => {
                // Without MRG_RXBUF a frame goes into one chain, and the driver sized its
                // chains for every frame it negotiated: this one is too big for it.
                queue.go_to_previous_position();
                return Ok(Err(Delivery::Dropped(FrameDrop::TooBig)));
            }
            Ok(buffer) => {
                room = room.saturating_add(buffer.capacity());
                descriptors += buffer.segments.len();
                gathered.push(buffer);
            }
            Err((head, why)) => {
                log::debug!("virtio-net: receive buffer {head} returned unused: {why}");
                // Chains already gathered cannot be put back past this one (the ring is
                // consumed in order), so they go back empty too.
                for buffer in gathered.drain(..) {
                    batch.push(queue, mem, buffer.head(), 0)?;
                    *bad_buffers += 1;
                }
                room = 0;
                descriptors = 0;
                batch.push(queue, mem, head, 0)?;
                *bad_buffers += 1;
            }
        }
    }
    Ok(Ok(gathered))
}

/// Used-ring entries written but not yet visible to the driver. [`UsedBatch::flush`] moves
/// `used.idx` once for all of them, so a frame spread over several buffers never shows up
/// half-written (the driver would drop it); [`UsedBatch::finish`] decides once, for everything
/// published since the batch began, whether the driver wants an interrupt.
#[derive(Debug, Default)]
pub struct UsedBatch {
    pending: u16,
    /// `next_used` when the first entry was published.
    start: Option<Wrapping<u16>>,
}

impl UsedBatch {
    /// Returns chain `head` to the driver with `len` bytes written, once the batch is flushed.
    pub fn push(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        let size = queue.size();
        if head >= size {
            // Only a driver that lied in its available ring gets here; such a head cannot be
            // returned, so the driver loses it.
            log::warn!("virtio-net: descriptor index {head} is outside the queue of {size}");
            return Ok(());
        }
        if self.pending == size {
            self.flush(queue, mem)?;
        }
        let slot = queue.next_used().wrapping_add(self.pending) % size;
        let addr = GuestAddress(queue.used_ring())
            .checked_add(VRING_USED_HEADER + VRING_USED_ELEM * u64::from(slot))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; VRING_USED_ELEM as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
        self.pending += 1;
        Ok(())
    }

    /// Publishes the entries written so far.
    pub fn flush(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<(), virtio_queue::Error> {
        if self.pending == 0 {
            return Ok(());
        }
        let old = Wrapping(queue.next_used());
        let new = old + Wrapping(self.pending);
        let idx_addr = GuestAddress(queue.used_ring())
            .checked_add(2)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        // Release: the entries are visible before the index that covers them.
        mem.store(new.0.to_le(), idx_addr, Ordering::Release)
            .map_err(virtio_queue::Error::GuestMemory)?;
        queue.set_next_used(new.0);
        self.pending = 0;
        self.start.get_or_insert(old);
        Ok(())
    }

    /// Publishes what is left; true when the driver asked to be interrupted for the entries.
    pub fn finish(
        mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, virtio_queue::Error> {
        self.flush(queue, mem)?;
        let Some(start) = self.start else {
            return Ok(false);
        };
        // The index must be visible before the driver's suppression state is read.
        fence(Ordering::SeqCst);
        driver_wants_interrupt(queue, mem, start, Wrapping(queue.next_used()))
    }
}

/// Whether publishing used entries `old..new` calls for an interrupt: with EVENT_IDX when
/// `used_event` lies in that range, otherwise unless the driver set NO_INTERRUPT.
fn driver_wants_interrupt(
    queue: &Queue,
    mem: &GuestMemoryMmap,
    old: Wrapping<u16>,
    new: Wrapping<u16>,
) -> Result<bool, virtio_queue::Error> {
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        let addr = avail
            .checked_add(VRING_AVAIL_HEADER + 2 * u64::from(queue.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let used_event: u16 = mem
            .load(addr, Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)?;
        let used_event = Wrapping(u16::from_le(used_event));
        Ok(new - used_event - Wrapping(1) < new - old)
    } else {
        let flags: u16 = mem
            .load(avail, Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)?;
        Ok(u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT == 0)
    }
}

#[cfg(test)]
mod tests;
