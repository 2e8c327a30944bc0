//! virtio-rng (device type 4, section 5.4): one queue of device-writable buffers that the device fills
//! with entropy (possibly fewer bytes than offered).

use super::mmio::{InitError, Transport};
use super::queue::{Seg, Virtqueue};
use super::{Completion, Waiter};
use crate::frames::Frames;

/// A virtio-rng device.
pub struct Rng {
    transport: Transport,
    queue: Virtqueue,
    /// Negotiated features.
    pub features: u64,
    completion: Completion,
}

impl Rng {
    /// Negotiates, sets up the request queue and makes the device live.
    pub fn probe(
        transport: Transport,
        frames: &mut Frames,
        completion: Completion,
    ) -> Result<Self, InitError> {
        let features = transport.begin(0)?;
        let queue = Virtqueue::new(
            frames,
            0,
            transport.queue_max(0),
            features & super::mmio::feature::RING_EVENT_IDX != 0,
        )
        .ok_or(InitError::QueueUnavailable)?;
        let mut rng = Rng {
            transport,
            queue,
            features,
            completion,
        };
        rng.activate();
        Ok(rng)
    }

    /// Brings the device up again after a reset.
    pub fn reinit(&mut self) -> Result<(), InitError> {
        self.features = self.transport.begin(0)?;
        if self.transport.queue_max(0) < self.queue.size() {
            return Err(InitError::QueueUnavailable);
        }
        self.activate();
        Ok(())
    }

    fn activate(&mut self) {
        self.queue.clear();
        self.queue.attach(&self.transport);
        self.completion.prepare(&mut self.queue);
        self.transport.driver_ok();
    }

    /// The transport (for the hostile tests).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The request queue (for the hostile tests).
    pub fn queue_mut(&mut self) -> &mut Virtqueue {
        &mut self.queue
    }

    /// Offers `addr..addr + len` (driver-owned RAM) to the device and waits at most `timeout_ms`
    /// for it; returns how many bytes the device wrote from the start (it may write fewer than
    /// offered), or `None` if it did not answer.
    pub fn fill(&mut self, addr: u64, len: u32, timeout_ms: u64) -> Option<u32> {
        let head = self.queue.add(&[Seg::write(addr, len)])?;
        self.queue.kick(&self.transport);
        let waiter = Waiter::new(timeout_ms);
        loop {
            if let Some(used) = self.queue.pop() {
                if used.id == head {
                    return Some(used.len.min(len));
                }
                continue;
            }
            if !waiter.wait(&self.transport, &mut self.queue, self.completion) {
                return None;
            }
        }
    }
}
