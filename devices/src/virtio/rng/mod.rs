//! virtio-rng: entropy from the host's kernel (getrandom) for the guest.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemory};

use crate::virtio::{
    types, ActivateError, DeviceBase, DeviceBaseState, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

const QUEUE_SIZE: u16 = 256;
/// Most bytes served for one request, however large the guest's buffers.
const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

/// Counters of the entropy device.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Requests served.
    pub requests: AtomicU64,
    /// Bytes of entropy given to the guest.
    pub bytes: AtomicU64,
    /// Requests that could not be served (bad buffers).
    pub errors: AtomicU64,
}

crate::impl_counters!(RngMetrics {
    requests,
    bytes,
    errors
});

/// Saved state of the entropy device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Features and queues.
    pub base: DeviceBaseState,
}

/// A virtio-rng device.
pub struct Rng {
    base: DeviceBase,
    metrics: Arc<RngMetrics>,
}

impl Rng {
    /// A new entropy device.
    pub fn new(interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Rng> {
        Ok(Rng {
            base: DeviceBase::new(
                VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX,
                &[QUEUE_SIZE],
                interrupt,
            )?,
            metrics: Arc::new(RngMetrics::default()),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    /// Fills every buffer the driver offered.
    pub fn process_queue(&mut self) {
        let metrics = &self.metrics;
        self.base.serve_queue(0, |chain, mem| {
            let len = fill(chain, mem).unwrap_or_else(|| {
                metrics.errors.fetch_add(1, Ordering::Relaxed);
                0
            });
            metrics.requests.fetch_add(1, Ordering::Relaxed);
            metrics.bytes.fetch_add(u64::from(len), Ordering::Relaxed);
            len
        });
    }

    /// The device's guest-visible state.
    pub fn save_state(&self) -> RngState {
        RngState {
            base: self.base.save(),
        }
    }

    /// Restores a saved state.
    pub fn restore_state(
        &mut self,
        state: &RngState,
        mem: GuestMemoryMmap,
    ) -> Result<(), ActivateError> {
        self.base.restore(&state.base, mem)
    }
}

/// Writes random bytes into the chain's device-writable buffers; device-readable ones are
/// skipped. Returns the bytes written, or None if a buffer is outside guest memory.
fn fill<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Option<u32>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut written = 0usize;
    let mut buf = [0u8; 4096];
    for desc in chain.writable() {
        let mut offset = 0usize;
        let len = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
        while offset < len {
            let n = (len - offset).min(buf.len());
            getrandom(&mut buf[..n]).ok()?;
            mem.write_slice(&buf[..n], desc.addr().checked_add(offset as u64)?)
                .ok()?;
            offset += n;
        }
        written += len;
        if written == MAX_BYTES_PER_REQUEST {
            break;
        }
    }
    Some(written as u32)
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most the remaining length of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        types::RNG
    }

    fn base(&self) -> &DeviceBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.base.activate_evt(), EventSet::IN)) {
            log::error!("virtio-rng: cannot watch activation: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.base.activate_evt().as_raw_fd() {
            self.base.watch_queues(ops);
            self.process_queue();
        } else if self.base.doorbell(events.fd()).is_some() {
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::*;

    #[test]
    fn fills_only_writable_buffers_and_caps_the_size() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x1_0000, 64, 0, 0)),
                RawDescriptor::from(Descriptor::new(0x2_0000, 256, 2, 0)),
            ])
            .unwrap();
        assert_eq!(fill(chain, &mem), Some(256));
        let mut out = [0u8; 256];
        mem.read_slice(&mut out, GuestAddress(0x2_0000)).unwrap();
        assert!(
            out.iter().filter(|&&b| b != 0).count() > 200,
            "looks random"
        );
        let untouched: u64 = mem.read_obj(GuestAddress(0x1_0000)).unwrap();
        assert_eq!(untouched, 0);

        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq
            .build_desc_chain(&[RawDescriptor::from(Descriptor::new(
                0x1_0000, 0xe_0000, 2, 0,
            ))])
            .unwrap();
        assert_eq!(fill(chain, &mem), Some(MAX_BYTES_PER_REQUEST as u32));
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq
            .build_desc_chain(&[RawDescriptor::from(Descriptor::new(
                0xffff_ffff_0000,
                64,
                2,
                0,
            ))])
            .unwrap();
        assert_eq!(fill(chain, &mem), None);
    }
}
