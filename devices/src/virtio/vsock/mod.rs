//! virtio-vsock: stream sockets between guest and host, with the host side on Unix sockets in
//! Firecracker's convention.
//!
//! - A host program connects to `uds_path` and writes `CONNECT <port>\n`; the device opens a
//!   stream to the guest's port, answers `OK <host port>\n` once the guest accepts, then relays
//!   bytes both ways. A guest refusal closes the host connection.
//! - A guest connection to the host (CID 2) port P goes to the program listening on
//!   `<uds_path>_<P>`; with nobody there the guest gets a RST.
//!
//! `packet` reads and writes the wire format on descriptor chains, `connection` holds one
//! stream's state machine and credit accounting, `unix_backend` the connection table and host
//! sockets, `device` the queues, and `event_handler` the event-loop wiring.

mod connection;
mod device;
mod event_handler;
mod packet;
mod state;
mod unix_backend;

pub use connection::TX_BUF_SIZE;
pub use device::{Vsock, VsockConfig, VsockError, VsockMetrics};
pub use state::{VsockConnPhase, VsockConnState, VsockState};
pub use unix_backend::MAX_CONNECTIONS;

#[cfg(test)]
mod tests;
