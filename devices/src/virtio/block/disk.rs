//! The disk behind a virtio-blk device: a host file, read and written straight into and out of
//! guest memory with vectored I/O.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::GuestMemoryMmap;

/// Bytes per sector in the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// When the device makes guest writes durable (Firecracker's `cache_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests are acknowledged without reaching the disk (no VIRTIO_BLK_F_FLUSH).
    #[default]
    Unsafe,
    /// The device offers VIRTIO_BLK_F_FLUSH and a flush reaches the disk (fdatasync).
    Writeback,
}

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A buffer is not inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BadBuffer {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The host I/O failed.
    #[error("host I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The file ended before the request did.
    #[error("short transfer: {done} of {wanted} bytes")]
    Short {
        /// Bytes moved.
        done: usize,
        /// Bytes asked for.
        wanted: usize,
    },
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    read_only: bool,
    cache: CacheType,
    size: u64,
}

impl Disk {
    /// Opens the image at `path`, read-only or read-write.
    pub fn open(path: &Path, read_only: bool, cache: CacheType) -> std::io::Result<Disk> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(Disk {
            file,
            read_only,
            cache,
            size,
        })
    }

    /// Capacity in sectors (a partial last sector is not exposed).
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The open image, for reading replicated blocks back.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Whether guest writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Makes completed writes durable when the cache mode asks for it.
    pub fn flush(&self) -> std::io::Result<()> {
        match self.cache {
            CacheType::Unsafe => Ok(()),
            CacheType::Writeback => self.file.sync_data(),
        }
    }

    /// Makes every completed write durable whatever the cache mode: before another host opens
    /// the same image (live migration's switch), the data must be on the storage they share.
    pub fn sync_for_handover(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Host iovecs for guest buffers; every buffer must lie inside one memory region.
    fn iovecs(
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, u32)],
        write_to_guest: bool,
    ) -> Result<Vec<libc::iovec>, DiskError> {
        bufs.iter()
            .filter(|&&(_, len)| len > 0)
            .map(|&(addr, len)| {
                let slice = mem
                    .get_slice(addr, len as usize)
                    .map_err(|_| DiskError::BadBuffer { addr: addr.0, len })?;
                if write_to_guest {
                    // The device writes these bytes: record them for dirty-page tracking.
                    slice.bitmap().mark_dirty(0, slice.len());
                }
                Ok(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                })
            })
            .collect()
    }

    /// Reads from the image at byte `offset` into guest buffers.
    pub fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        bufs: &[(GuestAddress, u32)],
    ) -> Result<usize, DiskError> {
        let iov = Self::iovecs(mem, bufs, true)?;
        self.transfer(iov, offset, |fd, iov, cnt, off| {
            // SAFETY: every iovec points into guest memory that stays mapped while the device
            // holds `mem`, with the length vm-memory checked.
            unsafe { libc::preadv(fd, iov, cnt, off) }
        })
    }

    /// Writes guest buffers to the image at byte `offset`.
    pub fn write_from(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        bufs: &[(GuestAddress, u32)],
    ) -> Result<usize, DiskError> {
        let iov = Self::iovecs(mem, bufs, false)?;
        self.transfer(iov, offset, |fd, iov, cnt, off| {
            // SAFETY: as for `read_into`; the kernel only reads the buffers here.
            unsafe { libc::pwritev(fd, iov, cnt, off) }
        })
    }

    /// Runs a vectored transfer to completion, resuming after short transfers.
    fn transfer(
        &self,
        mut iov: Vec<libc::iovec>,
        offset: u64,
        op: impl Fn(i32, *const libc::iovec, i32, i64) -> isize,
    ) -> Result<usize, DiskError> {
        let wanted: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut done = 0usize;
        let mut first = 0usize;
        while first < iov.len() {
            let count = (iov.len() - first).min(libc::UIO_MAXIOV as usize) as i32;
            let n = op(
                self.file.as_raw_fd(),
                iov[first..].as_ptr(),
                count,
                (offset + done as u64) as i64,
            );
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err.into());
            }
            if n == 0 {
                return Err(DiskError::Short { done, wanted });
            }
            let mut n = n as usize;
            done += n;
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same buffer, `n` < its length.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(done)
    }
}
