//! virtio-blk requests: parsing a descriptor chain the guest wrote (untrusted) and carrying it
//! out against the disk. No eventfds here, so it is unit-tested on a mock queue.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use super::disk::{Disk, DiskError, SECTOR_SIZE};
use crate::GuestMemoryMmap;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status byte: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status byte: I/O error (also for malformed requests and writes to read-only drives).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status byte: unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Largest data transfer one request may ask for.
const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// `struct virtio_blk_outhdr`.
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: plain integers with no padding; any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the guest.
    In,
    /// Write guest data to sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the drive's id string.
    GetId,
    /// Anything else (answered UNSUPP).
    Unsupported(u32),
}

/// A parsed request whose status byte the device can write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// First sector.
    pub sector: u64,
    /// Data buffers in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// A problem found while parsing: the request is answered with this status untouched.
    pub early_status: Option<u8>,
}

/// A chain so malformed that not even a status byte can be written: it is returned to the
/// guest as used with length 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswerable(pub &'static str);

/// Per-request outcome counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Status written.
    pub status: u8,
    /// Bytes the device wrote into guest memory (data and status), the used length.
    pub used_len: u32,
    /// Bytes read from the disk.
    pub bytes_read: u64,
    /// Bytes written to the disk.
    pub bytes_written: u64,
}

impl Request {
    /// Parses a chain: header (device-readable, 16 bytes), data buffers, status (device-writable,
    /// last). Direction, size and range errors become an IOERR status, not a refusal to answer.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        capacity_sectors: u64,
    ) -> Result<Request, Unanswerable>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let descs: Vec<Descriptor> = chain.collect();
        let status_desc = descs.last().ok_or(Unanswerable("empty descriptor chain"))?;
        if !status_desc.is_write_only() || status_desc.len() < 1 {
            return Err(Unanswerable(
                "last descriptor is not a device-writable status byte",
            ));
        }
        let status = status_desc.addr();
        if mem.check_address(status).is_none() {
            return Err(Unanswerable("status byte outside guest memory"));
        }
        let mut req = Request {
            kind: RequestKind::Unsupported(u32::MAX),
            sector: 0,
            data: Vec::new(),
            status,
            early_status: None,
        };
        let fail = |mut r: Request| {
            r.early_status = Some(VIRTIO_BLK_S_IOERR);
            Ok(r)
        };
        let header_desc = match descs.first() {
            Some(h) if descs.len() >= 2 => h,
            _ => return fail(req),
        };
        if header_desc.is_write_only()
            || (header_desc.len() as usize) < std::mem::size_of::<RequestHeader>()
        {
            return fail(req);
        }
        let Ok(header) = mem.read_obj::<RequestHeader>(header_desc.addr()) else {
            return fail(req);
        };
        req.sector = header.sector;
        req.kind = match header.kind {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            other => RequestKind::Unsupported(other),
        };
        let data = &descs[1..descs.len() - 1];
        req.data = data.iter().map(|d| (d.addr(), d.len())).collect();
        let device_writes = match req.kind {
            RequestKind::In | RequestKind::GetId => true,
            RequestKind::Out => false,
            RequestKind::Flush | RequestKind::Unsupported(_) => return Ok(req),
        };
        if data.iter().any(|d| d.is_write_only() != device_writes) {
            return fail(req);
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        match req.kind {
            RequestKind::GetId if total < ID_BYTES as u64 => fail(req),
            RequestKind::In | RequestKind::Out => {
                let end = req
                    .sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|s| s.checked_add(total));
                let in_range = end.is_some_and(|e| e <= capacity_sectors * SECTOR_SIZE);
                if !total.is_multiple_of(SECTOR_SIZE) || total > MAX_REQUEST_BYTES || !in_range {
                    fail(req)
                } else {
                    Ok(req)
                }
            }
            _ => Ok(req),
        }
    }

    /// The bytes of the image a write request may change (offset, length), for write tracking;
    /// `None` for other requests and for writes refused while parsing. A write that fails
    /// still counts: part of it may have reached the image. A request kind added later that
    /// changes the image (discard, write-zeroes) must be covered here too, or FT loses it.
    pub fn written_range(&self) -> Option<(u64, u64)> {
        if self.kind != RequestKind::Out || self.early_status.is_some() {
            return None;
        }
        let len = self.data.iter().map(|&(_, len)| u64::from(len)).sum();
        Some((self.sector.saturating_mul(SECTOR_SIZE), len))
    }

    /// Carries the request out and writes its status byte.
    pub fn execute(&self, disk: &Disk, id: &[u8; ID_BYTES], mem: &GuestMemoryMmap) -> Outcome {
        let mut outcome = Outcome::default();
        let status = match self.early_status {
            Some(s) => s,
            None => match self.kind {
                RequestKind::In => match disk.read_into(mem, self.sector * SECTOR_SIZE, &self.data)
                {
                    Ok(n) => {
                        outcome.bytes_read = n as u64;
                        outcome.used_len = n as u32;
                        VIRTIO_BLK_S_OK
                    }
                    Err(e) => io_error("read", self.sector, &e),
                },
                RequestKind::Out if disk.read_only() => VIRTIO_BLK_S_IOERR,
                RequestKind::Out => {
                    match disk.write_from(mem, self.sector * SECTOR_SIZE, &self.data) {
                        Ok(n) => {
                            outcome.bytes_written = n as u64;
                            VIRTIO_BLK_S_OK
                        }
                        Err(e) => io_error("write", self.sector, &e),
                    }
                }
                RequestKind::Flush => match disk.flush() {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(e) => io_error("flush", 0, &DiskError::Io(e)),
                },
                RequestKind::GetId => match write_id(mem, &self.data, id) {
                    Some(n) => {
                        outcome.used_len = n;
                        VIRTIO_BLK_S_OK
                    }
                    None => VIRTIO_BLK_S_IOERR,
                },
                RequestKind::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            },
        };
        if mem.write_obj(status, self.status).is_ok() {
            outcome.used_len += 1;
        }
        outcome.status = status;
        outcome
    }
}

fn io_error(op: &str, sector: u64, e: &DiskError) -> u8 {
    match e {
        // The host's storage failed: worth an operator's attention.
        DiskError::Io(_) => log::warn!("virtio-blk: {op} at sector {sector} failed: {e}"),
        // The guest's own doing; not logged above debug so a guest cannot flood the log.
        DiskError::BadBuffer { .. } | DiskError::Short { .. } => {
            log::debug!("virtio-blk: {op} at sector {sector} refused: {e}")
        }
    }
    VIRTIO_BLK_S_IOERR
}

/// Copies the id into the first buffers; returns the bytes written.
fn write_id(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, u32)],
    id: &[u8; ID_BYTES],
) -> Option<u32> {
    let mut rest: &[u8] = id;
    for &(addr, len) in bufs {
        let n = rest.len().min(len as usize);
        mem.write_slice(&rest[..n], addr).ok()?;
        rest = &rest[n..];
        if rest.is_empty() {
            break;
        }
    }
    Some(ID_BYTES as u32)
}

#[cfg(test)]
mod tests;
