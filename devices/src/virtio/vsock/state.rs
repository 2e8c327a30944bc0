//! What a snapshot keeps of the vsock device. Connections are not kept: their host sockets
//! belong to programs of the old host. After a restore the guest gets a TRANSPORT_RESET event
//! and drops its connections, as on Firecracker. A same-host migration alone carries them, as
//! [`VsockConnState`]s beside their host sockets (outside the state file, whose format is
//! unchanged), and the destination adopts them without a reset.

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

/// Where a handed-over connection is in its life (see the connection's state machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VsockConnPhase {
    /// Host-initiated: our REQUEST waits for an RX buffer (`sent` false) or for the RESPONSE.
    Requesting {
        /// The REQUEST went to the guest.
        sent: bool,
    },
    /// Guest-initiated: our RESPONSE waits for an RX buffer.
    Responding,
    /// Data flows.
    Established,
    /// We told the guest SHUTDOWN (both) and wait for its RST.
    Closing,
}

/// One open connection as a same-host migration hands it over, with its host socket passed
/// beside it (never in a snapshot file: snapshots reset connections). Everything the guest and
/// the host program have seen of it is here, and the guest bytes not yet written to the host
/// socket; nothing is held the other way (the host socket is read only into RX buffers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConnState {
    /// The host-side port.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    /// The connection's phase.
    pub phase: VsockConnPhase,
    /// The guest's receive buffer for this connection.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed of what we sent.
    pub peer_fwd_cnt: u32,
    /// Bytes we have sent the guest.
    pub rx_cnt: u32,
    /// Our `fwd_cnt` as the guest last heard it.
    pub fwd_cnt_told: u32,
    /// We asked for a credit update and have not heard back.
    pub credit_requested: bool,
    /// The guest should hear our `fwd_cnt` soon.
    pub update_wanted: bool,
    /// Bytes waiting for the host socket (our own preamble first, then guest bytes).
    pub tx_data: Vec<u8>,
    /// How many of `tx_data`'s first bytes are our preamble (the `OK <port>` line).
    pub tx_preamble: u32,
    /// Guest bytes that reached the host.
    pub tx_fwd_cnt: u32,
    /// The host end might have data.
    pub host_readable: bool,
    /// The host end sends nothing more.
    pub host_eof: bool,
    /// The host end takes nothing more.
    pub host_no_recv: bool,
    /// The host socket hung up.
    pub host_hup: bool,
    /// Directions shut down on the host socket.
    pub host_shut: u32,
    /// SHUTDOWN flags the guest sent.
    pub guest_shut: u32,
    /// SHUTDOWN flags we sent the guest.
    pub told_guest: u32,
    /// The next packet for the guest is a RST.
    pub reset_wanted: bool,
    /// Milliseconds left before the connection gives up waiting for the guest.
    pub deadline_ms: Option<u64>,
}
