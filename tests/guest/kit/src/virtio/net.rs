//! virtio-net (device type 1, section 5.1): the MAC from the configuration space, one receive and
//! one transmit queue, every frame preceded by the 12-byte `virtio_net_hdr_v1`. Receive buffers are
//! kept posted (one 2 KiB buffer per descriptor, no mergeable buffers); transmit buffers are
//! slots named by their head descriptor. Checksum offload is used when negotiated: transmitted
//! frames may carry NEEDS_CSUM, and received ones may arrive with NEEDS_CSUM or DATA_VALID.

use super::mmio::{InitError, Transport};
use super::queue::{Seg, Virtqueue};
use super::{Completion, Waiter};
use crate::frames::{DmaBuf, Frames};

/// Feature bits (section 5.1.3).
pub mod feature {
    /// The device completes partial checksums of transmitted frames.
    pub const CSUM: u64 = 1 << 0;
    /// The driver accepts received frames with partial checksums.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The configuration space holds the MAC address.
    pub const MAC: u64 = 1 << 5;
}

/// Length of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Largest Ethernet frame (without FCS) for a 1500-byte MTU.
pub const FRAME_MAX: usize = 1514;
/// Header flag: the checksum at `csum_start + csum_offset` still has to be completed.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// Header flag: the device checked the checksum.
pub const HDR_F_DATA_VALID: u8 = 2;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const BUFFER: u64 = 2048;

/// A received frame, owned by the driver until [`Net::recycle`] gives its buffer back.
#[derive(Debug)]
pub struct RxFrame {
    addr: u64,
    len: usize,
}

impl RxFrame {
    /// The header's flags (NEEDS_CSUM, DATA_VALID).
    pub fn flags(&self) -> u8 {
        self.bytes()[0]
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the buffer is RAM the driver allocated; the device returned it (the used entry
        // was read with acquire ordering) and gets it back only through `recycle`, which consumes
        // this frame.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// The Ethernet frame after the virtio header.
    pub fn frame(&self) -> &[u8] {
        &self.bytes()[HDR_LEN..]
    }
}

/// A free transmit slot, to fill and hand to [`Net::transmit`].
#[derive(Debug)]
pub struct TxSlot {
    head: u16,
    addr: u64,
}

impl TxSlot {
    /// Room for one Ethernet frame.
    pub fn frame_mut(&mut self) -> &mut [u8] {
        // SAFETY: the slot belongs to a free descriptor, so no request covers it; the buffer is
        // RAM the driver allocated, `BUFFER` bytes per slot, and `&mut self` is exclusive.
        unsafe {
            core::slice::from_raw_parts_mut((self.addr + HDR_LEN as u64) as *mut u8, FRAME_MAX)
        }
    }
}

/// Where the device should complete a checksum: offsets from the start of the Ethernet frame.
#[derive(Clone, Copy, Debug)]
pub struct ChecksumOffload {
    /// Start of the checksummed bytes.
    pub start: u16,
    /// Offset of the checksum field from `start`.
    pub offset: u16,
}

/// A virtio-net device.
pub struct Net {
    transport: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    rx_buffers: DmaBuf,
    tx_buffers: DmaBuf,
    /// Negotiated features.
    pub features: u64,
    /// The MAC address (from the configuration space, or a fixed local one without VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    completion: Completion,
    rx_unkicked: u16,
}

impl Net {
    const WANTED: u64 = feature::CSUM | feature::GUEST_CSUM | feature::MAC;

    /// Negotiates, allocates both queues and their buffers, posts every receive buffer and makes
    /// the device live.
    pub fn probe(
        transport: Transport,
        frames: &mut Frames,
        completion: Completion,
    ) -> Result<Self, InitError> {
        let features = transport.begin(Self::WANTED)?;
        let event_idx = features & super::mmio::feature::RING_EVENT_IDX != 0;
        let rx = Virtqueue::new(frames, RX_QUEUE, transport.queue_max(RX_QUEUE), event_idx)
            .ok_or(InitError::QueueUnavailable)?;
        let tx = Virtqueue::new(frames, TX_QUEUE, transport.queue_max(TX_QUEUE), event_idx)
            .ok_or(InitError::QueueUnavailable)?;
        let rx_buffers = frames
            .alloc((BUFFER * u64::from(rx.size())) as usize)
            .ok_or(InitError::OutOfMemory)?;
        let tx_buffers = frames
            .alloc((BUFFER * u64::from(tx.size())) as usize)
            .ok_or(InitError::OutOfMemory)?;
        let mut net = Net {
            transport,
            rx,
            tx,
            rx_buffers,
            tx_buffers,
            features,
            mac: [0x52, 0x54, 0x00, 0x4c, 0x4b, 0x53],
            completion,
            rx_unkicked: 0,
        };
        net.activate();
        Ok(net)
    }

    /// Brings the device up again after a reset, reusing the memory.
    pub fn reinit(&mut self) -> Result<(), InitError> {
        self.features = self.transport.begin(Self::WANTED)?;
        if self.transport.queue_max(RX_QUEUE) < self.rx.size()
            || self.transport.queue_max(TX_QUEUE) < self.tx.size()
        {
            return Err(InitError::QueueUnavailable);
        }
        self.activate();
        Ok(())
    }

    fn activate(&mut self) {
        if self.features & feature::MAC != 0 {
            self.mac = self.transport.config::<6>(0);
        }
        self.rx.clear();
        self.tx.clear();
        self.rx.attach(&self.transport);
        self.tx.attach(&self.transport);
        for i in 0..u64::from(self.rx.size()) {
            let buffer = self.rx_buffers.addr() + i * BUFFER;
            self.rx.add(&[Seg::write(buffer, BUFFER as u32)]);
        }
        self.completion.prepare(&mut self.rx);
        // Transmit completions are reclaimed when slots are needed; they never need an interrupt.
        self.tx.disable_interrupts();
        self.transport.driver_ok();
        self.rx.notify(&self.transport);
        self.rx_unkicked = 0;
    }

    /// Whether transmitted frames may leave checksums to the device.
    pub fn tx_checksum_offload(&self) -> bool {
        self.features & feature::CSUM != 0
    }

    /// The transport (for the hostile tests and interrupt set-up).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The transmit queue (for the hostile tests).
    pub fn tx_queue_mut(&mut self) -> &mut Virtqueue {
        &mut self.tx
    }

    /// Switches between polled and interrupt-driven reception.
    pub fn set_completion(&mut self, completion: Completion) {
        self.completion = completion;
        completion.prepare(&mut self.rx);
    }

    /// How receptions are waited for.
    pub fn completion(&self) -> Completion {
        self.completion
    }

    /// Takes the next received frame, if any.
    pub fn recv(&mut self) -> Option<RxFrame> {
        loop {
            let used = self.rx.pop()?;
            let len = used.len as usize;
            if (HDR_LEN..=BUFFER as usize).contains(&len) {
                return Some(RxFrame {
                    addr: used.addr,
                    len,
                });
            }
            // A length the device should never report: drop the frame, keep the buffer.
            self.rx.add(&[Seg::write(used.addr, BUFFER as u32)]);
            self.rx_unkicked += 1;
        }
    }

    /// Gives a received frame's buffer back to the device (published now, notified in batches:
    /// see [`Net::flush_rx`]).
    pub fn recycle(&mut self, frame: RxFrame) {
        self.rx.add(&[Seg::write(frame.addr, BUFFER as u32)]);
        self.rx.publish();
        self.rx_unkicked += 1;
        if self.rx_unkicked >= self.rx.size() / 4 {
            self.flush_rx();
        }
    }

    /// Notifies the device of recycled receive buffers, if it wants to know.
    pub fn flush_rx(&mut self) {
        if self.rx_unkicked != 0 {
            self.rx.kick(&self.transport);
            self.rx_unkicked = 0;
        }
    }

    /// Before the CPU sleeps: with interrupt-driven reception, asks the device to interrupt on the
    /// next frame and acknowledges InterruptStatus. Returns true if frames are already waiting
    /// (then the caller must not sleep) or reception is polled (then it cannot).
    pub fn arm_rx_interrupt(&mut self) -> bool {
        self.flush_rx();
        if self.completion == Completion::Poll {
            return true;
        }
        self.rx.enable_interrupts();
        self.transport.ack_interrupt();
        self.rx.has_used()
    }

    /// Waits (bounded by `waiter`) until a frame has arrived; false on timeout.
    pub fn wait_rx(&mut self, waiter: &Waiter) -> bool {
        self.flush_rx();
        waiter.wait(&self.transport, &mut self.rx, self.completion)
    }

    fn reclaim_tx(&mut self) {
        while self.tx.pop().is_some() {}
    }

    /// A free transmit slot; when all are in flight, notifies the device and waits (bounded by
    /// `waiter`) for one to complete.
    pub fn tx_slot(&mut self, waiter: &Waiter) -> Option<TxSlot> {
        self.reclaim_tx();
        while self.tx.peek_head().is_none() {
            self.tx.kick(&self.transport);
            if !waiter.wait(&self.transport, &mut self.tx, Completion::Poll) {
                return None;
            }
            self.reclaim_tx();
        }
        let head = self.tx.peek_head()?;
        Some(TxSlot {
            head,
            addr: self.tx_buffers.addr() + BUFFER * u64::from(head),
        })
    }

    /// Queues the first `len` bytes of `slot`'s frame, with a checksum for the device to complete
    /// if `offload` is given; notifies the device now if `kick`, else at a later kick. `slot` must
    /// be the one [`Net::tx_slot`] returned last.
    pub fn transmit(
        &mut self,
        slot: TxSlot,
        len: usize,
        offload: Option<ChecksumOffload>,
        kick: bool,
    ) {
        let mut header = [0u8; HDR_LEN];
        if let Some(offload) = offload {
            header[0] = HDR_F_NEEDS_CSUM;
            header[6..8].copy_from_slice(&offload.start.to_le_bytes());
            header[8..10].copy_from_slice(&offload.offset.to_le_bytes());
        }
        crate::phys::write_bytes(slot.addr, &header);
        let len = len.min(FRAME_MAX) + HDR_LEN;
        let head = self.tx.add(&[Seg::read(slot.addr, len as u32)]);
        debug_assert_eq!(head, Some(slot.head));
        if kick {
            self.tx.kick(&self.transport);
        }
    }

    /// Notifies the device of queued frames, if it wants to know.
    pub fn flush_tx(&mut self) {
        self.tx.kick(&self.transport);
    }

    /// Waits (bounded) until every queued frame has been sent.
    pub fn drain_tx(&mut self, waiter: &Waiter) -> bool {
        self.flush_tx();
        loop {
            self.reclaim_tx();
            if self.tx.in_flight() == 0 {
                return true;
            }
            if !waiter.wait(&self.transport, &mut self.tx, Completion::Poll) {
                return false;
            }
        }
    }
}
