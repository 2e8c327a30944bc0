//! The FT output gate of an interface (issue #13, output commit): while it is on, every frame
//! the guest transmits is copied into a host-side queue and its chain returned at once, so the
//! guest never waits for an epoch. A frame belongs to the epoch open when it was queued and
//! leaves for the tap only once that epoch is released (acknowledged by the secondary), in
//! order. A fenced gate (a primary that lost the arbiter) drops everything it holds and
//! everything the guest sends from then on, for as long as the device lives.
//!
//! The held queue is host-side transport state, not guest-visible device state, so it is not
//! in [`super::NetState`]: the guest already saw those chains as sent, and a restored device
//! starts with an empty, open gate. Its size is bounded ([`MAX_HELD_FRAMES`],
//! [`MAX_HELD_BYTES`]): when it is full, transmit chains stay in the ring, as they do for a
//! full tap, until a release makes room.
//!
//! The gate is driven from the VM's owner thread (through `DeviceManager`), outside the event
//! loop: it writes released frames to the tap at once and, when the tap is full or the ring
//! waits for room, rings the transmit doorbell so that the event loop takes over (watching the
//! tap for EPOLLOUT, consuming the ring).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::QueueT;

use super::device::{
    count, tap_refused, Net, NetMetrics, TxStop, BUDGET, POLL, TX_PUBLISH_EVERY, TX_QUEUE,
};
use super::frame::{copy_tx_frame, next_chain, UsedBatch, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::virtio::device::more_within;
use crate::GuestMemoryMmap;

/// Most frames the gate holds at once.
pub const MAX_HELD_FRAMES: usize = 16384;
/// Most bytes (vnet headers included) the gate holds at once. A chain is taken only while a
/// frame of [`MAX_FRAME_LEN`] would still fit, so its length need not be known beforehand.
pub const MAX_HELD_BYTES: usize = 32 << 20;

/// What the gate does with the frames the guest transmits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Straight to the tap (the default; the gate costs nothing then).
    Open,
    /// Held until their epoch is released.
    Gated,
    /// Dropped, for good.
    Fenced,
}

/// A frame (vnet header first) and the epoch it was sent in; epoch 0 means released whatever
/// the epochs (frames still held when the gate opened).
struct HeldFrame {
    epoch: u64,
    frame: Box<[u8]>,
}

/// The held frames and the epoch numbers.
pub(super) struct OutputGate {
    mode: GateMode,
    held: VecDeque<HeldFrame>,
    held_bytes: usize,
    /// The open epoch: frames held now belong to it. Epochs are numbered from 1.
    epoch: u64,
    /// Frames of epochs up to this one may leave.
    released: u64,
    /// ...but only until then: a released frame still held at that time stays held (a process
    /// stopped in the middle of a release may have been replaced meanwhile; only the next
    /// release, after the next acknowledgement, lets it go).
    release_by: Option<Instant>,
    /// The ring waits for room in the held queue.
    stalled: bool,
    max_frames: usize,
    max_bytes: usize,
    metrics: Arc<NetMetrics>,
}

impl OutputGate {
    /// An open gate whose counters go to `metrics`.
    pub(super) fn new(metrics: Arc<NetMetrics>) -> OutputGate {
        OutputGate {
            mode: GateMode::Open,
            held: VecDeque::new(),
            held_bytes: 0,
            epoch: 1,
            released: 0,
            release_by: None,
            stalled: false,
            max_frames: MAX_HELD_FRAMES,
            max_bytes: MAX_HELD_BYTES,
            metrics,
        }
    }

    /// Smaller bounds, for tests.
    #[cfg(test)]
    pub(super) fn set_limits(&mut self, frames: usize, bytes: usize) {
        self.max_frames = frames;
        self.max_bytes = bytes;
    }

    pub(super) fn mode(&self) -> GateMode {
        self.mode
    }

    /// Open with nothing held: transmission takes the direct path.
    pub(super) fn is_idle(&self) -> bool {
        self.mode == GateMode::Open && self.held.is_empty()
    }

    /// Whether another chain may be taken: always, unless gated and full.
    fn has_room(&self) -> bool {
        self.mode != GateMode::Gated
            || (self.held.len() < self.max_frames
                && self.held_bytes + MAX_FRAME_LEN <= self.max_bytes)
    }

    /// Closes the open epoch and returns its number.
    pub(super) fn mark_epoch(&mut self) -> u64 {
        let closed = self.epoch;
        self.epoch += 1;
        closed
    }

    /// Lets frames of epochs up to `upto` leave; epochs not closed yet stay held whatever
    /// `upto` says, so a caller's mistake cannot leak the open epoch.
    fn release(&mut self, upto: u64, by: Option<Instant>) {
        self.released = self.released.max(upto.min(self.epoch - 1));
        self.release_by = by;
    }

    /// The first held frame, if it may leave now.
    fn next_released(&self) -> Option<&[u8]> {
        self.held
            .front()
            .filter(|held| held.epoch <= self.released)
            .filter(|_| self.release_by.is_none_or(|by| Instant::now() <= by))
            .map(|held| &*held.frame)
    }

    /// Whether a released frame waits (for the tap).
    pub(super) fn has_released(&self) -> bool {
        self.next_released().is_some()
    }

    /// Forgets the first held frame (sent, or refused by the tap).
    fn pop(&mut self) {
        if let Some(held) = self.held.pop_front() {
            self.held_bytes -= held.frame.len();
            self.publish_levels();
        }
    }

    /// Holds a frame the guest sent (the gate is on), in the open epoch.
    fn hold(&mut self, frame: Box<[u8]>) {
        self.held_bytes += frame.len();
        self.held.push_back(HeldFrame {
            epoch: self.epoch,
            frame,
        });
        self.publish_levels();
    }

    /// Drops everything held and every frame from now on.
    fn fence(&mut self) {
        count(&self.metrics.tx_fenced_drops, self.held.len() as u64);
        self.held.clear();
        self.held_bytes = 0;
        self.mode = GateMode::Fenced;
        self.publish_levels();
    }

    /// Back to direct writes; what is held is released first, whatever its epoch.
    fn open(&mut self) {
        for held in &mut self.held {
            held.epoch = 0;
        }
        self.release_by = None;
        self.mode = GateMode::Open;
    }

    fn publish_levels(&self) {
        self.metrics
            .tx_held_frames
            .store(self.held.len() as u64, Ordering::Relaxed);
        self.metrics
            .tx_held_bytes
            .store(self.held_bytes as u64, Ordering::Relaxed);
    }
}

/// The outcome of writing released frames to the tap.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flush {
    /// Every released frame is out.
    Done,
    /// The tap is full; the rest waits for EPOLLOUT.
    TapFull,
}

impl Net {
    /// Turns the output gate on: from now on transmitted frames are held until their epoch is
    /// released. No effect on a gate already on, or fenced.
    pub fn gate_output(&mut self) {
        match self.gate.mode() {
            GateMode::Open => {
                self.gate.mode = GateMode::Gated;
                // A chain waiting for a full tap can be held now.
                self.ring_own_doorbell(TX_QUEUE);
            }
            GateMode::Gated => {}
            GateMode::Fenced => log::warn!(
                "virtio-net {}: the output gate is fenced and stays so",
                self.iface_id()
            ),
        }
    }

    /// Closes the open output epoch (frames held so far belong to it) and returns its number;
    /// numbers go up by one from 1, for the device's whole life.
    pub fn mark_output_epoch(&mut self) -> u64 {
        self.gate.mark_epoch()
    }

    /// Writes every held frame of the epochs up to `upto` to the tap, in order. Frames the tap
    /// cannot take yet stay held, first in line, and go when it is writable again.
    pub fn release_output(&mut self, upto: u64) {
        self.release_output_by(upto, None);
    }

    /// As [`release_output`](Self::release_output), but no frame leaves after `by` (checked
    /// before each write): what is still held then waits for the next release.
    pub fn release_output_by(&mut self, upto: u64, by: Option<Instant>) {
        if self.gate.mode() == GateMode::Fenced {
            return;
        }
        self.gate.release(upto, by);
        self.after_release();
    }

    /// Fences the gate: everything held is dropped, and nothing this device transmits reaches
    /// the tap any more; the guest's chains are still consumed, so it does not wedge.
    pub fn fence_output(&mut self) {
        if self.gate.mode() == GateMode::Fenced {
            return;
        }
        self.gate.fence();
        // Nothing waits for the tap now; chains waiting for it or for room are dropped.
        self.tx_blocked = false;
        self.gate.stalled = false;
        self.ring_own_doorbell(TX_QUEUE);
    }

    /// Turns the gate off (a primary going on unprotected): everything held is written first,
    /// then frames go straight to the tap again. No effect on a fenced gate.
    pub fn open_output(&mut self) {
        match self.gate.mode() {
            GateMode::Gated => {
                self.gate.open();
                self.after_release();
            }
            GateMode::Open => {}
            GateMode::Fenced => log::warn!(
                "virtio-net {}: the output gate is fenced and cannot open",
                self.iface_id()
            ),
        }
    }

    /// The gate's mode.
    pub fn output_gate_mode(&self) -> GateMode {
        self.gate.mode()
    }

    /// Writes what was released and hands the rest to the event loop: the tap's EPOLLOUT when
    /// it is full, the ring when it waited for room.
    fn after_release(&mut self) {
        let full = self.flush_released() == Flush::TapFull;
        if full {
            self.tx_blocked = true;
        }
        if full || std::mem::take(&mut self.gate.stalled) {
            self.ring_own_doorbell(TX_QUEUE);
        }
    }

    /// Writes released frames to the tap, in order, until none is left or the tap is full.
    /// A frame the tap refuses for another reason is lost, as on a wire (and counted).
    pub(super) fn flush_released(&mut self) -> Flush {
        while let Some(frame) = self.gate.next_released() {
            let len = frame.len();
            match self.tap.write(frame) {
                Ok(n) if n == len => {
                    count(&self.metrics.tx_frames, 1);
                    count(&self.metrics.tx_bytes, (len - VNET_HDR_LEN) as u64);
                    count(&self.metrics.tx_released_frames, 1);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    count(&self.metrics.tx_waits, 1);
                    return Flush::TapFull;
                }
                result => tap_refused(&self.tap, &self.metrics, &self.iface_id, len, result),
            }
            self.gate.pop();
        }
        Flush::Done
    }

    /// Transmission through a gate that is on or fenced, or open with frames still held: the
    /// released frames go first (unless the tap is known full); then, with the gate open, the
    /// direct path takes over once nothing is held, and otherwise the ring is copied into the
    /// held queue (or dropped, fenced) whether or not the tap has room.
    pub(super) fn process_tx_gated(&mut self) {
        if !self.tx_blocked && self.flush_released() == Flush::TapFull {
            self.tx_blocked = true;
        }
        if self.gate.mode() == GateMode::Open {
            // Nothing is held but released frames, which must go before the ring's.
            if self.gate.is_idle() {
                self.process_tx_direct();
            }
            return;
        }
        match self.run_queue(TX_QUEUE, "transmit", Self::tx_loop_gated) {
            Some(TxStop::Budget) => self.ring_own_doorbell(TX_QUEUE),
            Some(TxStop::HeldFull) => count(&self.metrics.tx_gate_stalls, 1),
            Some(TxStop::Drained | TxStop::TapFull) | None => {}
        }
    }

    /// Takes the guest's transmit chains into the gate, returning each at once; stops when the
    /// gate is full, leaving the rest in the ring.
    fn tx_loop_gated(
        &mut self,
        mem: &GuestMemoryMmap,
        batch: &mut UsedBatch,
    ) -> Result<TxStop, virtio_queue::Error> {
        let acked = self.base.acked_features();
        let queue = &mut self.base.queues_mut()[TX_QUEUE];
        let fenced = self.gate.mode() == GateMode::Fenced;
        let mut handled = 0;
        self.gate.stalled = false;
        loop {
            queue.disable_notification(mem)?;
            while handled < BUDGET {
                if !self.gate.has_room() {
                    self.gate.stalled = true;
                    return Ok(TxStop::HeldFull);
                }
                let Some(chain) = next_chain(queue, mem)? else {
                    break;
                };
                handled += 1;
                let head = chain.head_index();
                if fenced {
                    // Nothing of it will ever leave: no need to read it.
                    count(&self.metrics.tx_fenced_drops, 1);
                } else {
                    match copy_tx_frame(chain, mem, acked) {
                        Ok(frame) => self.gate.hold(frame),
                        Err(why) => {
                            log::debug!(
                                "virtio-net {}: dropped transmit chain {head}: {why}",
                                self.iface_id
                            );
                            count(&self.metrics.tx_drops, 1);
                        }
                    }
                }
                batch.push(queue, mem, head, 0)?;
                if handled % TX_PUBLISH_EVERY == 0 {
                    batch.flush(queue, mem)?;
                }
            }
            if handled == BUDGET {
                return Ok(TxStop::Budget);
            }
            batch.flush(queue, mem)?;
            if handled > 0 && more_within(queue, mem, POLL) {
                continue;
            }
            if !queue.enable_notification(mem)? {
                return Ok(TxStop::Drained);
            }
        }
    }
}
