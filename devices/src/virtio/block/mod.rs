//! virtio-blk: a disk image as a guest block device.

mod device;
mod disk;
mod event_handler;
pub mod replica;
pub mod request;

pub use device::{Block, BlockConfig, BlockMetrics, BlockState};
pub use disk::{CacheType, Disk, SECTOR_SIZE};
pub use replica::{EpochBlocks, FullCopy, ReplicaError, ReplicaWriter, WriteTracker};
pub use request::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
