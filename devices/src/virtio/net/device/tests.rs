//! The device end to end on a mock queue in guest memory: first on a datagram socket pair
//! standing in for the tap (it fills up and drains at the test's will), then on a real tap in
//! a private network namespace, with an AF_PACKET socket on the host side.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;

const F_WRITE: u16 = 2;
const QLEN: u16 = 64;
/// Every descriptor index owns 64 KiB of guest memory, enough for any frame.
const SLOT: u64 = 0x1_0000;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x8000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x60_0000;
const MAC: [u8; 6] = [0x02, 0x4c, 0x4b, 0, 0, 1];
const HOST_MAC: [u8; 6] = [0x02, 0x4c, 0x4b, 0, 0, 2];
/// IEEE "local experimental" EtherType: nothing else on the tap uses it.
const ETH_P_TEST: u16 = 0x88b5;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn base_features() -> u64 {
    VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | feature(VIRTIO_NET_F_MRG_RXBUF)
}

fn offload_features() -> u64 {
    base_features()
        | feature(VIRTIO_NET_F_CSUM)
        | feature(VIRTIO_NET_F_GUEST_CSUM)
        | feature(VIRTIO_NET_F_GUEST_TSO4)
        | feature(VIRTIO_NET_F_GUEST_TSO6)
        | feature(VIRTIO_NET_F_HOST_TSO4)
        | feature(VIRTIO_NET_F_HOST_TSO6)
}

/// The driver's side of one queue: posts buffers, reads back used entries. The descriptor
/// table and available ring come from the mock; the used ring sits 4 KiB further (the mock's
/// own overlaps the second half of its available ring).
struct Ring<'m> {
    vq: MockSplitQueue<'m, GuestMemoryMmap>,
    m: &'m GuestMemoryMmap,
    used: u64,
    bufs: u64,
    next_desc: u16,
    seen: u16,
}

impl<'m> Ring<'m> {
    fn new(m: &'m GuestMemoryMmap, ring: u64, bufs: u64) -> Self {
        let used = ring + 0x1000;
        m.write_slice(&[0; 4], GuestAddress(used)).unwrap();
        Ring {
            vq: MockSplitQueue::create(m, GuestAddress(ring), QLEN),
            m,
            used,
            bufs,
            next_desc: 0,
            seen: 0,
        }
    }

    fn attach(&self, q: &mut Queue) {
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        q.set_size(QLEN);
        let (lo, hi) = split(self.vq.desc_table_addr());
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.vq.avail_addr());
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(GuestAddress(self.used));
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
    }

    fn addr(&self, id: u16) -> u64 {
        self.bufs + SLOT * u64::from(id)
    }

    fn post(&mut self, len: u32, flags: u16) -> u16 {
        let id = self.next_desc % QLEN;
        self.next_desc = self.next_desc.wrapping_add(1);
        let d = SplitDescriptor::new(self.addr(id), len, flags, 0);
        self.vq
            .desc_table()
            .store(id, RawDescriptor::from(d))
            .unwrap();
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % QLEN))
            .unwrap()
            .store(id);
        self.vq.avail().idx().store(idx.wrapping_add(1));
        id
    }

    fn post_rx(&mut self, count: usize, len: u32) {
        for _ in 0..count {
            self.post(len, F_WRITE);
        }
    }

    fn post_tx(&mut self, frame: &[u8]) {
        let id = self.next_desc % QLEN;
        self.m
            .write_slice(frame, GuestAddress(self.addr(id)))
            .unwrap();
        self.post(frame.len() as u32, 0);
    }

    /// Used entries published since the last call.
    fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self.m.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.seen % QLEN);
            let id: u32 = self.m.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.m.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.seen = self.seen.wrapping_add(1);
        }
        out
    }

    fn read(&self, id: u16, len: u32) -> Vec<u8> {
        let mut v = vec![0; len as usize];
        self.m
            .read_slice(&mut v, GuestAddress(self.addr(id)))
            .unwrap();
        v
    }

    /// Reassembles received frames (without their vnet header) from the used entries,
    /// following `num_buffers`.
    fn received(&mut self) -> Vec<Vec<u8>> {
        let used = self.take_used();
        let mut frames = Vec::new();
        let mut i = 0;
        while i < used.len() {
            let (id, len) = used[i];
            let mut data = self.read(id, len);
            let n = usize::from(u16::from_le_bytes([data[10], data[11]]));
            assert!(
                n >= 1 && i + n <= used.len(),
                "num_buffers {n} at entry {i} of {}",
                used.len()
            );
            for &(id, len) in &used[i + 1..i + n] {
                data.extend(self.read(id, len));
            }
            frames.push(data[VNET_HDR_LEN..].to_vec());
            i += n;
        }
        frames
    }
}

/// An Ethernet frame to the guest's MAC carrying `seq`, `len` bytes long.
fn ethernet(seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ETH_P_TEST.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend((f.len()..len).map(|i| (i as u32 ^ seq.wrapping_mul(31)) as u8));
    f
}

fn with_header(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v.extend_from_slice(frame);
    v
}

fn sizes(n: u32) -> impl Iterator<Item = (u32, usize)> {
    (0..n).map(|seq| (seq, 60 + (seq as usize * 397) % 1455))
}

fn irq() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ))
}

/// A device on `tap` with `features` acknowledged and both queues on `rx` and `tx`, activated
/// without touching the tap's offloads (a socket has none).
fn started(tap: Tap, features: u64, m: &GuestMemoryMmap, rx: &Ring, tx: &Ring) -> Net {
    let mut net = Net::with_tap("eth0", tap, Some(MAC), irq()).unwrap();
    net.base_mut().set_acked_features(features);
    rx.attach(&mut net.base_mut().queues_mut()[RX_QUEUE]);
    tx.attach(&mut net.base_mut().queues_mut()[TX_QUEUE]);
    net.base_mut().activate(m.clone()).unwrap();
    net
}

/// The sequence numbers of frames (with or without a vnet header), for readable failures.
fn seqs(frames: &[Vec<u8>]) -> Vec<u32> {
    frames
        .iter()
        .map(|f| {
            let at = if f.len() > 14 && f[12..14] == ETH_P_TEST.to_be_bytes() {
                14
            } else {
                26
            };
            u32::from_be_bytes(f[at..at + 4].try_into().unwrap())
        })
        .collect()
}

fn drain(host: &UnixDatagram) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; MAX_FRAME_LEN + 100];
    while let Ok(n) = host.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

#[test]
fn config_space_and_features() {
    let (tap, _host) = Tap::socket_pair();
    let net = Net::with_tap("eth0", tap, Some(MAC), irq()).unwrap();
    let mut config = [0u8; 10];
    net.read_config(0, &mut config);
    assert_eq!(config, [2, 0x4c, 0x4b, 0, 0, 1, 1, 0, 0, 0]);
    let offered = net.base().avail_features();
    assert_eq!(offered & offload_features(), offload_features());
    assert_ne!(offered & feature(VIRTIO_NET_F_MAC), 0);
    assert_ne!(offered & feature(VIRTIO_NET_F_STATUS), 0);
    for absent in [
        virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_UFO,
        virtio_bindings::virtio_net::VIRTIO_NET_F_HOST_UFO,
        virtio_bindings::virtio_net::VIRTIO_NET_F_MQ,
        virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ,
    ] {
        assert_eq!(offered & feature(absent), 0, "feature bit {absent}");
    }
    let (tap, _host) = Tap::socket_pair();
    let net = Net::with_tap("eth1", tap, None, irq()).unwrap();
    assert_eq!(net.base().avail_features() & feature(VIRTIO_NET_F_MAC), 0);
    assert_eq!(net.device_type(), types::NET);
}

#[test]
fn tap_offloads_follow_what_the_guest_can_receive() {
    let csum = feature(VIRTIO_NET_F_GUEST_CSUM);
    let tso4 = feature(VIRTIO_NET_F_GUEST_TSO4);
    let tso6 = feature(VIRTIO_NET_F_GUEST_TSO6);
    assert_eq!(Net::tap_offloads(0), 0);
    assert_eq!(
        Net::tap_offloads(tso4 | tso6),
        0,
        "TSO needs checksum offload"
    );
    assert_eq!(Net::tap_offloads(csum), TUN_F_CSUM);
    assert_eq!(Net::tap_offloads(csum | tso4), TUN_F_CSUM | TUN_F_TSO4);
    assert_eq!(
        Net::tap_offloads(offload_features()),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    );
    // Host-side offloads are about what the guest sends, not what the tap hands us.
    let host_only = feature(VIRTIO_NET_F_CSUM) | feature(VIRTIO_NET_F_HOST_TSO4);
    assert_eq!(Net::tap_offloads(host_only), 0);
}

#[test]
fn transmission_waits_for_a_full_tap_and_loses_nothing() {
    let m = mem();
    let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
    let mut tx = Ring::new(&m, TX_RING, TX_BUFS);
    let (tap, host) = Tap::socket_pair();
    let mut net = started(tap, base_features(), &m, &rx, &tx);
    let frames: Vec<Vec<u8>> = sizes(40).map(|(s, l)| ethernet(s, l)).collect();
    for f in &frames {
        tx.post_tx(&with_header(f));
    }
    net.process_tx();
    // The socket's queue holds only a few datagrams: the device stops, keeping the rest.
    assert!(net.tx_blocked);
    let first = tx.take_used();
    assert!(
        !first.is_empty() && first.len() < 40,
        "{} sent",
        first.len()
    );
    assert!(first.iter().all(|&(_, len)| len == 0));
    let mut arrived = drain(&host);
    assert_eq!(arrived.len(), first.len());
    let mut used = first.len();
    for _ in 0..100 {
        if arrived.len() == frames.len() {
            break;
        }
        net.tx_blocked = false; // what EPOLLOUT does
        net.process_tx();
        used += tx.take_used().len();
        arrived.extend(drain(&host));
    }
    assert_eq!(used, frames.len());
    let expected: Vec<Vec<u8>> = frames.iter().map(|f| with_header(f)).collect();
    assert_eq!(seqs(&arrived), seqs(&expected), "every frame, in order");
    assert!(arrived == expected, "frames arrived intact");
    let metrics = net.metrics();
    assert_eq!(metrics.tx_frames.load(Ordering::Relaxed), 40);
    assert!(metrics.tx_waits.load(Ordering::Relaxed) >= 1);
    assert_eq!(metrics.tx_drops.load(Ordering::Relaxed), 0);
    let bytes: usize = frames.iter().map(Vec::len).sum();
    assert_eq!(metrics.tx_bytes.load(Ordering::Relaxed), bytes as u64);
    let _ = &mut rx;
}

#[test]
fn malformed_transmit_chains_are_returned_unsent_and_counted() {
    let m = mem();
    let rx = Ring::new(&m, RX_RING, RX_BUFS);
    let mut tx = Ring::new(&m, TX_RING, TX_BUFS);
    let (tap, host) = Tap::socket_pair();
    let mut net = started(tap, base_features(), &m, &rx, &tx);
    tx.post(100, F_WRITE); // wrong direction
    tx.post(8, 0); // shorter than the header
    tx.post(MAX_FRAME_LEN as u32 + 1, 0); // too long
    let mut tso = with_header(&ethernet(0, 200));
    tso[1] = 1; // GSO TCPv4, not negotiated
    tx.post_tx(&tso);
    let good = with_header(&ethernet(7, 300));
    tx.post_tx(&good);
    net.process_tx();
    assert_eq!(
        tx.take_used().iter().map(|u| u.1).collect::<Vec<_>>(),
        [0; 5]
    );
    assert_eq!(drain(&host), vec![good]);
    assert_eq!(net.metrics().tx_drops.load(Ordering::Relaxed), 4);
    assert!(!net.base().is_broken());
}

#[test]
fn reception_reads_only_what_the_guest_can_take_and_keeps_order() {
    let m = mem();
    let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
    let tx = Ring::new(&m, TX_RING, TX_BUFS);
    let (tap, host) = Tap::socket_pair();
    let mut net = started(tap, base_features(), &m, &rx, &tx);
    let frames: Vec<Vec<u8>> = sizes(30).map(|(s, l)| ethernet(s, l)).collect();
    // The socket queues at most 10; send in two rounds.
    for f in &frames[..10] {
        host.send(&with_header(f)).unwrap();
    }
    net.process_rx();
    assert_eq!(net.rx_pending, None, "nothing read without a buffer");
    assert!(rx.take_used().is_empty());
    // Small mergeable buffers: most frames need several.
    rx.post_rx(3, 512);
    net.process_rx();
    let mut got = rx.received();
    let mut sent = 10;
    for _ in 0..200 {
        if got.len() == frames.len() {
            break;
        }
        while sent < frames.len() && host.send(&with_header(&frames[sent])).is_ok() {
            sent += 1;
        }
        rx.post_rx(4, 512);
        net.process_rx();
        got.extend(rx.received());
    }
    assert_eq!(seqs(&got), seqs(&frames), "every frame, in order");
    assert!(got == frames, "frames arrived intact");
    let metrics = net.metrics();
    assert_eq!(metrics.rx_frames.load(Ordering::Relaxed), 30);
    assert_eq!(metrics.rx_drops.load(Ordering::Relaxed), 0);
}

#[test]
fn received_frames_mark_guest_pages_dirty() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    // The test itself writes only descriptors and rings, never the buffers' pages.
    let m = mem();
    let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
    let tx = Ring::new(&m, TX_RING, TX_BUFS);
    let (tap, host) = Tap::socket_pair();
    let mut net = started(tap, base_features(), &m, &rx, &tx);
    rx.post_rx(2, 1024);
    let region = m.find_region(GuestAddress(0)).unwrap();
    assert!(!region.bitmap().dirty_at(rx.addr(0) as usize));
    host.send(&with_header(&ethernet(1, 1500))).unwrap();
    net.process_rx();
    assert_eq!(rx.received().len(), 1);
    // Migration must see the frame, in both buffers it took.
    for addr in [rx.addr(0), rx.addr(1)] {
        assert!(region.bitmap().dirty_at(addr as usize), "{addr:#x}");
    }
    assert!(!region.bitmap().dirty_at(rx.addr(2) as usize));
    assert!(!region.bitmap().dirty_at(TX_BUFS as usize));
}

#[test]
fn frames_read_straight_into_guest_buffers_mark_their_pages_dirty() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    // Without MRG_RXBUF the tap is read straight into the guest's chain.
    let m = mem();
    let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
    let tx = Ring::new(&m, TX_RING, TX_BUFS);
    let (tap, host) = Tap::socket_pair();
    let mut net = started(
        tap,
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX,
        &m,
        &rx,
        &tx,
    );
    rx.post_rx(2, 9000);
    let region = m.find_region(GuestAddress(0)).unwrap();
    // Three pages: the header's, and two that only the kernel's copy writes.
    let frame = ethernet(7, 8500);
    host.send(&with_header(&frame)).unwrap();
    net.process_rx();
    assert_eq!(rx.received(), vec![frame]);
    for page in 0..3 {
        let addr = rx.addr(0) + page * 4096;
        assert!(region.bitmap().dirty_at(addr as usize), "{addr:#x}");
    }
    assert!(!region.bitmap().dirty_at(rx.addr(1) as usize));
    // A frame asking for a checksum offload the driver did not accept is dropped, and the
    // buffer it was read into stays with the device for the next frame.
    let mut offload = with_header(&ethernet(8, 300));
    offload[0] = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    host.send(&offload).unwrap();
    let next = ethernet(9, 300);
    host.send(&with_header(&next)).unwrap();
    net.process_rx();
    assert_eq!(rx.received(), vec![next]);
    assert_eq!(net.metrics().rx_drops.load(Ordering::Relaxed), 1);
}

#[test]
fn without_mrg_rxbuf_each_frame_takes_one_buffer() {
    let m = mem();
    let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
    let tx = Ring::new(&m, TX_RING, TX_BUFS);
    let (tap, host) = Tap::socket_pair();
    let features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX;
    let mut net = started(tap, features, &m, &rx, &tx);
    let small = ethernet(1, 200);
    let big = ethernet(2, 1514);
    for f in [&small, &big, &small] {
        host.send(&with_header(f)).unwrap();
    }
    rx.post_rx(2, 1000);
    net.process_rx();
    // The big frame does not fit a 1000-byte buffer: dropped, counted, buffer kept.
    assert_eq!(rx.received(), vec![small.clone(), small]);
    assert_eq!(net.metrics().rx_drops.load(Ordering::Relaxed), 1);
    rx.post_rx(1, 1526);
    host.send(&with_header(&big)).unwrap();
    net.process_rx();
    assert_eq!(rx.received(), vec![big]);
}

#[test]
fn reset_drops_the_pending_frame_and_the_device_starts_again() {
    let m = mem();
    let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
    let mut tx = Ring::new(&m, TX_RING, TX_BUFS);
    let (tap, host) = Tap::socket_pair();
    let mut net = started(tap, base_features(), &m, &rx, &tx);
    host.send(&with_header(&ethernet(1, 1400))).unwrap();
    rx.post_rx(1, 512);
    net.process_rx();
    assert!(
        net.rx_pending.is_some(),
        "one frame read ahead, waiting for buffers"
    );
    net.reset();
    assert_eq!(net.rx_pending, None);
    assert!(!net.base().is_activated());
    assert_eq!(net.metrics().rx_drops.load(Ordering::Relaxed), 1);
    net.process_rx();
    net.process_tx();
    // The driver sets the device up again, on fresh rings.
    let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
    let mut tx2 = Ring::new(&m, TX_RING, TX_BUFS);
    net.base_mut().set_acked_features(base_features());
    rx.attach(&mut net.base_mut().queues_mut()[RX_QUEUE]);
    tx2.attach(&mut net.base_mut().queues_mut()[TX_QUEUE]);
    net.base_mut().activate(m.clone()).unwrap();
    let frame = ethernet(2, 700);
    host.send(&with_header(&frame)).unwrap();
    rx.post_rx(2, 512);
    net.process_rx();
    assert_eq!(rx.received(), vec![frame.clone()]);
    tx2.post_tx(&with_header(&frame));
    net.process_tx();
    assert_eq!(drain(&host), vec![with_header(&frame)]);
    let _ = &mut tx;
}

#[test]
fn the_event_loop_drives_both_directions_and_waits_for_a_writable_tap() {
    let m = mem();
    let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
    let mut tx = Ring::new(&m, TX_RING, TX_BUFS);
    let (tap, host) = Tap::socket_pair();
    let mut net = Net::with_tap("eth0", tap, Some(MAC), irq()).unwrap();
    net.base_mut().set_acked_features(base_features());
    rx.attach(&mut net.base_mut().queues_mut()[RX_QUEUE]);
    tx.attach(&mut net.base_mut().queues_mut()[TX_QUEUE]);
    let interrupt = net.base().interrupt().clone();
    let rx_bell = net.base().queue_evts()[RX_QUEUE].try_clone().unwrap();
    let tx_bell = net.base().queue_evts()[TX_QUEUE].try_clone().unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut events = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    events.add_subscriber(net.clone());
    net.lock().unwrap().base_mut().activate(m.clone()).unwrap();
    events.run_with_timeout(100).unwrap();

    // Guest to host: more than the socket holds; the device waits for EPOLLOUT.
    let out: Vec<Vec<u8>> = sizes(40)
        .map(|(s, l)| with_header(&ethernet(s, l)))
        .collect();
    for f in &out {
        tx.post_tx(f);
    }
    tx_bell.write(1).unwrap();
    let mut arrived = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while arrived.len() < out.len() && Instant::now() < deadline {
        events.run_with_timeout(50).unwrap();
        arrived.extend(drain(&host));
    }
    assert_eq!(seqs(&arrived), seqs(&out));
    assert!(arrived == out, "frames arrived intact");
    assert!(
        net.lock()
            .unwrap()
            .metrics()
            .tx_waits
            .load(Ordering::Relaxed)
            >= 1
    );
    assert_eq!(tx.take_used().len(), out.len());
    assert!(interrupt.status() & INTERRUPT_USED_RING != 0);

    // Host to guest: frames wait in the socket until the guest posts buffers.
    let frames: Vec<Vec<u8>> = sizes(10).map(|(s, l)| ethernet(100 + s, l)).collect();
    for f in &frames {
        host.send(&with_header(f)).unwrap();
    }
    events.run_with_timeout(50).unwrap();
    assert!(rx.take_used().is_empty());
    rx.post_rx(40, 512);
    rx_bell.write(1).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < frames.len() && Instant::now() < deadline {
        events.run_with_timeout(50).unwrap();
        got.extend(rx.received());
    }
    assert_eq!(seqs(&got), seqs(&frames));
    assert!(got == frames, "frames arrived intact");
    // Ten frames in one pass moved reception onto the moderation timer: frames arriving now
    // come on its ticks.
    let moderated = |net: &Mutex<Net>| net.lock().unwrap().rx_moderation.is_on();
    let metrics = net.lock().unwrap().metrics();
    assert!(moderated(&net), "a burst starts moderation");
    assert_eq!(metrics.rx_moderation_starts.load(Ordering::Relaxed), 1);
    let more: Vec<Vec<u8>> = (0..3).map(|i| ethernet(500 + i, 64)).collect();
    for f in &more {
        host.send(&with_header(f)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < frames.len() + more.len() && Instant::now() < deadline {
        events.run_with_timeout(50).unwrap();
        got.extend(rx.received());
    }
    assert!(
        got[frames.len()..] == more[..],
        "frames taken on ticks arrived intact"
    );
    assert_eq!(metrics.rx_moderated_frames.load(Ordering::Relaxed), 3);
    // An empty tick ends moderation.
    let deadline = Instant::now() + Duration::from_secs(10);
    while moderated(&net) && Instant::now() < deadline {
        events.run_with_timeout(50).unwrap();
    }
    assert!(!moderated(&net), "an empty tick ends moderation");
    // A frame arriving now is picked up through the tap's readiness alone.
    let on_ticks = metrics.rx_moderated_frames.load(Ordering::Relaxed);
    let got_before = got.len();
    let late = ethernet(999, 100);
    host.send(&with_header(&late)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() == got_before && Instant::now() < deadline {
        events.run_with_timeout(50).unwrap();
        got.extend(rx.received());
    }
    assert_eq!(got.last(), Some(&late));
    assert_eq!(
        metrics.rx_moderated_frames.load(Ordering::Relaxed),
        on_ticks,
        "the late frame came through the tap's readiness, not a tick"
    );
}

// ---- a real tap, in a private network namespace ----

/// Runs `test` on a thread of its own in a new network namespace, so the tap and its traffic
/// stay there and vanish with it. Without the rights to do so the test says it was skipped
/// (and fails under CI=true).
fn in_private_netns(test: impl FnOnce() + Send + 'static) {
    let outcome = std::thread::spawn(move || {
        // SAFETY: moves only this thread into a new network namespace; no memory involved.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            ));
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun".to_string());
        }
        test();
        Ok(())
    })
    .join();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(why)) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED: a real-tap test needs root: {why}");
        }
        Ok(Err(why)) => panic!("a real-tap test cannot run: {why}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn tap_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("lksnet{:08x}", nanos ^ std::process::id().rotate_left(16))
}

/// `struct ifreq` with the flags member of its union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: i16,
    _rest: [u8; 22],
}

/// Brings interface `name` up (IPv6 off first, so it sends nothing of its own).
fn link_up(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    // SAFETY: creates a new socket descriptor, owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `fd` is new and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqFlags {
        name: [0; 16],
        flags: 0,
        _rest: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS fills the flags of a `struct ifreq`, which `req` lays out (40 bytes).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    assert_eq!(rc, 0, "SIOCGIFFLAGS: {}", std::io::Error::last_os_error());
    req.flags |= libc::IFF_UP as i16;
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    assert_eq!(rc, 0, "SIOCSIFFLAGS: {}", std::io::Error::last_os_error());
}

/// An AF_PACKET socket on the tap interface: the host side of the wire.
struct HostWire(OwnedFd);

impl HostWire {
    fn open(name: &str) -> HostWire {
        let proto = ETH_P_TEST.to_be();
        // SAFETY: creates a new socket descriptor, owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` is new and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: `cname` is a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(index > 0, "no interface {name}");
        // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: binds to an address of the size given.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0);
        HostWire(sock)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: reads `frame.len()` bytes of `frame`.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame that came in from the guest, or None after the timeout.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: sockaddr_ll is plain data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: writes at most `buf.len()` bytes into `buf` and an address of at most
            // `from_len` bytes into `from`.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                return None;
            }
            // Our own transmissions towards the guest show up here too.
            if from.sll_pkttype != libc::PACKET_OUTGOING {
                return Some(buf[..n as usize].to_vec());
            }
        }
    }
}

/// A device on a new tap (inside the test's namespace) with every offload, activated for real
/// (TUNSETOFFLOAD with checksum and TSO), and the host's end of the wire.
fn started_on_real_tap(m: &GuestMemoryMmap, rx: &Ring, tx: &Ring) -> (NetConfig, Net, HostWire) {
    let name = tap_name();
    let config = NetConfig {
        iface_id: "eth0".into(),
        host_dev_name: name.clone(),
        guest_mac: Some(MAC),
    };
    let mut net = Net::new(&config, irq()).unwrap();
    link_up(&name);
    let wire = HostWire::open(&name);
    net.base_mut().set_acked_features(offload_features());
    rx.attach(&mut net.base_mut().queues_mut()[RX_QUEUE]);
    tx.attach(&mut net.base_mut().queues_mut()[TX_QUEUE]);
    net.activate(m.clone()).unwrap();
    (config, net, wire)
}

#[test]
fn frames_cross_a_real_tap_both_ways_without_loss() {
    in_private_netns(|| {
        let m = mem();
        let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
        let mut tx = Ring::new(&m, TX_RING, TX_BUFS);
        let (_, mut net, wire) = started_on_real_tap(&m, &rx, &tx);

        // Host to guest, with too few buffers at first: the kernel keeps what we cannot take.
        let frames: Vec<Vec<u8>> = sizes(60).map(|(s, l)| ethernet(s, l)).collect();
        for f in &frames {
            wire.send(f);
        }
        rx.post_rx(4, 1024);
        net.process_rx();
        let mut got: Vec<Vec<u8>> = rx.received();
        assert!(got.len() < frames.len());
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < frames.len() && Instant::now() < deadline {
            rx.post_rx(8, 1024);
            net.process_rx();
            got.extend(
                rx.received()
                    .into_iter()
                    .filter(|f| f[12..14] == ETH_P_TEST.to_be_bytes()),
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            seqs(&got),
            seqs(&frames),
            "every frame from the host, in order"
        );
        assert!(got == frames, "frames arrived intact");
        assert_eq!(net.metrics().rx_drops.load(Ordering::Relaxed), 0);

        // Guest to host.
        let out: Vec<Vec<u8>> = sizes(60).map(|(s, l)| ethernet(1000 + s, l)).collect();
        for chunk in out.chunks(30) {
            for f in chunk {
                tx.post_tx(&with_header(f));
            }
            net.process_tx();
        }
        let mut arrived = Vec::new();
        while let Some(f) = wire.recv() {
            arrived.push(f);
            if arrived.len() == out.len() {
                break;
            }
        }
        assert_eq!(
            seqs(&arrived),
            seqs(&out),
            "every frame from the guest, in order"
        );
        assert!(arrived == out, "frames arrived intact");
        assert_eq!(tx.take_used().len(), out.len());
        assert_eq!(net.metrics().tx_errors.load(Ordering::Relaxed), 0);
    });
}

#[test]
fn a_snapshot_keeps_the_frame_read_ahead() {
    in_private_netns(|| {
        let m = mem();
        let mut rx = Ring::new(&m, RX_RING, RX_BUFS);
        let tx = Ring::new(&m, TX_RING, TX_BUFS);
        let (config, mut net, wire) = started_on_real_tap(&m, &rx, &tx);
        let frame = ethernet(5, 1400);
        wire.send(&frame);
        rx.post_rx(1, 512);
        let deadline = Instant::now() + Duration::from_secs(5);
        while net.rx_pending.is_none() && Instant::now() < deadline {
            net.process_rx();
        }
        assert!(net.rx_pending.is_some());
        let state = net.save_state();
        assert_eq!(state.mac, Some(MAC));
        assert!(state.base.activated);
        drop(net);

        // The same tap, reopened by a new device that takes the saved state.
        let mut net = Net::new(&config, irq()).unwrap();
        net.restore_state(&state, m.clone()).unwrap();
        assert!(net.base().is_activated());
        rx.post_rx(3, 512);
        net.process_rx();
        assert_eq!(rx.received(), vec![frame]);
        assert_eq!(net.save_state().rx_pending, None);

        // A state saved without a MAC does not fit a device with one.
        let mut other = state.clone();
        other.mac = None;
        assert!(matches!(
            net.restore_state(&other, m.clone()),
            Err(ActivateError::BadState(_))
        ));
    });
}

#[test]
fn open_errors_name_the_tap() {
    in_private_netns(|| {
        let name = tap_name();
        let config = NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: name.clone(),
            guest_mac: None,
        };
        let _first = Net::new(&config, irq()).unwrap();
        let Err(err) = Net::new(&config, irq()) else {
            panic!("a single-queue tap opened twice");
        };
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("cannot open tap device {name}: ")),
            "{text}"
        );
    });
    let config = NetConfig {
        iface_id: "eth0".into(),
        host_dev_name: "much-too-long-tap-name".into(),
        guest_mac: None,
    };
    let Err(err) = Net::new(&config, irq()) else {
        panic!("a 22-byte interface name was accepted");
    };
    assert!(err.to_string().contains("much-too-long-tap-name"), "{err}");
}

mod gate;
