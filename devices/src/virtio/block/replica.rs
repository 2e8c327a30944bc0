//! Disk replication for FT pairing. Each host keeps its own copy of a drive's image, so the
//! primary tells the secondary what the guest wrote: [`WriteTracker`] records which 4 KiB blocks
//! guest writes touched, [`read_blocks`] reads them back for an epoch, [`FullCopy`] walks the
//! whole image (skipping holes) when a pair starts, and [`ReplicaWriter`] is the secondary's
//! side, which holds an epoch's blocks until the epoch commits.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The unit of write tracking and replication, in bytes.
pub const REPLICA_BLOCK_SIZE: u64 = 4096;

/// How much of the image one [`FullCopy`] item carries at most.
pub const FULL_COPY_CHUNK: usize = 1 << 20;

/// Why a replication step failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A block number lies past the end of the image.
    #[error("block {block} is past the end of the {size}-byte image")]
    BlockOutOfRange {
        /// The block asked for.
        block: u64,
        /// The image's size in bytes.
        size: u64,
    },
    /// A block's data is not as long as the image's block there (4 KiB, less for a short last
    /// block).
    #[error("block {block} came with {got} bytes; the image holds {want} bytes there")]
    BlockLength {
        /// The block.
        block: u64,
        /// Bytes received.
        got: usize,
        /// Bytes the image holds at that block.
        want: u64,
    },
    /// A full-copy chunk reaches past the end of the image.
    #[error("{len} bytes at offset {offset} reach past the end of the {size}-byte image")]
    RangeOutOfImage {
        /// Where the chunk starts.
        offset: u64,
        /// Its length.
        len: usize,
        /// The image's size in bytes.
        size: u64,
    },
    /// An epoch's blocks would take more memory than the caller allowed.
    #[error("the epoch's blocks exceed the {limit}-byte staging limit")]
    EpochTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The replica cannot start a full copy with an epoch half-staged.
    #[error("an epoch is staged: commit or discard it before starting a full copy")]
    EpochStaged,
    /// The image could not be opened.
    #[error("cannot open the image {path}: {source}")]
    Open {
        /// The image's path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Reading, writing or syncing the image failed.
    #[error("{op} of the image at offset {offset} failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// Where in the image.
        offset: u64,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ReplicaError {
    move |source| ReplicaError::Io { op, offset, source }
}

/// Bytes of the image at `block`: 4 KiB, less for a short last block; an error past the end.
fn block_len(block: u64, size: u64) -> Result<(u64, u64), ReplicaError> {
    block
        .checked_mul(REPLICA_BLOCK_SIZE)
        .filter(|&offset| offset < size)
        .map(|offset| (offset, (size - offset).min(REPLICA_BLOCK_SIZE)))
        .ok_or(ReplicaError::BlockOutOfRange { block, size })
}

/// Which 4 KiB blocks of an image the guest wrote since the last [`WriteTracker::take`]: one bit
/// per block, sized from the image, plus one bit per bitmap word so that taking a few blocks of
/// a large disk does not scan the whole bitmap.
#[derive(Debug)]
pub struct WriteTracker {
    blocks: u64,
    words: Vec<u64>,
    summary: Vec<u64>,
}

impl WriteTracker {
    /// A tracker with no block marked, for an image of `disk_size` bytes.
    pub fn new(disk_size: u64) -> WriteTracker {
        let blocks = disk_size.div_ceil(REPLICA_BLOCK_SIZE);
        let words = blocks.div_ceil(64);
        // Lossless: at most 2^46 words for a 2^64-byte image, and usize is 64 bits on x86_64.
        let words = words as usize;
        WriteTracker {
            blocks,
            words: vec![0; words],
            summary: vec![0; words.div_ceil(64)],
        }
    }

    /// Blocks of the image (the last one may be short).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks every block that bytes `offset..offset + len` touch; bytes past the image are
    /// ignored.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || self.blocks == 0 {
            return;
        }
        let first = offset / REPLICA_BLOCK_SIZE;
        if first >= self.blocks {
            return;
        }
        let last = (offset.saturating_add(len - 1) / REPLICA_BLOCK_SIZE).min(self.blocks - 1);
        let mut block = first;
        while block <= last {
            let word = (block / 64) as usize;
            let bit = block % 64;
            let count = (64 - bit).min(last - block + 1);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            self.words[word] |= mask;
            self.summary[word / 64] |= 1 << (word % 64);
            block += count;
        }
    }

    /// The marked blocks in ascending order; clears them.
    pub fn take(&mut self) -> Vec<u64> {
        let mut taken = Vec::new();
        for (s, summary) in self.summary.iter_mut().enumerate() {
            let mut words = std::mem::take(summary);
            while words != 0 {
                let word = s * 64 + words.trailing_zeros() as usize;
                words &= words - 1;
                let mut bits = std::mem::take(&mut self.words[word]);
                while bits != 0 {
                    taken.push(word as u64 * 64 + u64::from(bits.trailing_zeros()));
                    bits &= bits - 1;
                }
            }
        }
        taken
    }
}

/// Blocks read for an epoch: their numbers and their bytes back to back. Reused from epoch to
/// epoch so that reading does not allocate once the buffer has grown.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EpochBlocks {
    /// Block number, start in `data`, length (4 KiB, less for a short last block).
    blocks: Vec<(u64, usize, usize)>,
    data: Vec<u8>,
}

impl EpochBlocks {
    /// An empty set.
    pub fn new() -> EpochBlocks {
        EpochBlocks::default()
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes held in all.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Each block's number and bytes, in the order they were asked for.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.blocks
            .iter()
            .map(|&(block, start, len)| (block, &self.data[start..start + len]))
    }

    /// Drops the blocks, keeping the memory.
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.data.clear();
    }
}

/// Reads `blocks` of an image of `size` bytes into `out` (emptied first), one pread per run of
/// adjacent block numbers: this runs while the VM is paused. A block past the end is an error.
pub fn read_blocks(
    file: &File,
    size: u64,
    blocks: &[u64],
    out: &mut EpochBlocks,
) -> Result<(), ReplicaError> {
    out.clear();
    let mut rest = blocks;
    while let Some(&first) = rest.first() {
        let run = 1 + rest
            .windows(2)
            .take_while(|pair| pair[0].checked_add(1) == Some(pair[1]))
            .count();
        let last = rest[run - 1];
        let (offset, _) = block_len(first, size)?;
        let (last_offset, last_len) = block_len(last, size)?;
        let run_len = (last_offset + last_len - offset) as usize;
        let start = out.data.len();
        out.data.resize(start + run_len, 0);
        file.read_exact_at(&mut out.data[start..], offset)
            .map_err(io_error("read", offset))?;
        for (k, &block) in rest[..run].iter().enumerate() {
            let len = (size - block * REPLICA_BLOCK_SIZE).min(REPLICA_BLOCK_SIZE) as usize;
            let at = start + k * REPLICA_BLOCK_SIZE as usize;
            out.blocks.push((block, at, len));
        }
        rest = &rest[run..];
    }
    Ok(())
}

/// The whole image in chunks of at most [`FULL_COPY_CHUNK`] bytes, as (offset, bytes), for the
/// full sync that starts a pair. Holes are skipped (SEEK_DATA / SEEK_HOLE); where the file
/// system cannot tell, everything is read. Start write tracking before the copy: blocks the
/// guest writes meanwhile are sent afterwards.
#[derive(Debug)]
pub struct FullCopy {
    file: File,
    size: u64,
    chunk: usize,
    pos: u64,
    data_end: u64,
    seek_holes: bool,
}

impl FullCopy {
    /// Opens the image at `path` read-only.
    pub fn open(path: &Path) -> Result<FullCopy, ReplicaError> {
        let file = File::open(path).map_err(|source| ReplicaError::Open {
            path: path.to_owned(),
            source,
        })?;
        FullCopy::new(file, FULL_COPY_CHUNK)
    }

    /// Walks an open image in chunks of at most `chunk` bytes (at least one).
    pub fn new(file: File, chunk: usize) -> Result<FullCopy, ReplicaError> {
        let size = file.metadata().map_err(io_error("stat", 0))?.len();
        Ok(FullCopy {
            file,
            size,
            chunk: chunk.max(1),
            pos: 0,
            data_end: 0,
            seek_holes: true,
        })
    }

    /// The image's size, for the replica's [`ReplicaWriter::begin_full_copy`].
    pub fn size(&self) -> u64 {
        self.size
    }

    /// lseek with SEEK_DATA or SEEK_HOLE: `None` when there is no more data (ENXIO), and the
    /// fallback of reading everything when the file system does not support it.
    fn seek(&mut self, from: u64, whence: i32) -> Result<Option<u64>, ReplicaError> {
        let Ok(from_signed) = i64::try_from(from) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor this struct owns; it touches no memory.
        let at = unsafe { libc::lseek(self.file.as_raw_fd(), from_signed, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                self.seek_holes = false;
                Ok(Some(if whence == libc::SEEK_DATA {
                    from
                } else {
                    self.size
                }))
            }
            _ => Err(ReplicaError::Io {
                op: "seek",
                offset: from,
                source: err,
            }),
        }
    }

    /// Moves to the next run of data at or after `pos`; false when only holes are left.
    fn next_data(&mut self) -> Result<bool, ReplicaError> {
        if !self.seek_holes {
            self.data_end = self.size;
            return Ok(true);
        }
        let Some(start) = self.seek(self.pos, libc::SEEK_DATA)? else {
            return Ok(false);
        };
        let end = if self.seek_holes {
            self.seek(start, libc::SEEK_HOLE)?.unwrap_or(self.size)
        } else {
            self.size
        };
        self.pos = start;
        self.data_end = end.min(self.size);
        Ok(self.pos < self.data_end)
    }

    fn next_chunk(&mut self) -> Result<Option<(u64, Vec<u8>)>, ReplicaError> {
        if self.pos >= self.size {
            return Ok(None);
        }
        if self.pos >= self.data_end && !self.next_data()? {
            self.pos = self.size;
            return Ok(None);
        }
        let len = (self.data_end - self.pos).min(self.chunk as u64) as usize;
        let mut bytes = vec![0; len];
        self.file
            .read_exact_at(&mut bytes, self.pos)
            .map_err(io_error("read", self.pos))?;
        let offset = self.pos;
        self.pos += len as u64;
        Ok(Some((offset, bytes)))
    }
}

impl Iterator for FullCopy {
    type Item = Result<(u64, Vec<u8>), ReplicaError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_chunk() {
            Ok(chunk) => chunk.map(Ok),
            Err(e) => {
                // One error ends the walk.
                self.pos = self.size;
                Some(Err(e))
            }
        }
    }
}

/// The secondary's copy of a drive: an epoch's blocks are staged in memory (up to a limit) and
/// written only when the epoch commits, so a half-received epoch never reaches the image. Every
/// offset from the stream is checked against the image's size before anything is written.
#[derive(Debug)]
pub struct ReplicaWriter {
    file: File,
    size: u64,
    limit: usize,
    /// Block number and length; the bytes are back to back in `data`, in staging order.
    staged: Vec<(u64, usize)>,
    data: Vec<u8>,
}

impl ReplicaWriter {
    /// Opens the existing image at `path` read-write; an epoch may stage at most `limit` bytes
    /// (each block counted as 4 KiB).
    pub fn open(path: &Path, limit: usize) -> Result<ReplicaWriter, ReplicaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| ReplicaError::Open {
                path: path.to_owned(),
                source,
            })?;
        let size = file.metadata().map_err(io_error("stat", 0))?.len();
        Ok(ReplicaWriter {
            file,
            size,
            limit,
            staged: Vec::new(),
            data: Vec::new(),
        })
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks staged for the current epoch.
    pub fn staged_blocks(&self) -> usize {
        self.staged.len()
    }

    /// Holds `data` for `block` until [`ReplicaWriter::commit`]. The block must lie in the
    /// image and `data` be as long as the image's block there; past the limit the epoch is
    /// refused (the caller discards it) rather than grown.
    pub fn stage(&mut self, block: u64, data: &[u8]) -> Result<(), ReplicaError> {
        let (_, want) = block_len(block, self.size)?;
        if data.len() as u64 != want {
            return Err(ReplicaError::BlockLength {
                block,
                got: data.len(),
                want,
            });
        }
        // Every block counts as a whole one, so the entries stay bounded too (a stream could
        // send the short last block over and over).
        let charged = (self.staged.len() as u64 + 1).saturating_mul(REPLICA_BLOCK_SIZE);
        if charged > self.limit as u64 {
            return Err(ReplicaError::EpochTooLarge { limit: self.limit });
        }
        let needed = self.data.len() + data.len();
        if needed > self.data.capacity() {
            // Grow as a Vec would, but never past the limit.
            let target = (self.data.capacity() * 2).clamp(needed, self.limit);
            self.data.reserve_exact(target - self.data.len());
        }
        self.data.extend_from_slice(data);
        self.staged.push((block, data.len()));
        Ok(())
    }

    /// Drops the staged epoch without writing anything.
    pub fn discard(&mut self) {
        self.staged.clear();
        self.data.clear();
    }

    /// Writes the staged epoch (one pwrite per run of adjacent blocks staged in a row, in
    /// staging order, so a block staged twice ends with its later bytes), then fdatasyncs; also
    /// makes earlier [`ReplicaWriter::write_chunk`]s durable. Returns the blocks written. After
    /// an error the image holds part of the epoch: the replica can no longer be trusted.
    pub fn commit(&mut self) -> Result<usize, ReplicaError> {
        let written = self.staged.len();
        let result = self.write_staged();
        self.discard();
        result?;
        self.file.sync_data().map_err(io_error("fdatasync", 0))?;
        Ok(written)
    }

    fn write_staged(&self) -> Result<(), ReplicaError> {
        let mut start = 0usize;
        let mut i = 0usize;
        while i < self.staged.len() {
            let (first, _) = self.staged[i];
            let mut end = start;
            let mut j = i;
            while j < self.staged.len() && self.staged[j].0 == first + (j - i) as u64 {
                end += self.staged[j].1;
                j += 1;
            }
            let offset = first * REPLICA_BLOCK_SIZE;
            self.file
                .write_all_at(&self.data[start..end], offset)
                .map_err(io_error("write", offset))?;
            start = end;
            i = j;
        }
        Ok(())
    }

    /// Starts a full copy: empties the image and gives it the source's size, so that the holes
    /// the copy skips read as zeroes here too.
    pub fn begin_full_copy(&mut self, size: u64) -> Result<(), ReplicaError> {
        if !self.staged.is_empty() {
            return Err(ReplicaError::EpochStaged);
        }
        self.file.set_len(0).map_err(io_error("truncate", 0))?;
        self.file
            .set_len(size)
            .map_err(io_error("truncate", size))?;
        self.size = size;
        Ok(())
    }

    /// Writes one chunk of a full copy at once; it must lie inside the image.
    pub fn write_chunk(&mut self, offset: u64, bytes: &[u8]) -> Result<(), ReplicaError> {
        let inside = offset
            .checked_add(bytes.len() as u64)
            .is_some_and(|end| end <= self.size);
        if !inside {
            return Err(ReplicaError::RangeOutOfImage {
                offset,
                len: bytes.len(),
                size: self.size,
            });
        }
        self.file
            .write_all_at(bytes, offset)
            .map_err(io_error("write", offset))
    }
}

#[cfg(test)]
mod tests;
