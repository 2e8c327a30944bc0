//! virtio-vsock packets (virtio 1.2 section 5.10.6): the 44-byte little-endian header, and how a
//! packet is read out of a TX descriptor chain or written into an RX one. The chains come from
//! the guest and are not trusted: every length and address is checked, and a packet never
//! costs more host memory than [`MAX_PAYLOAD`]. No eventfds here, so it is unit-tested on a mock
//! queue.

use std::ops::Deref;

use smallvec::SmallVec;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use crate::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HEADER_LEN: usize = 44;
/// The host's context id, fixed by the specification.
pub const HOST_CID: u64 = 2;
/// `type` of a stream socket, the only one this device offers.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload a packet may carry; Linux never sends more (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A packet's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Open a connection.
    Request = 1,
    /// Accept a connection.
    Response = 2,
    /// Refuse or abort a connection.
    Rst = 3,
    /// No more data in one or both directions.
    Shutdown = 4,
    /// Stream data.
    Rw = 5,
    /// The sender's receive buffer state, unasked.
    CreditUpdate = 6,
    /// Asks the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The operation with this wire value, if it is one.
    pub fn from_raw(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's context id.
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// Socket type (1 = stream).
    pub kind: u16,
    /// Operation (see [`Op`]); kept raw so that unknown values can be answered.
    pub op: u16,
    /// Shutdown flags, for [`Op::Shutdown`].
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, since the connection began.
    pub fwd_cnt: u32,
}

impl Header {
    /// The header as it goes on the wire.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes a header from the wire.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or([0; 2]));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The operation, if the value is a known one.
    pub fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }

    /// A reset answering this packet: addressed back to its sender, with nothing else set.
    pub fn rst_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            kind: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        }
    }
}

/// Why a TX chain was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxError {
    /// Not even a header could be read: the chain is dropped.
    NoHeader(&'static str),
    /// The header is readable but the packet is not valid: its sender gets a reset.
    Invalid {
        /// The header as read.
        header: Header,
        /// What is wrong.
        why: &'static str,
    },
}

/// Reads a packet from a TX chain (device-readable buffers; a device-writable one ends it).
/// The payload is copied into `payload` (cleared first) for [`Op::Rw`] packets only; other
/// operations carry none.
pub fn read_tx<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    payload: &mut Vec<u8>,
) -> Result<Header, TxError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    payload.clear();
    let mut raw = [0u8; HEADER_LEN];
    let mut have = 0usize;
    let mut header: Option<Header> = None;
    let mut wanted = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            break;
        }
        let mut addr = desc.addr();
        let mut left = desc.len() as usize;
        if header.is_none() {
            let n = left.min(HEADER_LEN - have);
            mem.read_slice(&mut raw[have..have + n], addr)
                .map_err(|_| TxError::NoHeader("header outside guest memory"))?;
            have += n;
            left -= n;
            addr = addr
                .checked_add(n as u64)
                .ok_or(TxError::NoHeader("buffer wraps around the address space"))?;
            if have < HEADER_LEN {
                continue;
            }
            let h = Header::from_bytes(&raw);
            header = Some(h);
            if h.op() != Some(Op::Rw) {
                return Ok(h);
            }
            if h.len as usize > MAX_PAYLOAD {
                return Err(TxError::Invalid {
                    header: h,
                    why: "payload larger than 64 KiB",
                });
            }
            wanted = h.len as usize;
            if wanted == 0 {
                return Ok(h);
            }
            payload.reserve(wanted);
        }
        let n = left.min(wanted - payload.len());
        if n == 0 {
            continue;
        }
        let start = payload.len();
        payload.resize(start + n, 0);
        if mem.read_slice(&mut payload[start..], addr).is_err() {
            // The header is known, so the sender can be told.
            payload.clear();
            return Err(TxError::Invalid {
                header: header.unwrap_or_default(),
                why: "payload outside guest memory",
            });
        }
        if payload.len() == wanted {
            break;
        }
    }
    match header {
        None => Err(TxError::NoHeader("chain shorter than a header")),
        Some(h) if payload.len() < h.len as usize => {
            payload.clear();
            Err(TxError::Invalid {
                header: h,
                why: "header length larger than the buffers",
            })
        }
        Some(h) => Ok(h),
    }
}

/// An RX chain checked for use: its device-writable buffers, all inside guest memory and
/// together at least a header long.
#[derive(Debug)]
pub struct RxBuffer {
    bufs: SmallVec<[(GuestAddress, usize); 4]>,
    room: usize,
}

impl RxBuffer {
    /// Checks `chain`'s writable buffers; a chain that cannot hold a header, or that points
    /// outside guest memory, is refused. Buffers past header + [`MAX_PAYLOAD`] are ignored.
    pub fn new<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
    ) -> Result<RxBuffer, &'static str>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut bufs = SmallVec::new();
        let mut room = 0usize;
        for desc in chain.writable() {
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
                return Err("buffer outside guest memory");
            }
            bufs.push((desc.addr(), len));
            room += len;
            if room >= HEADER_LEN + MAX_PAYLOAD {
                break;
            }
        }
        if room < HEADER_LEN {
            return Err("buffers shorter than a header");
        }
        Ok(RxBuffer { bufs, room })
    }

    /// Payload bytes that fit after the header.
    pub fn payload_room(&self) -> usize {
        (self.room - HEADER_LEN).min(MAX_PAYLOAD)
    }

    /// Writes `header` (its `len` set from `payload`) and `payload`; returns the used length.
    pub fn write(&self, header: &Header, payload: &[u8], mem: &GuestMemoryMmap) -> Option<u32> {
        let payload = &payload[..payload.len().min(self.payload_room())];
        let header = Header {
            len: payload.len() as u32,
            ..*header
        };
        let raw = header.to_bytes();
        let mut parts = [&raw[..], payload];
        for &(addr, len) in &self.bufs {
            let mut offset = 0usize;
            while offset < len {
                let Some(part) = parts.iter_mut().find(|p| !p.is_empty()) else {
                    break;
                };
                let n = part.len().min(len - offset);
                mem.write_slice(&part[..n], addr.checked_add(offset as u64)?)
                    .ok()?;
                *part = &part[n..];
                offset += n;
            }
        }
        Some((HEADER_LEN + payload.len()) as u32)
    }
}

/// Writes a 4-byte event (`struct virtio_vsock_event`) into an event-queue chain; returns the
/// used length, or None if the chain cannot hold it.
pub fn write_event<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap, id: u32) -> Option<u32>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let desc = chain.writable().find(|d| d.len() > 0)?;
    if desc.len() < 4 {
        return None;
    }
    mem.write_obj(id.to_le(), desc.addr()).ok()?;
    Some(4)
}

#[cfg(test)]
mod tests;
