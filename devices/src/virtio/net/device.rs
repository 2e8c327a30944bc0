//! The virtio-net device: features, configuration space and offloads, and the receive and
//! transmit loops that move frames between the tap and the queues.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::timerfd::TimerFd;

use super::frame::{
    buffers_available, deliver_frame, feature, next_chain, prepare_rx_header, receive_direct,
    request_buffer_notification, send_tx_frame, Delivery, Direct, FrameDrop, UsedBatch,
    MAX_FRAME_LEN, VNET_HDR_LEN,
};
use super::moderation::RxModeration;
use super::output_gate::OutputGate;
use super::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use crate::virtio::device::{more_within, nonblocking_timer, read_config_bytes};
use crate::virtio::{
    types, ActivateError, DeviceBase, VirtioDevice, VirtioInterrupt, INTERRUPT_USED_RING,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Frames (or chains) handled per event before the loop yields to the VM's other devices; the
/// device then rings its own doorbell to carry on.
pub(super) const BUDGET: usize = 256;
/// How long the transmit queue is polled for more frames after a burst before the device asks
/// the driver for a notification (as virtio-blk does). Reception does not poll: while it waits
/// for buffers, the vCPU that would post them needs the CPU more.
pub(super) const POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// Transmitted chains are returned to the driver in groups of this many during a burst.
pub(super) const TX_PUBLISH_EVERY: usize = 16;

/// Features every interface offers; VIRTIO_NET_F_MAC is added when the config sets a MAC.
/// UDP fragmentation (UFO) and ECN are left out: current kernels produce neither, and the
/// offer must not depend on the host, so a saved VM can resume elsewhere.
const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_RING_EVENT_IDX
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_STATUS);

/// How an interface is set up (one entry of the `network-interfaces` config section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface's id, for logs, metrics and the API.
    pub iface_id: String,
    /// The host tap device.
    pub host_dev_name: String,
    /// The MAC the guest sees; without one the guest driver picks a random MAC.
    pub guest_mac: Option<[u8; 6]>,
}

/// Why an interface could not be created.
#[derive(Debug, Error)]
pub enum NetError {
    /// The tap could not be opened or set up (the message names it).
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The device's queues or eventfds could not be created.
    #[error("network interface {iface_id}: cannot create its queues: {source}")]
    Queues {
        /// The interface.
        iface_id: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The receive moderation timer could not be created.
    #[error("network interface {iface_id}: cannot create its receive timer: {source}")]
    Timer {
        /// The interface.
        iface_id: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of one interface.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (Ethernet frames, without the vnet header).
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap that the guest could not take (too big, unaccepted offload,
    /// or pending at a reset).
    pub rx_drops: AtomicU64,
    /// Failed tap reads.
    pub rx_errors: AtomicU64,
    /// Malformed receive chains returned to the guest empty.
    pub rx_bad_buffers: AtomicU64,
    /// Times reception moved from the tap's wake-ups onto the moderation timer.
    pub rx_moderation_starts: AtomicU64,
    /// Frames delivered on the moderation timer's ticks (frames that arrived back to back).
    pub rx_moderated_frames: AtomicU64,
    /// Frames the guest sent to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes the guest sent (Ethernet frames, without the vnet header).
    pub tx_bytes: AtomicU64,
    /// Malformed transmit chains returned to the guest unsent.
    pub tx_drops: AtomicU64,
    /// Frames the tap refused (the frame is lost, as on a wire).
    pub tx_errors: AtomicU64,
    /// Times the tap was full and transmission waited for it (nothing is lost).
    pub tx_waits: AtomicU64,
    /// Frames the FT output gate holds now (a level, not a running count).
    pub tx_held_frames: AtomicU64,
    /// Bytes the FT output gate holds now, vnet headers included (a level).
    pub tx_held_bytes: AtomicU64,
    /// Frames the FT output gate released to the tap (counted in `tx_frames` too).
    pub tx_released_frames: AtomicU64,
    /// Frames a fenced output gate dropped: those it held when fenced and all sent since.
    pub tx_fenced_drops: AtomicU64,
    /// Times the FT output gate was full and transmission waited for a release.
    pub tx_gate_stalls: AtomicU64,
}

crate::impl_counters!(NetMetrics {
    rx_frames,
    rx_bytes,
    rx_drops,
    rx_errors,
    rx_bad_buffers,
    rx_moderation_starts,
    rx_moderated_frames,
    tx_frames,
    tx_bytes,
    tx_drops,
    tx_errors,
    tx_waits,
    tx_held_frames,
    tx_held_bytes,
    tx_released_frames,
    tx_fenced_drops,
    tx_gate_stalls
});

pub(super) fn count(counter: &AtomicU64, n: u64) {
    if n != 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Reads the next frame the guest can take from the tap into `buf`, dropping (and counting)
/// frames it cannot; None when the tap has nothing more (or fails, which is counted).
fn read_frame(
    tap: &Tap,
    buf: &mut [u8],
    acked: u64,
    metrics: &NetMetrics,
    iface_id: &str,
) -> Option<usize> {
    loop {
        let len = match tap.read(buf) {
            Ok(len) => len,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) => {
                tap_read_failed(tap, &e, metrics, iface_id);
                return None;
            }
        };
        // The tap reports a frame's full length even when it had to cut it to fit.
        let outcome = if len > buf.len() {
            Err(FrameDrop::TooBig)
        } else {
            prepare_rx_header(&mut buf[..len], acked)
        };
        match outcome {
            Ok(()) => return Some(len),
            Err(why) => {
                log::debug!("virtio-net {iface_id}: dropped a received frame: {why}");
                count(&metrics.rx_drops, 1);
            }
        }
    }
}

/// Counts a failed tap read; logs only the first.
fn tap_read_failed(tap: &Tap, e: &std::io::Error, metrics: &NetMetrics, iface_id: &str) {
    if metrics.rx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
        log::warn!("virtio-net {iface_id}: cannot read tap {}: {e}", tap.name());
    }
}

/// What the receive loop does next.
enum RxNext {
    /// Take the next frame.
    Again,
    /// Stop for this reason.
    Stop(RxStop),
    /// Take this frame through the copying path.
    Copy,
}

/// The driver has no receive buffer: asks to be told of the next one, or goes on if one
/// arrived meanwhile.
fn out_of_buffers(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<RxNext, virtio_queue::Error> {
    if request_buffer_notification(queue, mem)? {
        queue.disable_notification(mem)?;
        Ok(RxNext::Again)
    } else {
        Ok(RxNext::Stop(RxStop::NoBuffers))
    }
}

/// One frame through [`receive_direct`], with its counters.
fn receive_direct_step(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &Tap,
    acked: u64,
    batch: &mut UsedBatch,
    metrics: &NetMetrics,
    iface_id: &str,
) -> Result<RxNext, virtio_queue::Error> {
    Ok(match receive_direct(queue, mem, tap, acked, batch)? {
        Direct::Delivered(len) => {
            count(&metrics.rx_frames, 1);
            count(&metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
            // Published at once, as in the copying path.
            batch.flush(queue, mem)?;
            RxNext::Again
        }
        Direct::NoBuffers => out_of_buffers(queue, mem)?,
        Direct::TapEmpty => RxNext::Stop(RxStop::TapEmpty),
        Direct::TapFailed(e) => {
            tap_read_failed(tap, &e, metrics, iface_id);
            RxNext::Stop(RxStop::TapEmpty)
        }
        Direct::Dropped(why) => {
            log::debug!("virtio-net {iface_id}: dropped a received frame: {why}");
            count(&metrics.rx_drops, 1);
            RxNext::Again
        }
        Direct::BadChain => {
            count(&metrics.rx_bad_buffers, 1);
            RxNext::Again
        }
        Direct::Indirect => RxNext::Copy,
    })
}

/// Why the receive loop stopped.
enum RxStop {
    /// The tap has no more frames.
    TapEmpty,
    /// The guest has no room; its next buffer rings the doorbell.
    NoBuffers,
    /// The budget ran out with work left.
    Budget,
}

/// Why the transmit loop stopped.
pub(super) enum TxStop {
    /// The queue is empty.
    Drained,
    /// The tap is full; its EPOLLOUT resumes transmission.
    TapFull,
    /// The budget ran out with work left.
    Budget,
    /// The FT output gate is full; a release resumes transmission.
    HeldFull,
}

/// Counts a frame the tap refused for good (`result` is what it said); logs only the first.
pub(super) fn tap_refused(
    tap: &Tap,
    metrics: &NetMetrics,
    iface_id: &str,
    len: usize,
    result: std::io::Result<usize>,
) {
    if metrics.tx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
        let why = match result {
            Ok(n) => format!("short write of {n} of {len} bytes"),
            Err(e) => e.to_string(),
        };
        log::warn!(
            "virtio-net {iface_id}: tap {} refused a frame: {why}",
            tap.name()
        );
    }
}

/// A virtio-net device backed by a tap.
pub struct Net {
    pub(super) base: DeviceBase,
    pub(super) tap: Tap,
    pub(super) iface_id: String,
    pub(super) mac: Option<[u8; 6]>,
    pub(super) metrics: Arc<NetMetrics>,
    /// The frame read from the tap and not yet delivered, in `rx_frame[..len]`.
    pub(super) rx_pending: Option<usize>,
    pub(super) rx_frame: Box<[u8]>,
    /// Where a transmit frame is gathered when its buffers are not one mapping.
    tx_bounce: Box<[u8]>,
    /// The tap refused a frame with EAGAIN; it stays in the queue until the tap is writable.
    pub(super) tx_blocked: bool,
    /// What the event loop watches on the tap, once it does.
    pub(super) tap_events: Option<event_manager::EventSet>,
    /// Whether the tap or `rx_timer` drives reception (see [`super::moderation`]).
    pub(super) rx_moderation: RxModeration,
    pub(super) rx_timer: TimerFd,
    /// The FT output gate (see [`super::output_gate`]); open unless FT drives it.
    pub(super) gate: OutputGate,
}

impl Net {
    /// Opens the tap and builds the device.
    pub fn new(config: &NetConfig, interrupt: Arc<VirtioInterrupt>) -> Result<Net, NetError> {
        let tap = Tap::open(&config.host_dev_name)?;
        Net::with_tap(&config.iface_id, tap, config.guest_mac, interrupt)
    }

    /// Builds the device on a tap another lockstep process handed over (checked to be the
    /// config's tap).
    pub fn with_passed_tap(
        config: &NetConfig,
        file: std::fs::File,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Net, NetError> {
        let tap = Tap::from_passed(file, &config.host_dev_name)?;
        Net::with_tap(&config.iface_id, tap, config.guest_mac, interrupt)
    }

    /// Another descriptor on its tap (for a same-host migration to hand over).
    pub fn tap_file(&self) -> std::io::Result<std::fs::File> {
        self.tap.try_clone_file()
    }

    /// Builds the device on an open tap.
    pub(super) fn with_tap(
        iface_id: &str,
        tap: Tap,
        mac: Option<[u8; 6]>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Net, NetError> {
        let mut features = OFFERED_FEATURES;
        if mac.is_some() {
            features |= feature(VIRTIO_NET_F_MAC);
        }
        let base =
            DeviceBase::new(features, &[QUEUE_SIZE, QUEUE_SIZE], interrupt).map_err(|source| {
                NetError::Queues {
                    iface_id: iface_id.to_string(),
                    source,
                }
            })?;
        let rx_timer = nonblocking_timer().map_err(|source| NetError::Timer {
            iface_id: iface_id.to_string(),
            source,
        })?;
        let metrics = Arc::new(NetMetrics::default());
        Ok(Net {
            base,
            tap,
            iface_id: iface_id.to_string(),
            mac,
            gate: OutputGate::new(metrics.clone()),
            metrics,
            rx_pending: None,
            rx_frame: vec![0; MAX_FRAME_LEN].into_boxed_slice(),
            tx_bounce: vec![0; MAX_FRAME_LEN].into_boxed_slice(),
            tx_blocked: false,
            tap_events: None,
            rx_moderation: RxModeration::default(),
            rx_timer,
        })
    }

    /// The interface's id.
    pub fn iface_id(&self) -> &str {
        &self.iface_id
    }

    /// The interface's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    pub(super) fn count_moderated_frames(&self, frames: u64) {
        count(&self.metrics.rx_moderated_frames, frames);
    }

    pub(super) fn count_moderation_start(&self) {
        count(&self.metrics.rx_moderation_starts, 1);
    }

    /// The tap's offloads for what the driver can receive: checksum offload only with
    /// GUEST_CSUM, segmentation only with GUEST_TSO4/6 on top of it.
    pub(super) fn tap_offloads(acked: u64) -> u32 {
        let has = |bit| acked & feature(bit) != 0;
        if !has(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut flags = TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= TUN_F_TSO6;
        }
        flags
    }

    /// Sets the tap's offloads to what the driver negotiated.
    pub(super) fn apply_offloads(&self) -> Result<(), ActivateError> {
        let flags = Net::tap_offloads(self.base.acked_features());
        self.tap.set_offload(flags).map_err(|e| {
            ActivateError::Backend(format!("network interface {}: {e}", self.iface_id))
        })
    }

    /// Moves frames from the tap into the guest's receive buffers until the tap is empty or the
    /// guest has no room. A frame that does not fit yet stays pending (the only one read
    /// ahead); the tap is not read again until it is delivered, so the kernel keeps the rest.
    /// Returns how many frames the guest got and whether the pass stopped because the tap had
    /// nothing more (or failed to read).
    pub fn process_rx(&mut self) -> (u64, bool) {
        let before = self.metrics.rx_frames.load(Ordering::Relaxed);
        let stop = self.run_queue(RX_QUEUE, "receive", Self::rx_loop);
        if let Some(RxStop::Budget) = stop {
            self.ring_own_doorbell(RX_QUEUE);
        }
        // Only this device's thread counts its frames.
        let delivered = self
            .metrics
            .rx_frames
            .load(Ordering::Relaxed)
            .wrapping_sub(before);
        (delivered, matches!(stop, Some(RxStop::TapEmpty)))
    }

    /// Runs one queue's loop with a fresh used batch, publishes what it returned and raises the
    /// interrupt if the driver wants one; a queue error breaks the device. Returns why the loop
    /// stopped (None when the device is not running or broke).
    pub(super) fn run_queue<S>(
        &mut self,
        index: usize,
        what: &str,
        queue_loop: impl FnOnce(
            &mut Self,
            &GuestMemoryMmap,
            &mut UsedBatch,
        ) -> Result<S, virtio_queue::Error>,
    ) -> Option<S> {
        let memory = self.base.running_memory()?;
        let mem: &GuestMemoryMmap = &memory;
        let mut batch = UsedBatch::default();
        let stop = queue_loop(self, mem, &mut batch);
        let published = batch.finish(&mut self.base.queues_mut()[index], mem);
        match (stop, published) {
            (Ok(stop), Ok(notify)) => {
                if notify {
                    self.base.interrupt().trigger(INTERRUPT_USED_RING);
                }
                Some(stop)
            }
            (Err(e), _) | (_, Err(e)) => {
                let why = format!("virtio-net {}: {what} queue: {e}", self.iface_id);
                self.base.mark_broken(&why);
                None
            }
        }
    }

    fn rx_loop(
        &mut self,
        mem: &GuestMemoryMmap,
        batch: &mut UsedBatch,
    ) -> Result<RxStop, virtio_queue::Error> {
        let acked = self.base.acked_features();
        let mergeable = acked & feature(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let queue = &mut self.base.queues_mut()[RX_QUEUE];
        // While the guest has buffers the device does not need its notifications.
        queue.disable_notification(mem)?;
        let mut stop = RxStop::Budget;
        for _ in 0..BUDGET {
            if !mergeable && self.rx_pending.is_none() {
                let tap = &self.tap;
                match receive_direct_step(
                    queue,
                    mem,
                    tap,
                    acked,
                    batch,
                    &self.metrics,
                    &self.iface_id,
                )? {
                    RxNext::Again => continue,
                    RxNext::Stop(why) => {
                        stop = why;
                        break;
                    }
                    RxNext::Copy => {}
                }
            }
            let len = match self.rx_pending {
                Some(len) => len,
                None => {
                    // Read a frame only when there is somewhere to put it.
                    if !buffers_available(queue, mem)? {
                        match out_of_buffers(queue, mem)? {
                            RxNext::Stop(why) => {
                                stop = why;
                                break;
                            }
                            _ => continue,
                        }
                    }
                    let tap = &self.tap;
                    match read_frame(
                        tap,
                        &mut self.rx_frame,
                        acked,
                        &self.metrics,
                        &self.iface_id,
                    ) {
                        Some(len) => {
                            self.rx_pending = Some(len);
                            len
                        }
                        None => {
                            stop = RxStop::TapEmpty;
                            break;
                        }
                    }
                }
            };
            let frame = &mut self.rx_frame[..len];
            let mut bad_buffers = 0;
            let delivery = deliver_frame(queue, mem, frame, mergeable, batch, &mut bad_buffers);
            count(&self.metrics.rx_bad_buffers, bad_buffers);
            match delivery? {
                Delivery::Delivered(_) => {
                    self.rx_pending = None;
                    count(&self.metrics.rx_frames, 1);
                    count(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
                    // Publish each whole frame at once (the interrupt still waits for the end
                    // of the burst): a polling driver takes it and recycles its buffer while
                    // the burst goes on, instead of finding the ring empty and the tap filling.
                    batch.flush(queue, mem)?;
                }
                Delivery::NoBuffers => match out_of_buffers(queue, mem)? {
                    RxNext::Stop(why) => {
                        stop = why;
                        break;
                    }
                    _ => continue,
                },
                Delivery::Dropped(why) => {
                    log::debug!(
                        "virtio-net {}: dropped a received frame: {why}",
                        self.iface_id
                    );
                    self.rx_pending = None;
                    count(&self.metrics.rx_drops, 1);
                }
            }
        }
        Ok(stop)
    }

    /// Sends every frame the guest queued to the tap. When the tap is full the frame stays in
    /// the queue (not consumed) and transmission resumes, in order, when the tap is writable.
    /// With the FT output gate on, see [`Net::gate_output`].
    pub fn process_tx(&mut self) {
        if !self.gate.is_idle() {
            self.process_tx_gated();
            return;
        }
        self.process_tx_direct();
    }

    /// [`Net::process_tx`] with the gate open and nothing held: straight to the tap.
    pub(super) fn process_tx_direct(&mut self) {
        if self.tx_blocked {
            return;
        }
        match self.run_queue(TX_QUEUE, "transmit", Self::tx_loop) {
            Some(TxStop::TapFull) => self.tx_blocked = true,
            Some(TxStop::Budget) => self.ring_own_doorbell(TX_QUEUE),
            Some(TxStop::Drained | TxStop::HeldFull) | None => {}
        }
    }

    fn tx_loop(
        &mut self,
        mem: &GuestMemoryMmap,
        batch: &mut UsedBatch,
    ) -> Result<TxStop, virtio_queue::Error> {
        let acked = self.base.acked_features();
        let queue = &mut self.base.queues_mut()[TX_QUEUE];
        let mut handled = 0;
        loop {
            queue.disable_notification(mem)?;
            while handled < BUDGET {
                let Some(chain) = next_chain(queue, mem)? else {
                    break;
                };
                handled += 1;
                let head = chain.head_index();
                let sent = send_tx_frame(chain, mem, &self.tap, acked, &mut self.tx_bounce);
                let (len, result) = match sent {
                    Ok(sent) => sent,
                    Err(why) => {
                        log::debug!(
                            "virtio-net {}: dropped transmit chain {head}: {why}",
                            self.iface_id
                        );
                        count(&self.metrics.tx_drops, 1);
                        batch.push(queue, mem, head, 0)?;
                        continue;
                    }
                };
                match result {
                    Ok(n) if n == len => {
                        count(&self.metrics.tx_frames, 1);
                        count(&self.metrics.tx_bytes, (len - VNET_HDR_LEN) as u64);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Keep the chain for the retry: the guest sees it unconsumed.
                        queue.go_to_previous_position();
                        count(&self.metrics.tx_waits, 1);
                        return Ok(TxStop::TapFull);
                    }
                    result => tap_refused(&self.tap, &self.metrics, &self.iface_id, len, result),
                }
                // Transmit buffers are only read: the used length is 0. Returned in groups, so
                // that a driver short of transmit buffers can reuse them during the burst
                // without the used index (a cache line the driver reads) moving every frame.
                batch.push(queue, mem, head, 0)?;
                if handled % TX_PUBLISH_EVERY == 0 {
                    batch.flush(queue, mem)?;
                }
            }
            if handled == BUDGET {
                return Ok(TxStop::Budget);
            }
            // Everything sent is returned before waiting for more.
            batch.flush(queue, mem)?;
            if handled > 0 && more_within(queue, mem, POLL) {
                continue;
            }
            if !queue.enable_notification(mem)? {
                return Ok(TxStop::Drained);
            }
        }
    }

    /// Comes back to a queue later from the event loop, after the VM's other events.
    pub(super) fn ring_own_doorbell(&self, queue: usize) {
        if let Err(e) = self.base.queue_evts()[queue].write(1) {
            log::error!(
                "virtio-net {}: cannot reschedule queue {queue}: {e}",
                self.iface_id
            );
        }
    }

    /// The configuration space: `mac`, then `status`.
    fn config_space(&self) -> [u8; 8] {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac.unwrap_or_default());
        config[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        types::NET
    }

    fn base(&self) -> &DeviceBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    /// The driver's features are known now: the tap produces only the offloads it accepted.
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        self.apply_offloads()?;
        self.base.activate(mem)
    }

    /// A frame read for the old driver is dropped; the tap keeps queueing frames, without
    /// offloads, until the next activation. Frames the output gate holds are already sent as
    /// far as the guest knows: they stay, and released ones still wait for a full tap.
    fn reset(&mut self) {
        self.base.reset();
        if self.rx_pending.take().is_some() {
            count(&self.metrics.rx_drops, 1);
        }
        self.tx_blocked = self.tx_blocked && self.gate.has_released();
        let change = self.rx_moderation.stop();
        self.change_rx_timer(change);
        if let Err(e) = self.tap.set_offload(0) {
            log::warn!("virtio-net {}: {e}", self.iface_id);
        }
    }
}

#[cfg(test)]
mod tests;
