use std::sync::Mutex as StdMutex;

use vm_memory::GuestAddress;

use super::*;
use crate::virtio::{DeviceBase, VirtioInterrupt, VIRTIO_F_RING_EVENT_IDX};

struct Dummy {
    base: DeviceBase,
    config: [u8; 8],
    activations: usize,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn base(&self) -> &DeviceBase {
        &self.base
    }
    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::device::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), crate::virtio::ActivateError> {
        self.activations += 1;
        self.base.activate(mem)
    }
}

#[derive(Clone, Default)]
struct Notifier(Arc<StdMutex<Vec<(bool, u64, u32)>>>);

impl QueueNotifier for Notifier {
    fn register(&self, _: &EventFd, addr: u64, queue: u32) -> std::io::Result<()> {
        self.0.lock().unwrap().push((true, addr, queue));
        Ok(())
    }
    fn unregister(&self, _: &EventFd, addr: u64, queue: u32) -> std::io::Result<()> {
        self.0.lock().unwrap().push((false, addr, queue));
        Ok(())
    }
}

const BASE: u64 = 0xd000_0000;

fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>, Notifier) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | 0b101;
    let dev = Arc::new(Mutex::new(Dummy {
        base: DeviceBase::new(features, &[16, 16], irq).unwrap(),
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        activations: 0,
    }));
    let notifier = Notifier::default();
    let t = MmioTransport::new(dev.clone(), mem, Box::new(notifier.clone()), BASE);
    (t, dev, notifier)
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Walks the driver through the handshake with both queues at valid addresses.
fn bring_up(t: &mut MmioTransport) {
    w(t, 0x70, 1);
    w(t, 0x70, 3);
    w(t, 0x24, 0);
    w(t, 0x20, 0b101);
    w(t, 0x24, 1);
    w(t, 0x20, 1); // VERSION_1
    w(t, 0x70, 0xb);
    assert_eq!(r(t, 0x70), 0xb);
    for q in 0..2u32 {
        w(t, 0x30, q);
        w(t, 0x38, 16);
        let area = 0x1_0000 * (q + 1);
        w(t, 0x80, area);
        w(t, 0x90, area + 0x1000);
        w(t, 0xa0, area + 0x2000);
        w(t, 0x44, 1);
    }
    w(t, 0x70, 0xf);
}

#[test]
fn identification_registers() {
    let (mut t, _, _) = setup();
    assert_eq!(r(&mut t, 0x00), MAGIC);
    assert_eq!(r(&mut t, 0x04), 2);
    assert_eq!(r(&mut t, 0x08), 42);
    assert_eq!(r(&mut t, 0x0c), VENDOR_ID);
    w(&mut t, 0x14, 1);
    assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 is bit 32");
    w(&mut t, 0x30, 0);
    assert_eq!(r(&mut t, 0x34), 16);
    w(&mut t, 0x30, 7);
    assert_eq!(r(&mut t, 0x34), 0, "a queue that does not exist has size 0");
    assert_eq!(r(&mut t, 0x100), u32::from_le_bytes([1, 2, 3, 4]));
    let mut b = [0u8; 1];
    t.read(0x105, &mut b);
    assert_eq!(b[0], 6);
}

#[test]
fn handshake_activates_and_registers_doorbells() {
    let (mut t, dev, notifier) = setup();
    bring_up(&mut t);
    assert_eq!(r(&mut t, 0x70), 0xf);
    let d = dev.lock().unwrap();
    assert_eq!(d.activations, 1);
    assert!(d.base.is_activated());
    assert_eq!(d.base.acked_features(), VIRTIO_F_VERSION_1 | 0b101);
    assert_eq!(
        *notifier.0.lock().unwrap(),
        vec![(true, BASE + 0x50, 0), (true, BASE + 0x50, 1)]
    );
}

#[test]
fn legacy_driver_is_refused_features_ok() {
    let (mut t, dev, _) = setup();
    w(&mut t, 0x70, 3);
    w(&mut t, 0x20, 0b101);
    w(&mut t, 0x70, 0xb);
    assert_eq!(r(&mut t, 0x70) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    w(&mut t, 0x70, 0xf);
    assert_eq!(
        dev.lock().unwrap().activations,
        0,
        "no DRIVER_OK without FEATURES_OK"
    );
}

#[test]
fn queue_setup_only_between_features_ok_and_driver_ok() {
    let (mut t, dev, _) = setup();
    w(&mut t, 0x30, 0);
    w(&mut t, 0x38, 8);
    assert_eq!(
        dev.lock().unwrap().base.queues()[0].size(),
        16,
        "before FEATURES_OK"
    );
    bring_up(&mut t);
    w(&mut t, 0x30, 0);
    w(&mut t, 0x38, 4);
    assert_eq!(
        dev.lock().unwrap().base.queues()[0].size(),
        16,
        "after DRIVER_OK"
    );
}

#[test]
fn invalid_ring_address_sets_needs_reset() {
    let (mut t, dev, notifier) = setup();
    w(&mut t, 0x70, 3);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(&mut t, 0x70, 0xb);
    w(&mut t, 0x30, 0);
    w(&mut t, 0x80, 0xffff_0000);
    w(&mut t, 0x84, 0xffff);
    w(&mut t, 0x44, 1);
    w(&mut t, 0x70, 0xf);
    assert_ne!(r(&mut t, 0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_ne!(r(&mut t, 0x60) & INTERRUPT_CONFIG, 0);
    assert!(!dev.lock().unwrap().base.is_activated());
    let log = notifier.0.lock().unwrap().clone();
    assert_eq!(
        log.iter().filter(|e| e.0).count(),
        log.iter().filter(|e| !e.0).count(),
        "doorbells removed again"
    );
}

#[test]
fn notify_interrupt_ack_and_reset() {
    let (mut t, dev, notifier) = setup();
    bring_up(&mut t);
    w(&mut t, 0x50, 1);
    assert_eq!(dev.lock().unwrap().base.queue_evts()[1].read().unwrap(), 1);
    w(&mut t, 0x50, 99); // no such queue: ignored
    dev.lock()
        .unwrap()
        .base
        .interrupt()
        .trigger(INTERRUPT_CONFIG | 1);
    assert_eq!(r(&mut t, 0x60), 3);
    w(&mut t, 0x64, 1);
    assert_eq!(r(&mut t, 0x60), 2);
    w(&mut t, 0x70, 0);
    assert_eq!(r(&mut t, 0x70), 0);
    assert_eq!(r(&mut t, 0x60), 0);
    assert!(!dev.lock().unwrap().base.is_activated());
    assert_eq!(
        notifier.0.lock().unwrap().iter().filter(|e| !e.0).count(),
        2
    );
    // And the driver can bring it up again.
    bring_up(&mut t);
    assert_eq!(dev.lock().unwrap().activations, 2);
}

#[test]
fn odd_accesses_are_harmless() {
    let (mut t, _, _) = setup();
    let mut b2 = [0xffu8; 2];
    t.read(0x00, &mut b2);
    assert_eq!(b2, [0, 0]);
    t.read(0x02, &mut [0u8; 4]);
    t.write(0x70, &[1, 2]);
    t.write(0x72, &[1, 2, 3, 4]);
    t.write(0x1000_0000, &[1]);
    t.read(u64::MAX - 8, &mut [0u8; 8]);
    t.write(0x70, &[]);
    assert_eq!(r(&mut t, 0x70), 0);
    // Clearing status bits without a reset is ignored.
    w(&mut t, 0x70, 3);
    w(&mut t, 0x70, 1);
    assert_eq!(r(&mut t, 0x70), 3);
}

#[test]
fn state_round_trip() {
    let (mut t, dev, _) = setup();
    bring_up(&mut t);
    dev.lock().unwrap().base.interrupt().trigger(1);
    w(&mut t, 0x30, 1);
    let saved = t.save_state();
    let (mut t2, _, notifier2) = setup();
    t2.restore_state(&saved);
    assert_eq!(t2.save_state(), saved);
    assert_eq!(r(&mut t2, 0x60), 1);
    assert_eq!(
        notifier2.0.lock().unwrap().len(),
        2,
        "an active device gets its doorbells back"
    );
}
