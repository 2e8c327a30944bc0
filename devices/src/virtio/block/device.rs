//! The virtio-blk device: configuration space, features, saved state, and the queue loop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::disk::{CacheType, Disk};
use super::replica::{self, EpochBlocks, ReplicaError, WriteTracker};
use super::request::{Request, ID_BYTES, VIRTIO_BLK_S_OK};
use crate::virtio::device::read_config_bytes;
use crate::virtio::{
    types, ActivateError, DeviceBase, DeviceBaseState, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const QUEUE_SIZE: u16 = 256;
/// How long the device keeps looking for the next request once the queue runs dry (QEMU's
/// iothreads poll for up to 32 us for the same reason).
const POLL: std::time::Duration = std::time::Duration::from_micros(50);
/// Data segments per request the driver may use (the chain also holds header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// How a drive is set up (from the `drives` config section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The drive's id; also what GET_ID returns (first 20 bytes).
    pub drive_id: String,
    /// The host file.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
    /// Flush behaviour.
    pub cache: CacheType,
}

/// Counters of one drive.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Read requests completed.
    pub reads: AtomicU64,
    /// Write requests completed.
    pub writes: AtomicU64,
    /// Flush requests completed.
    pub flushes: AtomicU64,
    /// Bytes read from the image.
    pub bytes_read: AtomicU64,
    /// Bytes written to the image.
    pub bytes_written: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Chains too malformed to answer.
    pub dropped: AtomicU64,
}

crate::impl_counters!(BlockMetrics {
    reads,
    writes,
    flushes,
    bytes_read,
    bytes_written,
    errors,
    dropped
});

/// Everything the guest can observe of a drive, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Features and queues.
    pub base: DeviceBaseState,
    /// The drive's id.
    pub drive_id: String,
    /// Capacity the guest saw, in sectors.
    pub sectors: u64,
    /// Whether the guest saw a read-only drive.
    pub read_only: bool,
}

/// A virtio-blk device.
pub struct Block {
    base: DeviceBase,
    disk: Disk,
    drive_id: String,
    id: [u8; ID_BYTES],
    config_space: Vec<u8>,
    metrics: Arc<BlockMetrics>,
    /// Blocks written since the FT core last took them; `None` (no cost) unless it asked.
    tracker: Option<WriteTracker>,
}

impl Block {
    /// Opens the drive's file and builds the device.
    pub fn new(config: &BlockConfig, interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Block> {
        let disk = Disk::open(&config.path, config.read_only, config.cache)?;
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_BLK_F_SEG_MAX;
        if config.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        if config.cache == CacheType::Writeback {
            features |= VIRTIO_BLK_F_FLUSH;
        }
        let mut id = [0u8; ID_BYTES];
        let n = config.drive_id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&config.drive_id.as_bytes()[..n]);
        // virtio_blk_config: capacity, size_max, seg_max.
        let mut config_space = Vec::with_capacity(16);
        config_space.extend_from_slice(&disk.sectors().to_le_bytes());
        config_space.extend_from_slice(&0u32.to_le_bytes());
        config_space.extend_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Block {
            base: DeviceBase::new(features, &[QUEUE_SIZE], interrupt)?,
            disk,
            drive_id: config.drive_id.clone(),
            id,
            config_space,
            metrics: Arc::new(BlockMetrics::default()),
            tracker: None,
        })
    }

    /// The drive's id.
    pub fn drive_id(&self) -> &str {
        &self.drive_id
    }

    /// The drive's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Makes every completed write durable (see [`Disk::sync_for_handover`]); requests are
    /// served whole on the event loop, so a paused VM has none half-done.
    pub fn sync_for_handover(&self) -> std::io::Result<()> {
        self.disk.sync_for_handover()
    }

    /// Starts recording which 4 KiB blocks guest writes touch (a bitmap sized from the image),
    /// or stops and drops the record. Starting again keeps what is recorded; a read-only drive
    /// has nothing to record.
    pub fn track_writes(&mut self, on: bool) {
        if !on {
            self.tracker = None;
        } else if self.tracker.is_none() && !self.disk.read_only() {
            self.tracker = Some(WriteTracker::new(self.disk.size()));
        }
    }

    /// The blocks written since the last call (ascending), cleared; none when not tracking.
    pub fn take_written(&mut self) -> Vec<u64> {
        self.tracker
            .as_mut()
            .map_or_else(Vec::new, WriteTracker::take)
    }

    /// Reads `blocks` of the image into `out` (see [`replica::read_blocks`]).
    pub fn read_blocks(&self, blocks: &[u64], out: &mut EpochBlocks) -> Result<(), ReplicaError> {
        replica::read_blocks(self.disk.file(), self.disk.size(), blocks, out)
    }

    /// Serves every request the driver has made available.
    pub fn process_queue(&mut self) {
        let (disk, id, metrics, drive_id) = (&self.disk, &self.id, &self.metrics, &self.drive_id);
        let tracker = &mut self.tracker;
        let sectors = disk.sectors();
        self.base.serve_queue_polling(0, POLL, |chain, mem| {
            match Request::parse(chain, mem, sectors) {
                Ok(req) => {
                    let outcome = req.execute(disk, id, mem);
                    if let (Some(tracker), Some((offset, len))) =
                        (tracker.as_mut(), req.written_range())
                    {
                        tracker.mark(offset, len);
                    }
                    record(
                        metrics,
                        &req,
                        outcome.status,
                        outcome.bytes_read,
                        outcome.bytes_written,
                    );
                    outcome.used_len
                }
                Err(why) => {
                    log::debug!("virtio-blk {drive_id}: dropped a request: {}", why.0);
                    metrics.dropped.fetch_add(1, Ordering::Relaxed);
                    0
                }
            }
        });
    }

    /// The drive's guest-visible state.
    pub fn save_state(&self) -> BlockState {
        BlockState {
            base: self.base.save(),
            drive_id: self.drive_id.clone(),
            sectors: self.disk.sectors(),
            read_only: self.disk.read_only(),
        }
    }

    /// Restores a saved drive; the image must still have the size the guest saw.
    pub fn restore_state(
        &mut self,
        state: &BlockState,
        mem: GuestMemoryMmap,
    ) -> Result<(), ActivateError> {
        if state.sectors != self.disk.sectors() || state.read_only != self.disk.read_only() {
            return Err(ActivateError::BadState(format!(
                "drive {}: saved with {} sectors{}, the image now has {}{}",
                state.drive_id,
                state.sectors,
                if state.read_only { " read-only" } else { "" },
                self.disk.sectors(),
                if self.disk.read_only() {
                    " read-only"
                } else {
                    ""
                },
            )));
        }
        self.base.restore(&state.base, mem)
    }
}

fn record(m: &BlockMetrics, req: &Request, status: u8, bytes_read: u64, bytes_written: u64) {
    use super::request::RequestKind;
    if status != VIRTIO_BLK_S_OK {
        m.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let counter = match req.kind {
        RequestKind::In => &m.reads,
        RequestKind::Out => &m.writes,
        RequestKind::Flush => &m.flushes,
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    m.bytes_read.fetch_add(bytes_read, Ordering::Relaxed);
    m.bytes_written.fetch_add(bytes_written, Ordering::Relaxed);
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        types::BLOCK
    }

    fn base(&self) -> &DeviceBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    fn block(read_only: bool) -> (TempFile, Block) {
        let image = TempFile::new().unwrap();
        image.as_file().write_all(&[0u8; 8192]).unwrap();
        let config = BlockConfig {
            drive_id: "disk0".into(),
            path: image.as_path().to_owned(),
            read_only,
            cache: CacheType::Writeback,
        };
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        (image, Block::new(&config, irq).unwrap())
    }

    #[test]
    fn features_and_config_space() {
        let (_i, b) = block(true);
        let f = b.base().avail_features();
        assert_ne!(f & VIRTIO_BLK_F_RO, 0);
        assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        let mut capacity = [0u8; 8];
        b.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 16);
        let mut seg_max = [0u8; 4];
        b.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
    }

    /// Activates `b` on the mock queue's rings.
    fn activate_on(b: &mut Block, vq: &MockSplitQueue<GuestMemoryMmap>, mem: &GuestMemoryMmap) {
        let q = &mut b.base_mut().queues_mut()[0];
        q.set_size(16);
        let addr = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = addr(vq.desc_table_addr());
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = addr(vq.avail_addr());
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = addr(vq.used_addr());
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        b.base_mut().set_acked_features(VIRTIO_F_VERSION_1);
        b.activate(mem.clone()).unwrap();
    }

    /// Makes a write of `len` bytes at `sector` available at descriptor `first`, then lets the
    /// device serve it; returns the status byte.
    fn write(
        b: &mut Block,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        first: u16,
        sector: u64,
        len: u32,
    ) -> u8 {
        const HDR: u64 = 0x1_0000;
        const DATA: u64 = 0x2_0000;
        const STATUS: u64 = 0x3_0000;
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HDR)).unwrap();
        mem.write_slice(&vec![0x5c; len as usize], GuestAddress(DATA))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let d =
            |addr, len, flags, next| RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        vq.add_desc_chains(
            &[
                d(HDR, 16, 1, first + 1),
                d(DATA, len, 1, first + 2),
                d(STATUS, 1, 2, 0),
            ],
            first,
        )
        .unwrap();
        b.process_queue();
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn a_served_write_marks_its_blocks_when_tracking() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let (image, mut b) = block(false);
        activate_on(&mut b, &vq, &mem);
        assert_eq!(write(&mut b, &vq, &mem, 0, 0, 512), VIRTIO_BLK_S_OK);
        assert!(b.take_written().is_empty(), "off by default");

        b.track_writes(true);
        // Sector 7, two sectors: bytes 3584..4608, across blocks 0 and 1.
        assert_eq!(write(&mut b, &vq, &mem, 3, 7, 1024), VIRTIO_BLK_S_OK);
        assert_eq!(b.take_written(), vec![0, 1]);
        assert!(b.take_written().is_empty(), "take clears");
        assert_eq!(write(&mut b, &vq, &mem, 6, 9, 512), VIRTIO_BLK_S_OK);
        b.track_writes(true);
        assert_eq!(b.take_written(), vec![1], "starting again keeps the record");

        let mut epoch = EpochBlocks::new();
        b.read_blocks(&[1], &mut epoch).unwrap();
        let on_disk = std::fs::read(image.as_path()).unwrap();
        let (block, data) = epoch.iter().next().unwrap();
        assert_eq!((block, data), (1, &on_disk[4096..8192]));
        assert_eq!(&data[9 * 512 - 4096..10 * 512 - 4096], &[0x5c; 512]);

        b.track_writes(false);
        assert_eq!(write(&mut b, &vq, &mem, 9, 0, 512), VIRTIO_BLK_S_OK);
        assert!(b.take_written().is_empty(), "off again");
    }

    #[test]
    fn state_round_trips_and_checks_the_image() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (_i, mut b) = block(false);
        {
            let q = &mut b.base_mut().queues_mut()[0];
            q.set_size(16);
            q.set_desc_table_address(Some(0x1000), Some(0));
            q.set_avail_ring_address(Some(0x2000), Some(0));
            q.set_used_ring_address(Some(0x3000), Some(0));
            q.set_ready(true);
            q.set_next_avail(7);
            q.set_next_used(5);
        }
        b.base_mut()
            .set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX);
        b.activate(mem.clone()).unwrap();
        let saved = b.save_state();
        let text = serde_json::to_string(&saved).unwrap();
        let saved: BlockState = serde_json::from_str(&text).unwrap();

        let (_i2, mut other) = block(false);
        other.restore_state(&saved, mem.clone()).unwrap();
        assert_eq!(other.save_state(), saved);
        assert!(other.base().is_activated());
        assert_eq!(other.base().queues()[0].next_avail(), 7);

        let (_i3, mut read_only) = block(true);
        assert!(
            read_only.restore_state(&saved, mem).is_err(),
            "a drive that became read-only"
        );
    }
}
