//! virtio-blk (device type 2, section 5.2): capacity and limits from the configuration space, and
//! requests (read, write, flush, get-id) built as header / data segments / status chains, many in
//! flight at once. Each request's 16-byte header and status byte live in a slot named by its head
//! descriptor.

use super::mmio::{InitError, Transport};
use super::queue::{Seg, Virtqueue};
use super::{Completion, Waiter};
use crate::frames::{DmaBuf, Frames};
use crate::phys::{load, store};

/// Feature bits (section 5.2.3).
pub mod feature {
    /// `size_max` is valid: the largest data segment.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid: the most data segments per request.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Flush requests are supported.
    pub const FLUSH: u64 = 1 << 9;
}

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush the write cache.
pub const T_FLUSH: u32 = 4;
/// Read the 20-byte device ID string.
pub const T_GET_ID: u32 = 8;

/// Bytes per sector, whatever `blk_size` says.
pub const SECTOR: u64 = 512;
/// Length of the ID string.
pub const ID_LEN: usize = 20;

const SLOT: u64 = 32;
const STATUS_OFFSET: u64 = 16;
/// Status the driver writes before submitting, so an unanswered request is recognisable.
const STATUS_UNSET: u8 = 0xff;
/// Data segments per request the kit uses at most (besides header and status).
const MAX_SEGMENTS: usize = 16;
/// Largest data segment when the device sets no limit.
const DEFAULT_SEGMENT: u32 = 1 << 20;

/// A request's completion status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// VIRTIO_BLK_S_OK.
    Ok,
    /// VIRTIO_BLK_S_IOERR.
    IoErr,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupported,
    /// The device left the status byte untouched.
    Unset,
    /// Any other value.
    Other(u8),
    /// The request did not fit in the queue (too many segments or no free descriptors).
    NotQueued,
    /// No completion before the deadline.
    Timeout,
}

impl Status {
    /// The status a device wrote (0xff: the driver's "not written" mark).
    pub fn from_byte(byte: u8) -> Self {
        match byte {
            0 => Status::Ok,
            1 => Status::IoErr,
            2 => Status::Unsupported,
            STATUS_UNSET => Status::Unset,
            other => Status::Other(other),
        }
    }

    /// The name used in result lines (`status=<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::IoErr => "ioerr",
            Status::Unsupported => "unsupp",
            Status::Unset => "unset",
            Status::Other(_) => "other",
            Status::NotQueued => "not-queued",
            Status::Timeout => "timeout",
        }
    }
}

/// A virtio-blk device.
pub struct Blk {
    transport: Transport,
    queue: Virtqueue,
    slots: DmaBuf,
    /// Negotiated features.
    pub features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size (512 unless the device says otherwise).
    pub blk_size: u32,
    segment_max: u32,
    segments: usize,
    completion: Completion,
}

impl Blk {
    const WANTED: u64 =
        feature::SIZE_MAX | feature::SEG_MAX | feature::RO | feature::BLK_SIZE | feature::FLUSH;

    /// Negotiates, allocates the request queue and slots, and makes the device live.
    pub fn probe(
        transport: Transport,
        frames: &mut Frames,
        completion: Completion,
    ) -> Result<Self, InitError> {
        let features = transport.begin(Self::WANTED)?;
        let queue = Virtqueue::new(
            frames,
            0,
            transport.queue_max(0),
            features & super::mmio::feature::RING_EVENT_IDX != 0,
        )
        .ok_or(InitError::QueueUnavailable)?;
        let slots = frames
            .alloc((SLOT * u64::from(queue.size())) as usize)
            .ok_or(InitError::OutOfMemory)?;
        let mut blk = Blk {
            transport,
            queue,
            slots,
            features,
            capacity: 0,
            blk_size: SECTOR as u32,
            segment_max: DEFAULT_SEGMENT,
            segments: MAX_SEGMENTS,
            completion,
        };
        blk.activate();
        Ok(blk)
    }

    /// Brings the device up again after a reset, reusing the memory.
    pub fn reinit(&mut self) -> Result<(), InitError> {
        self.features = self.transport.begin(Self::WANTED)?;
        if self.transport.queue_max(0) < self.queue.size() {
            return Err(InitError::QueueUnavailable);
        }
        self.activate();
        Ok(())
    }

    fn activate(&mut self) {
        let config = self.transport.config::<24>(0);
        let word = |at: usize| {
            u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]])
        };
        self.capacity = u64::from(word(0)) | (u64::from(word(4)) << 32);
        if self.features & feature::SIZE_MAX != 0 && word(8) != 0 {
            self.segment_max = word(8).min(DEFAULT_SEGMENT);
        }
        if self.features & feature::SEG_MAX != 0 && word(12) != 0 {
            self.segments = (word(12) as usize).min(MAX_SEGMENTS);
        }
        if self.features & feature::BLK_SIZE != 0 && word(20) != 0 {
            self.blk_size = word(20);
        }
        self.queue.clear();
        self.queue.attach(&self.transport);
        self.completion.prepare(&mut self.queue);
        self.transport.driver_ok();
    }

    /// Switches between polled and interrupt-driven completion (benchmarks poll).
    pub fn set_completion(&mut self, completion: Completion) {
        self.completion = completion;
        completion.prepare(&mut self.queue);
    }

    /// How completions are waited for.
    pub fn completion(&self) -> Completion {
        self.completion
    }

    /// Whether the device said it is read-only.
    pub fn read_only(&self) -> bool {
        self.features & feature::RO != 0
    }

    /// Whether flush requests were negotiated.
    pub fn has_flush(&self) -> bool {
        self.features & feature::FLUSH != 0
    }

    /// The transport (for the hostile tests).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The request queue (for the hostile tests).
    pub fn queue_mut(&mut self) -> &mut Virtqueue {
        &mut self.queue
    }

    /// Most requests that fit in the queue at once with `bytes` of data each.
    pub fn max_in_flight(&self, bytes: u64) -> usize {
        let per_request = 2 + self.segments_for(bytes);
        usize::from(self.queue.size()) / per_request
    }

    fn segments_for(&self, bytes: u64) -> usize {
        (bytes.div_ceil(u64::from(self.segment_max)) as usize).max(1)
    }

    /// Largest data length one request may carry (bounded by the segment limits).
    pub fn max_request_bytes(&self) -> u64 {
        u64::from(self.segment_max) * self.segments as u64
    }

    /// Queues a request of type `kind` at `sector` with data `addr..addr + len` (written by the
    /// device for reads and get-id); returns its head, or `None` if the queue is full or the data
    /// needs too many segments. Nothing reaches the device before [`Blk::kick`].
    pub fn submit(&mut self, kind: u32, sector: u64, addr: u64, len: u64) -> Option<u16> {
        let device_writes = matches!(kind, T_IN | T_GET_ID);
        let head = self.queue.peek_head()?;
        let slot = self.slots.addr() + SLOT * u64::from(head);
        store(slot, kind);
        store(slot + 4, 0u32);
        store(slot + 8, sector);
        store(slot + STATUS_OFFSET, STATUS_UNSET);

        let mut segs = [Seg::read(0, 0); MAX_SEGMENTS + 2];
        segs[0] = Seg::read(slot, STATUS_OFFSET as u32);
        let mut count = 1;
        let mut at = 0;
        while at < len {
            if count > self.segments {
                return None;
            }
            let chunk = (len - at).min(u64::from(self.segment_max)) as u32;
            segs[count] = Seg {
                addr: addr + at,
                len: chunk,
                write: device_writes,
            };
            count += 1;
            at += u64::from(chunk);
        }
        segs[count] = Seg::write(slot + STATUS_OFFSET, 1);
        let added = self.queue.add(&segs[..=count])?;
        debug_assert_eq!(added, head);
        Some(head)
    }

    /// Publishes queued requests and notifies the device if it wants to be told.
    pub fn kick(&mut self) {
        self.queue.kick(&self.transport);
    }

    /// Takes one completed request: its head and status.
    pub fn poll(&mut self) -> Option<(u16, Status)> {
        let used = self.queue.pop()?;
        let slot = self.slots.addr() + SLOT * u64::from(used.id);
        Some((used.id, Status::from_byte(load(slot + STATUS_OFFSET))))
    }

    /// Waits (bounded by `waiter`) until a request completes.
    pub fn wait(&mut self, waiter: &Waiter) -> Option<(u16, Status)> {
        loop {
            if let Some(done) = self.poll() {
                return Some(done);
            }
            if !waiter.wait(&self.transport, &mut self.queue, self.completion) {
                return None;
            }
        }
    }

    /// Runs one request to completion (waiting at most `timeout_ms`).
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        addr: u64,
        len: u64,
        timeout_ms: u64,
    ) -> Status {
        let Some(head) = self.submit(kind, sector, addr, len) else {
            return Status::NotQueued;
        };
        self.kick();
        let waiter = Waiter::new(timeout_ms);
        loop {
            match self.wait(&waiter) {
                Some((id, status)) if id == head => return status,
                Some(_) => continue,
                None => return Status::Timeout,
            }
        }
    }
}
