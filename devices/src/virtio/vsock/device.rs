//! The virtio-vsock device: configuration space (the guest's context id), its three queues, and
//! saved state. Connections and their host sockets are the [`UnixBackend`]'s.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use event_manager::EventSet;
use thiserror::Error;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::packet::{read_tx, write_event, Op, RxBuffer, TxError, MAX_PAYLOAD};
use super::state::{VsockConnState, VsockState};
use super::unix_backend::UnixBackend;
use crate::virtio::device::{next_chain, nonblocking_timer, read_config_bytes};
use crate::virtio::{
    types, ActivateError, DeviceBase, VirtioDevice, VirtioInterrupt, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;
use std::os::unix::net::UnixStream;

/// Queue indexes (virtio 1.2 section 5.10.2).
pub const RX_QUEUE: usize = 0;
/// Packets from the guest.
pub const TX_QUEUE: usize = 1;
/// Events for the guest.
pub const EVENT_QUEUE: usize = 2;
const QUEUE_SIZE: u16 = 256;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// How the vsock device is set up (Firecracker's `vsock` config section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host programs connect to; `<uds_path>_<port>` is where guest
    /// connections to host port `<port>` go.
    pub uds_path: PathBuf,
}

/// Why the vsock device could not be built.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The context id is reserved (0-2) or does not fit the 32 bits guests use.
    #[error("guest_cid {0} is not usable: pick a value from 3 to 4294967294")]
    InvalidCid(u64),
    /// The host socket could not be created.
    #[error("cannot listen on {path}: {source} (remove a stale socket file first)")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd or timer could not be created.
    #[error("cannot create the device's event descriptors: {0}")]
    Io(#[source] std::io::Error),
}

/// Counters of the vsock device.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets taken from the TX queue.
    pub tx_packets: AtomicU64,
    /// Stream bytes the guest sent.
    pub tx_bytes: AtomicU64,
    /// Packets put on the RX queue.
    pub rx_packets: AtomicU64,
    /// Stream bytes the guest received.
    pub rx_bytes: AtomicU64,
    /// Connections set up (either direction).
    pub connections_opened: AtomicU64,
    /// Connections ended.
    pub connections_closed: AtomicU64,
    /// Connections refused: no host listener, a bad `CONNECT` line, or too many open.
    pub connections_refused: AtomicU64,
    /// RSTs sent to the guest.
    pub resets_sent: AtomicU64,
    /// Packets for connections that do not exist (answered with RST).
    pub unknown_connection: AtomicU64,
    /// Invalid packets and protocol violations (answered with RST).
    pub protocol_errors: AtomicU64,
    /// Chains too malformed to answer (no readable header, unusable RX buffers), dropped.
    pub malformed: AtomicU64,
    /// Events put on the event queue.
    pub events_sent: AtomicU64,
}

crate::impl_counters!(VsockMetrics {
    tx_packets,
    tx_bytes,
    rx_packets,
    rx_bytes,
    connections_opened,
    connections_closed,
    connections_refused,
    resets_sent,
    unknown_connection,
    protocol_errors,
    malformed,
    events_sent,
});

/// A virtio-vsock device whose host side is Unix sockets, in Firecracker's convention.
pub struct Vsock {
    pub(super) base: DeviceBase,
    guest_cid: u64,
    pub(super) backend: UnixBackend,
    metrics: Arc<VsockMetrics>,
    tx_payload: Vec<u8>,
    rx_scratch: Vec<u8>,
    reset_event_pending: bool,
    /// Signalled from the vCPU thread (reset, restore) so the event loop forgets closed sockets.
    pub(super) wake_evt: EventFd,
    pub(super) timer: TimerFd,
    pub(super) timer_deadline: Option<Instant>,
    /// Sockets the event loop watches, with what for.
    pub(super) watched: HashMap<RawFd, EventSet>,
    /// Connections a same-host migration handed over, for the next restore to adopt.
    handed_connections: Option<Vec<(VsockConnState, UnixStream)>>,
}

fn valid_cid(cid: u64) -> bool {
    (3..u64::from(u32::MAX)).contains(&cid)
}

impl Vsock {
    /// Another descriptor on the listener, and the flag that keeps its socket file when this
    /// device goes (see [`UnixBackend::hand_over`]).
    pub fn hand_over(
        &self,
    ) -> std::io::Result<(std::fs::File, Arc<std::sync::atomic::AtomicBool>)> {
        self.backend.hand_over()
    }

    /// The VM is this process's now (a same-host migration switched): the socket file it was
    /// handed goes with this device.
    pub fn own_socket_file(&self) {
        self.backend.own_socket_file();
    }

    /// Every open connection's state and another descriptor on its host socket, for a
    /// same-host migration to hand over (the VM is paused).
    pub fn hand_over_connections(&self) -> std::io::Result<Vec<(VsockConnState, UnixStream)>> {
        self.backend.hand_over_connections(Instant::now())
    }

    /// Connections another lockstep process handed over (a same-host migration): the next
    /// [`Vsock::restore_state`] adopts them instead of resetting the transport.
    pub fn use_handed_connections(&mut self, connections: Vec<(VsockConnState, UnixStream)>) {
        self.handed_connections = Some(connections);
    }

    /// Builds the device and starts listening on `config.uds_path`.
    pub fn new(config: &VsockConfig, interrupt: Arc<VirtioInterrupt>) -> Result<Vsock, VsockError> {
        Self::with_listener(config, None, interrupt)
    }

    /// Builds the device on `listener` when another lockstep process handed over its socket
    /// (checked to listen on `config.uds_path`), or listening afresh.
    pub fn with_listener(
        config: &VsockConfig,
        listener: Option<std::os::unix::net::UnixListener>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Vsock, VsockError> {
        if !valid_cid(config.guest_cid) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        let metrics = Arc::new(VsockMetrics::default());
        let (cid, path) = (config.guest_cid, &config.uds_path);
        let backend = match listener {
            Some(l) => UnixBackend::from_passed(l, path, cid, metrics.clone()),
            None => UnixBackend::bind(path, cid, metrics.clone()),
        }
        .map_err(|source| VsockError::Bind {
            path: config.uds_path.clone(),
            source,
        })?;
        let timer = nonblocking_timer().map_err(VsockError::Io)?;
        Ok(Vsock {
            base: DeviceBase::new(
                VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX,
                &[QUEUE_SIZE; 3],
                interrupt,
            )
            .map_err(VsockError::Io)?,
            guest_cid: config.guest_cid,
            backend,
            metrics,
            tx_payload: Vec::with_capacity(MAX_PAYLOAD),
            rx_scratch: vec![0; MAX_PAYLOAD],
            reset_event_pending: false,
            wake_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::Io)?,
            timer,
            timer_deadline: None,
            watched: HashMap::new(),
            handed_connections: None,
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Moves packets both ways until neither queue can make progress.
    pub fn process_queues(&mut self) {
        loop {
            let stalled = self.process_tx();
            self.process_rx();
            // TX stopped because RSTs were piling up; if RX buffers drained them, go on.
            if !stalled || self.backend.resets_full() {
                break;
            }
        }
        self.process_event_queue();
    }

    /// Takes every packet the guest sent; returns true if it stopped early because too many
    /// RSTs wait for RX buffers (the rest stay in the queue).
    fn process_tx(&mut self) -> bool {
        let Some(memory) = self.base.running_memory() else {
            return false;
        };
        let mem: &GuestMemoryMmap = &memory;
        if !self.base.queues()[TX_QUEUE].ready() {
            return false;
        }
        let mut used = false;
        let mut stalled = false;
        let Vsock {
            base,
            backend,
            metrics,
            tx_payload,
            ..
        } = self;
        let queue = &mut base.queues_mut()[TX_QUEUE];
        let mut broken = None;
        'rounds: loop {
            let _ = queue.disable_notification(mem);
            loop {
                let chain = match next_chain(queue, mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        broken = Some(format!("virtio-vsock TX: {e}"));
                        break 'rounds;
                    }
                };
                if backend.resets_full() {
                    queue.go_to_previous_position();
                    stalled = true;
                    break;
                }
                let head = chain.head_index();
                let packet = read_tx(chain, mem, tx_payload);
                if let Err(e) = queue.add_used(mem, head, 0) {
                    log::warn!("virtio-vsock: cannot return TX descriptor {head}: {e}");
                }
                used = true;
                metrics.tx_packets.fetch_add(1, Ordering::Relaxed);
                match packet {
                    Ok(h) => {
                        metrics
                            .tx_bytes
                            .fetch_add(tx_payload.len() as u64, Ordering::Relaxed);
                        backend.on_guest_packet(&h, tx_payload);
                    }
                    Err(TxError::NoHeader(why)) => {
                        log::debug!("virtio-vsock: dropped a TX chain: {why}");
                        metrics.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TxError::Invalid { header, why }) => backend.on_bad_packet(&header, why),
                }
            }
            match queue.enable_notification(mem) {
                Ok(true) if !stalled => continue,
                Ok(_) => break,
                Err(e) => {
                    broken = Some(format!("virtio-vsock TX: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = broken {
            self.base.mark_broken(&why);
            return false;
        }
        if used {
            self.base.notify_used(TX_QUEUE);
        }
        stalled
    }

    /// Fills RX buffers with whatever the connections have for the guest. Host sockets are
    /// read only here, into buffers the guest already gave, so without RX buffers nothing is
    /// read.
    fn process_rx(&mut self) {
        let Some(memory) = self.base.running_memory() else {
            return;
        };
        let mem: &GuestMemoryMmap = &memory;
        if !self.base.queues()[RX_QUEUE].ready() {
            return;
        }
        let now = Instant::now();
        let mut used = false;
        let Vsock {
            base,
            backend,
            metrics,
            rx_scratch,
            ..
        } = self;
        let queue = &mut base.queues_mut()[RX_QUEUE];
        let mut broken = None;
        while backend.has_rx_work() {
            let chain = match next_chain(queue, mem) {
                Ok(chain) => chain,
                Err(e) => {
                    broken = Some(format!("virtio-vsock RX: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else {
                // Ask the driver to notify when it adds buffers, unless it just did.
                match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        broken = Some(format!("virtio-vsock RX: {e}"));
                        break;
                    }
                }
            };
            let head = chain.head_index();
            let len = match RxBuffer::new(chain, mem) {
                Err(why) => {
                    log::debug!("virtio-vsock: dropped an RX chain: {why}");
                    metrics.malformed.fetch_add(1, Ordering::Relaxed);
                    0
                }
                Ok(buf) => match backend.next_packet(buf.payload_room(), rx_scratch, now) {
                    None => {
                        // Nothing after all (a socket had no data): keep the buffer.
                        queue.go_to_previous_position();
                        break;
                    }
                    Some(h) => {
                        let payload = &rx_scratch[..h.len as usize];
                        match buf.write(&h, payload, mem) {
                            Some(n) => {
                                metrics.rx_packets.fetch_add(1, Ordering::Relaxed);
                                metrics
                                    .rx_bytes
                                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                                if h.op == Op::Rst as u16 {
                                    metrics.resets_sent.fetch_add(1, Ordering::Relaxed);
                                }
                                n
                            }
                            None => {
                                log::warn!("virtio-vsock: RX buffer became unwritable");
                                metrics.malformed.fetch_add(1, Ordering::Relaxed);
                                0
                            }
                        }
                    }
                },
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                log::warn!("virtio-vsock: cannot return RX descriptor {head}: {e}");
            }
            used = true;
        }
        if let Some(why) = broken {
            self.base.mark_broken(&why);
            return;
        }
        if used {
            self.base.notify_used(RX_QUEUE);
        }
    }

    /// Delivers a pending TRANSPORT_RESET event.
    fn process_event_queue(&mut self) {
        if !self.reset_event_pending {
            return;
        }
        let Some(memory) = self.base.running_memory() else {
            return;
        };
        let mem: &GuestMemoryMmap = &memory;
        if !self.base.queues()[EVENT_QUEUE].ready() {
            return;
        }
        let mut used = false;
        let queue = &mut self.base.queues_mut()[EVENT_QUEUE];
        let mut broken = None;
        loop {
            let chain = match next_chain(queue, mem) {
                Ok(chain) => chain,
                Err(e) => {
                    broken = Some(format!("virtio-vsock events: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else {
                match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let len = write_event(chain, mem, EVENT_TRANSPORT_RESET);
            if let Err(e) = queue.add_used(mem, head, len.unwrap_or(0)) {
                log::warn!("virtio-vsock: cannot return event descriptor {head}: {e}");
            }
            used = true;
            if len.is_some() {
                self.reset_event_pending = false;
                self.metrics.events_sent.fetch_add(1, Ordering::Relaxed);
                break;
            }
            self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(why) = broken {
            self.base.mark_broken(&why);
            return;
        }
        if used {
            self.base.notify_used(EVENT_QUEUE);
        }
    }

    /// Forgets every connection (their host sockets close once the event loop drops them).
    fn drop_connections(&mut self) {
        self.backend.close_all();
        if let Err(e) = self.wake_evt.write(1) {
            log::warn!("virtio-vsock: cannot wake the event loop: {e}");
        }
    }

    /// The device's guest-visible state.
    pub fn save_state(&self) -> VsockState {
        VsockState {
            base: self.base.save(),
            guest_cid: self.guest_cid,
        }
    }

    /// Restores a saved state. Connections are not part of it: open ones are closed, and an
    /// active guest driver gets a TRANSPORT_RESET event so that it drops its own, unless a
    /// same-host migration handed them over ([`Vsock::use_handed_connections`]).
    pub fn restore_state(
        &mut self,
        state: &VsockState,
        mem: GuestMemoryMmap,
    ) -> Result<(), ActivateError> {
        if !valid_cid(state.guest_cid) {
            return Err(ActivateError::BadState(format!(
                "saved guest_cid {} is not usable",
                state.guest_cid
            )));
        }
        self.base.restore(&state.base, mem)?;
        if state.guest_cid != self.guest_cid {
            log::info!(
                "virtio-vsock: the snapshot's guest_cid {} replaces the configured {}",
                state.guest_cid,
                self.guest_cid
            );
        }
        self.guest_cid = state.guest_cid;
        self.backend.set_guest_cid(state.guest_cid);
        match self.handed_connections.take() {
            // A same-host migration: the connections go on, and the guest sees no reset.
            Some(handed) => {
                self.backend
                    .adopt_connections(handed, Instant::now())
                    .map_err(ActivateError::BadState)?;
                self.reset_event_pending = false;
                if let Err(e) = self.wake_evt.write(1) {
                    log::warn!("virtio-vsock: cannot wake the event loop: {e}");
                }
            }
            None => {
                self.drop_connections();
                self.reset_event_pending = state.base.activated;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        types::VSOCK
    }

    fn base(&self) -> &DeviceBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn reset(&mut self) {
        self.base.reset();
        self.reset_event_pending = false;
        self.drop_connections();
    }
}
