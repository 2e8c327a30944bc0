//! What a snapshot keeps of the vsock device. Connections are not kept: their host sockets
//! belong to programs of the old host. After a restore the guest gets a TRANSPORT_RESET event
//! and drops its connections, as on Firecracker.

use serde::{Deserialize, Serialize};

use crate::virtio::DeviceBaseState;

/// Saved state of the vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Features and queues.
    pub base: DeviceBaseState,
    /// The context id the guest saw in the configuration space.
    pub guest_cid: u64,
}
