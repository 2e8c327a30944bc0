//! What every virtio device shares: features, queues with their doorbell eventfds, the interrupt,
//! activation and reset. [`VirtioDevice`] is what the transport calls; [`DeviceBase`] holds the
//! common state so that each device only adds its own.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{VirtioInterrupt, INTERRUPT_USED_RING};
use super::queue_state::SavedQueue;
use super::VIRTIO_F_RING_EVENT_IDX;
use crate::GuestMemoryMmap;

/// Why a device could not start, or be restored.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The driver left a queue unready or badly placed.
    #[error("queue {index} is not usable: {reason}")]
    BadQueue {
        /// The queue.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The device's backend could not start.
    #[error("backend: {0}")]
    Backend(String),
    /// A saved state does not fit this device.
    #[error("saved state does not fit this device: {0}")]
    BadState(String),
}

/// The common part of a device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBaseState {
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// Each queue.
    pub queues: Vec<SavedQueue>,
    /// Whether the driver had set DRIVER_OK.
    pub activated: bool,
}

/// Features, queues, doorbells and interrupt of one virtio device.
pub struct DeviceBase {
    avail_features: u64,
    acked_features: u64,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    activate_evt: EventFd,
    /// Shared so that the queue handlers' per-event handle is a reference count, not a copy
    /// of the region list.
    mem: Option<Arc<GuestMemoryMmap>>,
    broken: bool,
    watching_queues: bool,
    warned: bool,
}

impl DeviceBase {
    /// A device offering `avail_features`, with one queue per entry of `queue_sizes` (its
    /// maximum size), interrupting through `interrupt`.
    pub fn new(
        avail_features: u64,
        queue_sizes: &[u16],
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let queues = queue_sizes
            .iter()
            .map(|&size| {
                Queue::new(size).map_err(|e| std::io::Error::other(format!("queue of {size}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = queue_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeviceBase {
            avail_features,
            acked_features: 0,
            queues,
            queue_evts,
            interrupt,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            mem: None,
            broken: false,
            watching_queues: false,
            warned: false,
        })
    }

    /// Features the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the driver's features, dropping any the device did not offer.
    pub fn set_acked_features(&mut self, features: u64) {
        let unknown = features & !self.avail_features;
        if unknown != 0 {
            log::warn!("virtio: driver acknowledged features {unknown:#x} that were not offered");
        }
        self.acked_features = features & self.avail_features;
    }

    /// True when the driver acknowledged `feature` (a mask).
    pub fn has_feature(&self, feature: u64) -> bool {
        self.acked_features & feature == feature
    }

    /// The queues.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The queues, for the transport's register writes and the device's processing.
    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// One doorbell eventfd per queue (registered as ioeventfds by the VMM).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// Signalled on activation, so the event loop starts watching the queues.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Guest memory, once the driver has activated the device.
    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.mem.as_deref()
    }

    /// True between DRIVER_OK and reset.
    pub fn is_activated(&self) -> bool {
        self.mem.is_some()
    }

    /// Guest memory while the device may process its queues: activated and not broken.
    pub fn running_memory(&self) -> Option<Arc<GuestMemoryMmap>> {
        if self.broken {
            None
        } else {
            self.mem.clone()
        }
    }

    /// True when the driver broke the device (e.g. an impossible ring index): it stops
    /// processing, the transport reports DEVICE_NEEDS_RESET, and only a reset brings it back.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Stops the device until the driver resets it, and tells the driver so.
    pub fn mark_broken(&mut self, why: &str) {
        if !self.broken {
            self.log_guest_error(&format!("device needs a reset: {why}"));
            self.broken = true;
            self.interrupt.trigger(super::INTERRUPT_CONFIG);
        }
    }

    /// Logs a problem the guest's driver caused: a warning the first time, debug after that,
    /// so that a guest cannot flood the host's log.
    pub fn log_guest_error(&mut self, message: &str) {
        if self.warned {
            log::debug!("virtio: {message}");
        } else {
            log::warn!("virtio: {message} (further driver errors of this device are logged at debug level)");
            self.warned = true;
        }
    }

    /// The event loop's side of activation: watches every queue's doorbell once.
    pub fn watch_queues(&mut self, ops: &mut event_manager::EventOps) {
        let _ = self.activate_evt.read();
        if self.watching_queues {
            return;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(event_manager::Events::new(evt, event_manager::EventSet::IN)) {
                log::error!("virtio: cannot watch queue {i}: {e}");
            }
        }
        self.watching_queues = true;
    }

    /// Which queue a doorbell eventfd belongs to; drains it.
    pub fn doorbell(&self, fd: std::os::fd::RawFd) -> Option<usize> {
        use std::os::fd::AsRawFd;
        let index = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd)?;
        let _ = self.queue_evts[index].read();
        Some(index)
    }

    /// Checks the queues the driver set up and starts the device.
    pub fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        let event_idx = self.has_feature(VIRTIO_F_RING_EVENT_IDX);
        for (index, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&mem) {
                return Err(ActivateError::BadQueue {
                    index,
                    reason: format!(
                        "size {} or ring addresses desc={:#x} avail={:#x} used={:#x} are invalid",
                        q.size(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring()
                    ),
                });
            }
            q.set_event_idx(event_idx);
        }
        self.mem = Some(Arc::new(mem));
        self.activate_evt
            .write(1)
            .map_err(|e| ActivateError::Backend(format!("cannot signal activation: {e}")))
    }

    /// Back to the state before the driver found the device.
    pub fn reset(&mut self) {
        self.mem = None;
        self.broken = false;
        self.acked_features = 0;
        for q in self.queues.iter_mut() {
            q.reset();
        }
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.set_status(0);
    }

    /// Serves every chain available on `queue`: `handle` gets each chain and returns the number
    /// of bytes it wrote into the guest, then the chain goes back on the used ring. One
    /// interrupt follows the batch, if the driver wants it. An available index that runs ahead
    /// of the queue size marks the device as needing a reset instead of being spun on. Returns
    /// the number of chains served.
    pub fn serve_queue<F>(&mut self, queue: usize, handle: F) -> usize
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap>, &GuestMemoryMmap) -> u32,
    {
        self.serve_queue_polling(queue, std::time::Duration::ZERO, handle)
    }

    /// [`DeviceBase::serve_queue`], but once the queue is empty, keeps looking at it for up to
    /// `poll` before giving up: a driver with requests in flight usually posts the next one
    /// within microseconds, and catching it here saves a doorbell wake-up of the event loop.
    pub fn serve_queue_polling<F>(
        &mut self,
        queue: usize,
        poll: std::time::Duration,
        mut handle: F,
    ) -> usize
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap>, &GuestMemoryMmap) -> u32,
    {
        let Some(memory) = self.running_memory() else {
            return 0;
        };
        let mem: &GuestMemoryMmap = &memory;
        let Some(q) = self.queues.get_mut(queue) else {
            return 0;
        };
        let mut served = 0;
        let broken = loop {
            if let Err(e) = q.iter(mem) {
                break Some(e);
            }
            let _ = q.disable_notification(mem);
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let used_len = handle(chain, mem);
                if let Err(e) = q.add_used(mem, head, used_len) {
                    log::debug!("virtio: cannot return descriptor {head}: {e}");
                }
                served += 1;
            }
            match q.enable_notification(mem) {
                Ok(true) => {}
                Ok(false) if served > 0 && !poll.is_zero() && more_within(q, mem, poll) => {}
                Ok(false) => break None,
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = broken {
            if !matches!(e, virtio_queue::Error::QueueNotReady) {
                self.mark_broken(&format!("queue {queue}: {e}"));
            }
        }
        if served > 0 {
            self.notify_used(queue);
        }
        served
    }

    /// Raises the used-ring interrupt for `queue` unless the driver suppressed it.
    pub fn notify_used(&mut self, queue: usize) {
        let Some(mem) = self.mem.as_deref() else {
            return;
        };
        let needed = match self.queues.get_mut(queue) {
            Some(q) => q.needs_notification(mem).unwrap_or(true),
            None => false,
        };
        if needed {
            self.interrupt.trigger(INTERRUPT_USED_RING);
        }
    }

    /// The common saved state.
    pub fn save(&self) -> DeviceBaseState {
        DeviceBaseState {
            acked_features: self.acked_features,
            queues: self.queues.iter().map(SavedQueue::from).collect(),
            activated: self.is_activated(),
        }
    }

    /// Restores queues and features; with `mem` when the device was active.
    pub fn restore(
        &mut self,
        state: &DeviceBaseState,
        mem: GuestMemoryMmap,
    ) -> Result<(), ActivateError> {
        if state.queues.len() != self.queues.len() {
            return Err(ActivateError::BadState(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        for (index, (saved, q)) in state.queues.iter().zip(self.queues.iter_mut()).enumerate() {
            if saved.max_size != q.max_size() {
                return Err(ActivateError::BadState(format!(
                    "queue {index} max size differs"
                )));
            }
            *q = Queue::try_from(saved)
                .map_err(|e| ActivateError::BadState(format!("queue {index}: {e}")))?;
        }
        self.set_acked_features(state.acked_features);
        if state.activated {
            // The driver's setup is checked again, as activation does: a saved queue is
            // untrusted input, and the device would read and write guest memory at its rings.
            for (index, q) in self.queues.iter().enumerate() {
                if q.ready() && !q.is_valid(&mem) {
                    return Err(ActivateError::BadState(format!(
                        "queue {index}: size {} or ring addresses desc={:#x} avail={:#x} \
                         used={:#x} are outside guest memory",
                        q.size(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring()
                    )));
                }
            }
            self.mem = Some(Arc::new(mem));
            self.activate_evt
                .write(1)
                .map_err(|e| ActivateError::Backend(format!("cannot signal activation: {e}")))?;
        }
        Ok(())
    }
}

/// The next chain the driver made available, if any. A queue the driver left unready has none;
/// an available index that ran more than the queue size ahead is an error (the device must
/// stop, not spin on a ring it cannot take chains from).
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    match queue.iter(mem) {
        Ok(mut chains) => Ok(chains.next()),
        Err(virtio_queue::Error::QueueNotReady) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Spins for up to `poll` waiting for the driver to make another chain available; true when
/// one arrived. Devices poll briefly after a burst instead of asking for a notification at
/// once, which would cost the driver a VM exit for its next request.
pub(crate) fn more_within(q: &Queue, mem: &GuestMemoryMmap, poll: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + poll;
    loop {
        match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) if idx.0 != q.next_avail() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// A timer for the event loop. Non-blocking: reading a timer that was re-armed between epoll's
/// report and the read must not block the loop.
pub(crate) fn nonblocking_timer() -> std::io::Result<vmm_sys_util::timerfd::TimerFd> {
    let timer = vmm_sys_util::timerfd::TimerFd::new()?;
    // SAFETY: F_SETFL on a descriptor this function owns.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&timer),
            libc::F_SETFL,
            libc::O_NONBLOCK,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timer)
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// The virtio device type (see [`super::types`]).
    fn device_type(&self) -> u32;

    /// The common state.
    fn base(&self) -> &DeviceBase;

    /// The common state, mutably.
    fn base_mut(&mut self) -> &mut DeviceBase;

    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the configuration space; most devices have none the driver may write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    /// DRIVER_OK: start processing queues.
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        self.base_mut().activate(mem)
    }

    /// The driver wrote 0 to Status: stop and forget everything the driver set up.
    fn reset(&mut self) {
        self.base_mut().reset();
    }
}

/// Copies the part of `config` at `offset` into `data`; bytes beyond the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&config, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    /// A device whose one queue lives in a mock ring (without EVENT_IDX, so every batch
    /// interrupts).
    fn base_on_mock_queue(
        mem: &GuestMemoryMmap,
    ) -> (
        DeviceBase,
        virtio_queue::mock::MockSplitQueue<'_, GuestMemoryMmap>,
    ) {
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut b = DeviceBase::new(0, &[16], irq).unwrap();
        let vq = virtio_queue::mock::MockSplitQueue::new(mem, 16);
        b.queues_mut()[0] = vq.create_queue().unwrap();
        b.activate(mem.clone()).unwrap();
        (b, vq)
    }

    #[test]
    fn serve_queue_returns_chains_and_interrupts_once() {
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let (mut b, vq) = base_on_mock_queue(&mem);
        let descs: Vec<RawDescriptor> = (0..3)
            .map(|i| RawDescriptor::from(Descriptor::new(0x10_000 + i * 0x100, 16, 2, 0)))
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let served = b.serve_queue(0, |_, _| 7);
        assert_eq!(served, 3);
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(
            b.interrupt().eventfd().read().unwrap(),
            1,
            "one interrupt for the batch"
        );
        assert!(!b.is_broken());
    }

    #[test]
    fn runaway_avail_index_breaks_the_device_instead_of_spinning() {
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let (mut b, vq) = base_on_mock_queue(&mem);
        vq.avail().idx().store(u16::to_le(500));
        assert_eq!(b.serve_queue(0, |_, _| 0), 0);
        assert!(b.is_broken());
        assert_ne!(b.interrupt().status() & crate::virtio::INTERRUPT_CONFIG, 0);
        assert!(b.running_memory().is_none(), "a broken device stops");
        b.reset();
        assert!(!b.is_broken());
    }

    #[test]
    fn features_are_masked_and_reset_clears() {
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut b = DeviceBase::new(0b1010, &[16, 8], irq).unwrap();
        b.set_acked_features(0b1111);
        assert_eq!(b.acked_features(), 0b1010);
        assert!(b.has_feature(0b10));
        b.queue_evts()[1].write(1).unwrap();
        b.reset();
        assert_eq!(b.acked_features(), 0);
        assert!(b.queue_evts()[1].read().is_err(), "reset drains doorbells");
        assert_eq!(b.queues()[1].max_size(), 8);
    }
}
