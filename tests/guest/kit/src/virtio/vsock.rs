//! virtio-vsock (device type 19, section 5.10): the guest CID from the configuration space, and
//! packets on three queues: rx (0), tx (1) and event (2). Every packet starts with the 44-byte
//! little-endian `virtio_vsock_hdr`; receive chains are a 44-byte header buffer then a 4 KiB data
//! buffer, transmit chains a header then the data, if any (the layout every device accepts). The
//! stream protocol on top (connections, credit) is in `crate::workload::vsock`.

use super::mmio::{InitError, Transport};
use super::queue::{Seg, Virtqueue};
use super::{Completion, Waiter};
use crate::frames::{DmaBuf, Frames};
use crate::phys::load;

/// Length of `virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Largest payload of one packet the kit sends or accepts.
pub const DATA_MAX: usize = 4096;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `type` of a stream socket.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or reset.
    pub const RST: u16 = 3;
    /// No more receiving (flag 1) and/or sending (flag 2).
    pub const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub const RW: u16 = 5;
    /// Here is my credit.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Tell me your credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
/// Per-chain slot: the header at 0, the data at 64.
const SLOT: u64 = 64 + DATA_MAX as u64;
const DATA_OFFSET: u64 = 64;
const EVENT_SIZE: u64 = 8;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// `virtio_vsock_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (1 = stream).
    pub kind: u16,
    /// Operation (see [`op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN's).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl Header {
    /// The wire form.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.kind.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }

    /// Reads a header from guest memory.
    fn load(addr: u64) -> Self {
        Header {
            src_cid: load(addr),
            dst_cid: load(addr + 8),
            src_port: load(addr + 16),
            dst_port: load(addr + 20),
            len: load(addr + 24),
            kind: load(addr + 28),
            op: load(addr + 30),
            flags: load(addr + 32),
            buf_alloc: load(addr + 36),
            fwd_cnt: load(addr + 40),
        }
    }
}

/// A received packet, owned by the driver until [`Vsock::recycle`].
#[derive(Debug)]
pub struct Packet {
    /// Its header.
    pub header: Header,
    slot: u64,
    data_len: usize,
}

impl Packet {
    /// The payload (at most [`DATA_MAX`] bytes; `header.len` beyond what arrived is cut).
    pub fn data(&self) -> &[u8] {
        // SAFETY: the slot is RAM the driver allocated; the device returned the chain (used entry
        // read with acquire ordering) and gets it back only through `recycle`, which consumes
        // this packet.
        unsafe {
            core::slice::from_raw_parts((self.slot + DATA_OFFSET) as *const u8, self.data_len)
        }
    }
}

/// A virtio-vsock device.
pub struct Vsock {
    transport: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    event: Virtqueue,
    rx_slots: DmaBuf,
    tx_slots: DmaBuf,
    event_buffers: DmaBuf,
    /// Negotiated features.
    pub features: u64,
    /// The guest's CID, from the configuration space.
    pub guest_cid: u64,
    /// Transport-reset events seen.
    pub resets: u32,
    completion: Completion,
}

impl Vsock {
    /// Negotiates, allocates the three queues and their buffers, posts receive and event buffers
    /// and makes the device live.
    pub fn probe(
        transport: Transport,
        frames: &mut Frames,
        completion: Completion,
    ) -> Result<Self, InitError> {
        let features = transport.begin(0)?;
        let event_idx = features & super::mmio::feature::RING_EVENT_IDX != 0;
        let mut queue = |index| {
            Virtqueue::new(frames, index, transport.queue_max(index), event_idx)
                .ok_or(InitError::QueueUnavailable)
        };
        let rx = queue(RX_QUEUE)?;
        let tx = queue(TX_QUEUE)?;
        let event = queue(EVENT_QUEUE)?;
        let mut buffers = |bytes: u64| frames.alloc(bytes as usize).ok_or(InitError::OutOfMemory);
        let rx_slots = buffers(SLOT * u64::from(rx.size()))?;
        let tx_slots = buffers(SLOT * u64::from(tx.size()))?;
        let event_buffers = buffers(EVENT_SIZE * u64::from(event.size()))?;
        let mut vsock = Vsock {
            transport,
            rx,
            tx,
            event,
            rx_slots,
            tx_slots,
            event_buffers,
            features,
            guest_cid: 0,
            resets: 0,
            completion,
        };
        vsock.activate();
        Ok(vsock)
    }

    /// Brings the device up again after a reset, reusing the memory.
    pub fn reinit(&mut self) -> Result<(), InitError> {
        self.features = self.transport.begin(0)?;
        let sizes = [
            (RX_QUEUE, self.rx.size()),
            (TX_QUEUE, self.tx.size()),
            (EVENT_QUEUE, self.event.size()),
        ];
        if sizes
            .iter()
            .any(|(index, size)| self.transport.queue_max(*index) < *size)
        {
            return Err(InitError::QueueUnavailable);
        }
        self.activate();
        Ok(())
    }

    fn activate(&mut self) {
        self.guest_cid = u64::from_le_bytes(self.transport.config::<8>(0));
        for queue in [&mut self.rx, &mut self.tx, &mut self.event] {
            queue.clear();
            queue.attach(&self.transport);
        }
        for i in 0..u64::from(self.rx.size() / 2) {
            let slot = self.rx_slots.addr() + i * SLOT;
            self.rx.add(&rx_chain(slot));
        }
        for i in 0..u64::from(self.event.size()) {
            let buffer = self.event_buffers.addr() + i * EVENT_SIZE;
            self.event.add(&[Seg::write(buffer, EVENT_SIZE as u32)]);
        }
        self.completion.prepare(&mut self.rx);
        self.event.disable_interrupts();
        self.tx.disable_interrupts();
        self.transport.driver_ok();
        self.rx.notify(&self.transport);
        self.event.notify(&self.transport);
    }

    /// The transport (for the hostile tests and interrupt set-up).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The transmit queue (for the hostile tests).
    pub fn tx_queue_mut(&mut self) -> &mut Virtqueue {
        &mut self.tx
    }

    /// Handles pending events: a transport reset drops every connection and re-reads the CID.
    /// Returns whether one happened.
    fn poll_events(&mut self) -> bool {
        let mut reset = false;
        while let Some(used) = self.event.pop() {
            if used.len >= 4 && load::<u32>(used.addr) == EVENT_TRANSPORT_RESET {
                reset = true;
            }
            self.event.add(&[Seg::write(used.addr, EVENT_SIZE as u32)]);
        }
        if reset {
            self.resets += 1;
            self.guest_cid = u64::from_le_bytes(self.transport.config::<8>(0));
            self.event.kick(&self.transport);
        }
        reset
    }

    /// Takes the next received packet, if any (after handling pending events).
    pub fn recv(&mut self) -> Option<Packet> {
        self.poll_events();
        let used = self.rx.pop()?;
        let header = Header::load(used.addr);
        let arrived = (used.len as usize).saturating_sub(HDR_LEN);
        let data_len = (header.len as usize).min(arrived).min(DATA_MAX);
        Some(Packet {
            header,
            slot: used.addr,
            data_len,
        })
    }

    /// Gives a received packet's buffers back to the device.
    pub fn recycle(&mut self, packet: Packet) {
        self.rx.add(&rx_chain(packet.slot));
        self.rx.kick(&self.transport);
    }

    /// Waits (bounded by `waiter`) until a packet has arrived; false on timeout.
    pub fn wait_rx(&mut self, waiter: &Waiter) -> bool {
        waiter.wait(&self.transport, &mut self.rx, self.completion)
    }

    /// Sends one packet: `header` (its `len` is set from `data`) and up to [`DATA_MAX`] bytes of
    /// data. Waits (bounded by `waiter`) for a free slot; false if none came.
    pub fn send(&mut self, header: &Header, data: &[u8], waiter: &Waiter) -> bool {
        let data = &data[..data.len().min(DATA_MAX)];
        loop {
            while self.tx.pop().is_some() {}
            if self.tx.num_free() >= 2 {
                break;
            }
            self.tx.kick(&self.transport);
            if !waiter.wait(&self.transport, &mut self.tx, Completion::Poll) {
                return false;
            }
        }
        let Some(head) = self.tx.peek_head() else {
            return false;
        };
        let slot = self.tx_slots.addr() + SLOT * u64::from(head);
        let mut header = *header;
        header.len = data.len() as u32;
        crate::phys::write_bytes(slot, &header.encode());
        crate::phys::write_bytes(slot + DATA_OFFSET, data);
        let header_seg = Seg::read(slot, HDR_LEN as u32);
        let added = if data.is_empty() {
            self.tx.add(&[header_seg])
        } else {
            self.tx
                .add(&[header_seg, Seg::read(slot + DATA_OFFSET, data.len() as u32)])
        };
        self.tx.kick(&self.transport);
        added.is_some()
    }

    /// Waits (bounded by `waiter`) until the device has taken every packet sent.
    pub fn drain_tx(&mut self, waiter: &Waiter) -> bool {
        loop {
            while self.tx.pop().is_some() {}
            if self.tx.in_flight() == 0 {
                return true;
            }
            if !waiter.wait(&self.transport, &mut self.tx, Completion::Poll) {
                return false;
            }
        }
    }
}

/// The two buffers of a receive chain in `slot`.
fn rx_chain(slot: u64) -> [Seg; 2] {
    [
        Seg::write(slot, HDR_LEN as u32),
        Seg::write(slot + DATA_OFFSET, DATA_MAX as u32),
    ]
}
