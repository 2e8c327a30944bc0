//! virtio-net: a host tap device as the guest's network card (Firecracker's
//! `network-interfaces`).
//!
//! Frames cross with a `virtio_net_hdr_v1` in front, which the tap reads and writes too, so
//! checksum and TCP segmentation offloads pass through; the tap's offloads follow what the
//! driver accepted. Both queues run on the VM's event loop. No frame is lost or reordered by
//! the device: a frame leaves the tap only when the guest has room for it (at most one is
//! read ahead), and a frame the tap cannot take yet stays in the transmit queue.
//! Under FT the output gate (`output_gate.rs`) holds transmitted frames on the host until their
//! epoch is acknowledged.

mod announce;
mod device;
mod event_handler;
pub mod frame;
mod moderation;
mod output_gate;
mod state;
mod tap;

pub use announce::{rarp_frame, Announcer};
pub use device::{Net, NetConfig, NetError, NetMetrics};
pub use frame::{MAX_FRAME_LEN, VNET_HDR_LEN};
pub use output_gate::{GateMode, MAX_HELD_BYTES, MAX_HELD_FRAMES};
pub use state::NetState;
pub use tap::{Tap, TapError};
