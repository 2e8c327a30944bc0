//! The whole device on a real event loop, with real Unix sockets in a temporary directory and
//! mock virtqueues standing in for the guest's driver.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::device::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use super::packet::{Header, Op, HEADER_LEN, HOST_CID, SHUTDOWN_BOTH, TYPE_STREAM};
use super::*;
use crate::virtio::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemoryMmap;

const QSIZE: u16 = 256;
const GUEST_CID: u64 = 3;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const RX_BUF: u64 = 0x10_0000;
const RX_STRIDE: u64 = 0x2000;
const RX_BUF_LEN: u32 = HEADER_LEN as u32 + 4096;
const TX_HDR: u64 = 0x40_0000;
const TX_DATA: u64 = 0x100_0000;
const TX_DATA_STRIDE: u64 = 0x1_0000;
const EVT_BUF: u64 = 0x50_0000;
const WAIT: Duration = Duration::from_secs(5);

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap()
}

/// One virtqueue as the driver sees it: descriptors handed out and taken back. The mock lays
/// out the descriptor table and available ring; the used ring has its own place, because
/// virtio-queue 0.18's mock puts it over the upper half of the available ring (its `end()`
/// counts entries, not bytes), which breaks once more than half the ring is in use.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    used_addr: u64,
    avail_idx: u16,
    used_seen: u16,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap, start: u64) -> Self {
        mem.write_obj(0u32, GuestAddress(start + 0x8000)).unwrap();
        Ring {
            mem,
            vq: MockSplitQueue::create(mem, GuestAddress(start), QSIZE),
            used_addr: start + 0x8000,
            avail_idx: 0,
            used_seen: 0,
            free: (0..QSIZE).rev().collect(),
            chains: HashMap::new(),
        }
    }

    fn queue(&self) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_used_ring_address(Some(self.used_addr as u32), Some(0));
        q
    }

    fn next_head(&self) -> u16 {
        *self.free.last().expect("ring full")
    }

    /// Makes a chain of `bufs` (address, length, flags) available.
    fn publish(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let idx: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let (flags, next) = match idx.get(i + 1) {
                Some(&n) => (flags | F_NEXT, n),
                None => (flags, 0),
            };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.vq.desc_table().store(idx[i], d).unwrap();
        }
        let slot = (self.avail_idx % QSIZE) as usize;
        self.vq.avail().ring().ref_at(slot).unwrap().store(idx[0]);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.vq.avail().idx().store(self.avail_idx);
        self.chains.insert(idx[0], idx.clone());
        idx[0]
    }

    /// Chains the device returned since the last call: (head, used length).
    fn take_used(&mut self) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        let used_idx = |m: &GuestMemoryMmap| m.read_obj::<u16>(GuestAddress(self.used_addr + 2));
        while self.used_seen != used_idx(self.mem).unwrap() {
            let slot = u64::from(self.used_seen % QSIZE);
            let e: [u32; 2] = self
                .mem
                .read_obj(GuestAddress(self.used_addr + 4 + 8 * slot))
                .unwrap();
            self.used_seen = self.used_seen.wrapping_add(1);
            let head = e[0] as u16;
            for i in self
                .chains
                .remove(&head)
                .unwrap_or_else(|| panic!("unknown head {head}"))
            {
                self.free.push(i);
            }
            out.push((head, e[1]));
        }
        out
    }
}

/// The guest driver, the device and its event loop.
struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    events: EventManager<Arc<Mutex<Vsock>>>,
    rings: [Ring<'a>; 3],
    inbox: VecDeque<(Header, Vec<u8>)>,
    repost_rx: bool,
    empty_rx: Vec<u16>,
    dir: Arc<TempDir>,
    uds: PathBuf,
}

fn from_guest(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        kind: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    }
}

fn new_device(path: PathBuf) -> Vsock {
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    Vsock::new(
        &VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: path,
        },
        irq,
    )
    .unwrap()
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let dir = Arc::new(TempDir::new().unwrap());
        let rings = [
            Ring::new(mem, 0),
            Ring::new(mem, 0x1_0000),
            Ring::new(mem, 0x2_0000),
        ];
        let uds = dir.as_path().join("v.sock");
        let mut dev = new_device(uds.clone());
        for (i, r) in rings.iter().enumerate() {
            dev.base_mut().queues_mut()[i] = r.queue();
        }
        dev.base_mut().set_acked_features(VIRTIO_F_VERSION_1);
        dev.activate(mem.clone()).unwrap();
        Self::with_device(mem, dev, rings, dir, uds)
    }

    fn with_device(
        mem: &'a GuestMemoryMmap,
        dev: Vsock,
        rings: [Ring<'a>; 3],
        dir: Arc<TempDir>,
        uds: PathBuf,
    ) -> Self {
        let dev = Arc::new(Mutex::new(dev));
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(dev.clone());
        let mut h = Harness {
            mem,
            dev,
            events,
            rings,
            inbox: VecDeque::new(),
            repost_rx: true,
            empty_rx: Vec::new(),
            dir,
            uds,
        };
        h.pump();
        h
    }

    fn path(&self, suffix: &str) -> PathBuf {
        let mut p = self.uds.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    }

    fn metrics(&self) -> Arc<VsockMetrics> {
        self.dev.lock().unwrap().metrics()
    }

    fn kick(&self, queue: usize) {
        self.dev.lock().unwrap().base().queue_evts()[queue]
            .write(1)
            .unwrap();
    }

    /// Runs the event loop until it goes quiet; returns the events it handled.
    fn pump(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..1000 {
            let n = self.events.run_with_timeout(0).unwrap();
            total += n;
            self.collect_rx();
            if n == 0 {
                break;
            }
        }
        total
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let head = self.rings[RX_QUEUE].next_head();
            let addr = RX_BUF + u64::from(head) * RX_STRIDE;
            self.rings[RX_QUEUE].publish(&[(addr, RX_BUF_LEN, F_WRITE)]);
        }
        self.kick(RX_QUEUE);
    }

    fn collect_rx(&mut self) {
        for (head, len) in self.rings[RX_QUEUE].take_used() {
            if len == 0 {
                // A buffer the device could not use, returned empty.
                self.empty_rx.push(head);
                continue;
            }
            let addr = RX_BUF + u64::from(head) * RX_STRIDE;
            let mut raw = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = Header::from_bytes(&raw);
            assert_eq!(len as usize, HEADER_LEN + h.len as usize, "used length");
            let mut payload = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HEADER_LEN as u64))
                .unwrap();
            assert_eq!(h.dst_cid, GUEST_CID);
            self.inbox.push_back((h, payload));
            if self.repost_rx {
                let head = self.rings[RX_QUEUE].next_head();
                let addr = RX_BUF + u64::from(head) * RX_STRIDE;
                self.rings[RX_QUEUE].publish(&[(addr, RX_BUF_LEN, F_WRITE)]);
                self.kick(RX_QUEUE);
            }
        }
    }

    /// Puts a packet on the TX queue without notifying the device.
    fn queue_tx(&mut self, h: &Header, payload: &[u8]) {
        let head = self.rings[TX_QUEUE].next_head();
        let hdr = TX_HDR + u64::from(head) * 0x100;
        let data = TX_DATA + u64::from(head) * TX_DATA_STRIDE;
        let h = Header {
            len: payload.len() as u32,
            ..*h
        };
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(hdr))
            .unwrap();
        if payload.is_empty() {
            self.rings[TX_QUEUE].publish(&[(hdr, HEADER_LEN as u32, 0)]);
        } else {
            self.mem.write_slice(payload, GuestAddress(data)).unwrap();
            self.rings[TX_QUEUE]
                .publish(&[(hdr, HEADER_LEN as u32, 0), (data, payload.len() as u32, 0)]);
        }
    }

    fn send(&mut self, h: &Header, payload: &[u8]) {
        self.queue_tx(h, payload);
        self.kick(TX_QUEUE);
        self.pump();
        self.rings[TX_QUEUE].take_used();
    }

    /// Runs the loop until `done` holds.
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.events.run_with_timeout(10).unwrap();
            self.collect_rx();
        }
    }

    /// The next packet for the guest.
    fn expect(&mut self, op: Op) -> (Header, Vec<u8>) {
        self.until("a packet", |h| !h.inbox.is_empty());
        let (h, p) = self.inbox.pop_front().unwrap();
        assert_eq!(h.op(), Some(op), "got {h:?}");
        (h, p)
    }

    /// Reads `n` bytes from a host program's socket, running the loop meanwhile.
    fn host_read(&mut self, s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        self.until("host data", |_| {
            let mut buf = [0u8; 65536];
            match s.read(&mut buf[..(n - out.len()).min(65536)]) {
                Ok(0) => panic!("host socket closed after {} bytes", out.len()),
                Ok(k) => out.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            out.len() == n
        });
        out
    }

    /// Waits for a host program's socket to be closed by the device.
    fn host_eof(&mut self, s: &mut UnixStream) {
        s.set_nonblocking(true).unwrap();
        self.until("end of file", |_| {
            matches!(s.read(&mut [0u8; 64]), Ok(0) | Err(_))
                && s.read(&mut [0u8; 1]).ok() == Some(0)
        });
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().backend.connection_count()
    }

    /// A guest connection from `port` to host port 1234, accepted by a host listener.
    fn guest_connect(&mut self, port: u32) -> (UnixListener, UnixStream) {
        let listener = UnixListener::bind(self.path("_1234")).unwrap();
        self.send(&from_guest(Op::Request, port, 1234), &[]);
        let (resp, _) = self.expect(Op::Response);
        assert_eq!((resp.src_port, resp.dst_port), (1234, port));
        assert_eq!(resp.buf_alloc, TX_BUF_SIZE);
        let (stream, _) = listener.accept().unwrap();
        (listener, stream)
    }
}

#[test]
fn host_connects_relays_and_the_guest_closes() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(16);
    let mut host = UnixStream::connect(g.path("")).unwrap();
    host.write_all(b"CONNECT 52\nfirst").unwrap();
    let (req, _) = g.expect(Op::Request);
    assert_eq!((req.dst_port, req.kind), (52, TYPE_STREAM));
    assert!(req.src_port >= 1 << 30);
    let local = req.src_port;

    g.send(&from_guest(Op::Response, 52, local), &[]);
    let ok = g.host_read(&mut host, format!("OK {local}\n").len());
    assert_eq!(ok, format!("OK {local}\n").as_bytes());
    let (rw, data) = g.expect(Op::Rw);
    assert_eq!(data, b"first");
    assert_eq!((rw.src_port, rw.dst_port), (local, 52));

    let mut h = from_guest(Op::Rw, 52, local);
    h.fwd_cnt = 5;
    g.send(&h, b"hello host");
    assert_eq!(g.host_read(&mut host, 10), b"hello host");

    let mut bye = from_guest(Op::Shutdown, 52, local);
    bye.flags = SHUTDOWN_BOTH;
    g.send(&bye, &[]);
    g.expect(Op::Rst);
    g.host_eof(&mut host);
    assert_eq!(g.connections(), 0);
    let m = g.metrics();
    assert_eq!(m.connections_opened.load(Ordering::Relaxed), 1);
    assert_eq!(m.connections_closed.load(Ordering::Relaxed), 1);
    assert_eq!(m.tx_bytes.load(Ordering::Relaxed), 10);
    assert_eq!(m.rx_bytes.load(Ordering::Relaxed), 5);
}

#[test]
fn a_guest_refusal_closes_the_host_program() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(4);
    let mut host = UnixStream::connect(g.path("")).unwrap();
    host.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = g.expect(Op::Request);
    g.send(&from_guest(Op::Rst, 99, req.src_port), &[]);
    g.host_eof(&mut host);
    assert_eq!(g.connections(), 0);
    assert!(g.inbox.is_empty(), "a RST is not answered");
}

#[test]
fn guest_connects_to_a_host_listener_and_the_host_closes() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(16);
    let (_listener, mut host) = g.guest_connect(5000);
    g.send(&from_guest(Op::Rw, 5000, 1234), b"ping");
    assert_eq!(g.host_read(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let (_, data) = g.expect(Op::Rw);
    assert_eq!(data, b"pong");
    host.write_all(b"last words").unwrap();
    drop(host);
    let (_, data) = g.expect(Op::Rw);
    assert_eq!(data, b"last words");
    let (sd, _) = g.expect(Op::Shutdown);
    assert_eq!(sd.flags, SHUTDOWN_BOTH);
    assert_eq!(g.connections(), 1, "waits for the guest's RST");
    g.send(&from_guest(Op::Rst, 5000, 1234), &[]);
    assert_eq!(g.connections(), 0);
    assert!(g.inbox.is_empty());
}

#[test]
fn guest_connections_to_nobody_are_reset() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(4);
    g.send(&from_guest(Op::Request, 5000, 4321), &[]);
    let (rst, _) = g.expect(Op::Rst);
    assert_eq!((rst.src_port, rst.dst_port), (4321, 5000));
    assert_eq!(g.metrics().connections_refused.load(Ordering::Relaxed), 1);
}

#[test]
fn no_rx_buffers_means_no_reading_and_no_spinning() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.repost_rx = false;
    g.post_rx(1);
    let (_listener, mut host) = g.guest_connect(5000);
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    host.set_nonblocking(false).unwrap();
    host.write_all(&blob).unwrap();
    g.pump();
    // The socket is readable, but the device has nowhere to put the data: the loop is idle.
    assert_eq!(g.events.run_with_timeout(50).unwrap(), 0);
    assert_eq!(g.metrics().rx_packets.load(Ordering::Relaxed), 1);

    // Buffers arrive: data flows up to the guest's 64 KiB credit, then a CREDIT_REQUEST.
    g.repost_rx = true;
    g.post_rx(8);
    g.pump();
    let mut got = Vec::new();
    while let Some((h, p)) = g.inbox.pop_front() {
        match h.op() {
            Some(Op::Rw) => got.extend_from_slice(&p),
            Some(Op::CreditRequest) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got.len(), 64 << 10);
    assert_eq!(
        g.events.run_with_timeout(50).unwrap(),
        0,
        "no spinning without credit"
    );
    // The guest's application read everything.
    let mut upd = from_guest(Op::CreditUpdate, 5000, 1234);
    upd.fwd_cnt = got.len() as u32;
    g.send(&upd, &[]);
    g.until("the rest", |g| {
        while let Some((_, p)) = g.inbox.pop_front() {
            got.extend_from_slice(&p);
        }
        got.len() == blob.len()
    });
    assert_eq!(got, blob);
}

#[test]
fn large_transfers_both_ways_respect_credit() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(64);
    let (_listener, mut host) = g.guest_connect(5000);
    let blob: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(7) % 253) as u8)
        .collect();

    // Guest to host: the guest sends only what our credit allows; the host reads slowly.
    let (mut our_buf_alloc, mut our_fwd_cnt) = (TX_BUF_SIZE, 0u32);
    let mut sent = 0usize;
    let mut received = Vec::new();
    host.set_nonblocking(true).unwrap();
    g.until("guest-to-host transfer", |g| {
        let credit = our_buf_alloc as usize - (sent - our_fwd_cnt as usize);
        let n = credit.min(blob.len() - sent).min(32 << 10);
        if n > 0 {
            g.send(&from_guest(Op::Rw, 5000, 1234), &blob[sent..sent + n]);
            sent += n;
        }
        let mut buf = [0u8; 7000];
        if let Ok(k) = host.read(&mut buf) {
            received.extend_from_slice(&buf[..k]);
        }
        g.pump();
        while let Some((h, _)) = g.inbox.pop_front() {
            assert_ne!(h.op(), Some(Op::Rst), "the device reset the connection");
            (our_buf_alloc, our_fwd_cnt) = (h.buf_alloc, h.fwd_cnt);
        }
        received.len() == blob.len()
    });
    assert_eq!(received, blob);

    // Host to guest with a 16 KiB guest buffer: in flight never exceeds it.
    let buf_alloc = 16 << 10;
    let mut upd = from_guest(Op::CreditUpdate, 5000, 1234);
    upd.buf_alloc = buf_alloc;
    upd.fwd_cnt = 0;
    g.send(&upd, &[]);
    let mut got = Vec::new();
    let mut written = 0usize;
    let mut fwd_cnt = 0u32;
    g.until("host-to-guest transfer", |g| {
        if written < blob.len() {
            if let Ok(k) = host.write(&blob[written..]) {
                written += k;
            }
        }
        g.pump();
        while let Some((h, p)) = g.inbox.pop_front() {
            got.extend_from_slice(&p);
            assert!(
                got.len() - fwd_cnt as usize <= buf_alloc as usize,
                "credit exceeded"
            );
            if h.op() == Some(Op::CreditRequest)
                || got.len() - fwd_cnt as usize == buf_alloc as usize
            {
                // The application reads it all and the guest says so.
                fwd_cnt = got.len() as u32;
                let mut upd = from_guest(Op::CreditUpdate, 5000, 1234);
                (upd.buf_alloc, upd.fwd_cnt) = (buf_alloc, fwd_cnt);
                g.queue_tx(&upd, &[]);
                g.kick(TX_QUEUE);
            }
        }
        got.len() == blob.len()
    });
    assert_eq!(got, blob);
}

#[test]
fn malformed_guest_traffic_is_answered_or_dropped() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(8);
    // A chain shorter than a header: dropped.
    let head = g.rings[TX_QUEUE].next_head();
    g.rings[TX_QUEUE].publish(&[(TX_HDR + u64::from(head) * 0x100, 20, 0)]);
    // Buffers outside guest memory.
    g.rings[TX_QUEUE].publish(&[(0xffff_ffff_0000, 44, 0)]);
    g.kick(TX_QUEUE);
    g.pump();
    assert_eq!(
        g.rings[TX_QUEUE].take_used().len(),
        2,
        "returned to the guest"
    );
    assert_eq!(g.metrics().malformed.load(Ordering::Relaxed), 2);
    assert!(g.inbox.is_empty());
    // A length longer than the buffers, and a packet for another CID: answered with RST.
    let mut h = from_guest(Op::Rw, 5000, 1234);
    h.len = 1000;
    let head = g.rings[TX_QUEUE].next_head();
    let hdr = TX_HDR + u64::from(head) * 0x100;
    mem.write_slice(&h.to_bytes(), GuestAddress(hdr)).unwrap();
    g.rings[TX_QUEUE].publish(&[(hdr, 44, 0), (TX_DATA, 10, 0)]);
    g.kick(TX_QUEUE);
    g.pump();
    g.expect(Op::Rst);
    let mut h = from_guest(Op::Request, 5000, 1234);
    h.dst_cid = 77;
    g.send(&h, &[]);
    g.expect(Op::Rst);
    assert_eq!(g.metrics().protocol_errors.load(Ordering::Relaxed), 2);

    // RX buffers the device cannot use are returned empty; the packet waits for a good one.
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.repost_rx = false;
    g.rings[RX_QUEUE].publish(&[(RX_BUF, 10, F_WRITE)]);
    g.rings[RX_QUEUE].publish(&[(0xffff_ffff_0000, 100, F_WRITE)]);
    g.send(&from_guest(Op::Rw, 1, 2), &[]);
    assert_eq!(g.empty_rx, [0, 1]);
    assert_eq!(g.metrics().malformed.load(Ordering::Relaxed), 2);
    g.post_rx(1);
    g.expect(Op::Rst);
}

#[test]
fn resets_wait_for_rx_buffers_without_losing_tx_packets() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.repost_rx = false;
    for port in 0..200 {
        g.queue_tx(&from_guest(Op::Rw, port, 1), &[]);
    }
    g.kick(TX_QUEUE);
    g.pump();
    let taken = g.rings[TX_QUEUE].take_used().len();
    assert_eq!(
        taken,
        super::unix_backend::MAX_PENDING_RESETS,
        "the rest wait in the queue"
    );
    g.repost_rx = true;
    g.post_rx(32);
    g.until("every RST", |g| {
        g.rings[TX_QUEUE].take_used();
        g.inbox.len() == 200
    });
    let ports: Vec<u32> = g.inbox.iter().map(|(h, _)| h.dst_port).collect();
    assert_eq!(ports, (0..200).collect::<Vec<_>>(), "in order");
    assert!(g.inbox.iter().all(|(h, _)| h.op() == Some(Op::Rst)));
}

#[test]
fn restore_resets_the_guest_transport() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(8);
    let (_listener, mut host) = g.guest_connect(5000);
    // The guest keeps event buffers posted.
    g.rings[EVENT_QUEUE].publish(&[(EVT_BUF, 4, F_WRITE)]);
    mem.write_obj(0xffff_ffffu32, GuestAddress(EVT_BUF))
        .unwrap();
    let state = g.dev.lock().unwrap().save_state();
    assert_eq!(state.guest_cid, GUEST_CID);
    assert!(state.base.activated);
    let json = serde_json::to_string(&state).unwrap();
    assert_eq!(serde_json::from_str::<VsockState>(&json).unwrap(), state);

    // The source goes away with its connections.
    let Harness {
        rings,
        dir,
        dev,
        events,
        ..
    } = g;
    drop(events);
    drop(dev);
    let uds = dir.as_path().join("v2.sock");
    let mut dev = new_device(uds.clone());
    let mut other = state.clone();
    other.guest_cid = 2;
    assert!(
        dev.restore_state(&other, mem.clone()).is_err(),
        "cid 2 is the host's"
    );
    dev.restore_state(&state, mem.clone()).unwrap();
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut g = Harness::with_device(&mem, dev, rings, dir, uds);
    g.host_eof(&mut host);
    g.until("the reset event", |g| {
        !g.rings[EVENT_QUEUE].take_used().is_empty()
    });
    assert_eq!(mem.read_obj::<u32>(GuestAddress(EVT_BUF)).unwrap(), 0);
    assert_eq!(g.metrics().events_sent.load(Ordering::Relaxed), 1);
    // The queues carry on from where they were.
    drop(_listener);
    let (_l, _s) = g.guest_connect(5001);
}

#[test]
fn device_reset_closes_host_sockets_and_stops_listening() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(8);
    let (_listener, mut host) = g.guest_connect(5000);
    g.dev.lock().unwrap().reset();
    g.host_eof(&mut host);
    assert_eq!(g.connections(), 0);
    let mut late = UnixStream::connect(g.path("")).unwrap();
    late.write_all(b"CONNECT 52\n").unwrap();
    g.pump();
    assert!(g.inbox.is_empty(), "nothing reaches a reset device");
    assert_eq!(g.events.run_with_timeout(50).unwrap(), 0);
}

#[test]
fn a_runaway_available_index_breaks_the_device_instead_of_hanging_the_loop() {
    for queue in [TX_QUEUE, RX_QUEUE] {
        let mem = memory();
        let mut g = Harness::new(&mem);
        // RX work that waits for buffers: the reset answering a connection to nobody.
        g.queue_tx(&from_guest(Op::Request, 7, 9999), &[]);
        g.kick(TX_QUEUE);
        g.pump();
        g.rings[queue].vq.avail().idx().store(u16::to_le(500));
        g.kick(queue);
        g.pump();
        assert!(
            g.dev.lock().unwrap().base().is_broken(),
            "queue {queue}: the device stops"
        );
    }
}

#[test]
fn handed_over_connections_go_on_without_a_reset() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(8);
    let (_listener, mut host) = g.guest_connect(5000);
    g.send(&from_guest(Op::Rw, 5000, 1234), b"before");
    assert_eq!(g.host_read(&mut host, 6), b"before");
    g.rings[EVENT_QUEUE].publish(&[(EVT_BUF, 4, F_WRITE)]);
    let state = g.dev.lock().unwrap().save_state();
    let handed = g.dev.lock().unwrap().hand_over_connections().unwrap();
    assert_eq!(handed.len(), 1);
    assert_eq!(
        (handed[0].0.local_port, handed[0].0.peer_port),
        (1234, 5000)
    );

    // The source goes away; its socket descriptors close, the handed-over ones stay.
    let Harness {
        rings,
        dir,
        dev,
        events,
        ..
    } = g;
    drop(events);
    drop(dev);
    let uds = dir.as_path().join("v2.sock");

    // A state that claims more queued bytes than the credit allows is refused.
    let mut bad = handed[0].0.clone();
    bad.tx_data = vec![0; TX_BUF_SIZE as usize + 1];
    let stream = handed[0].1.try_clone().unwrap();
    let mut dev = new_device(dir.as_path().join("v3.sock"));
    dev.use_handed_connections(vec![(bad, stream)]);
    assert!(dev.restore_state(&state, mem.clone()).is_err());

    let mut dev = new_device(uds.clone());
    dev.use_handed_connections(handed);
    dev.restore_state(&state, mem.clone()).unwrap();
    let mut g = Harness::with_device(&mem, dev, rings, dir, uds);
    assert_eq!(g.connections(), 1);
    // Both directions go on, on the same ports.
    g.send(&from_guest(Op::Rw, 5000, 1234), b"after");
    assert_eq!(g.host_read(&mut host, 5), b"after");
    host.write_all(b"back").unwrap();
    let (h, payload) = g.expect(Op::Rw);
    assert_eq!(
        (h.src_port, h.dst_port, payload.as_slice()),
        (1234, 5000, &b"back"[..])
    );
    assert!(
        g.rings[EVENT_QUEUE].take_used().is_empty(),
        "no transport reset"
    );
    assert_eq!(g.metrics().events_sent.load(Ordering::Relaxed), 0);
}

/// Guest bytes the host program had not taken yet at the switch go with the connection, and
/// reach it once, in order, from the destination.
#[test]
fn guest_bytes_queued_for_a_slow_host_are_handed_over_whole() {
    let mem = memory();
    let mut g = Harness::new(&mem);
    g.post_rx(8);
    let (_listener, mut host) = g.guest_connect(5000);
    // The host program reads nothing: its socket fills and the device queues the rest.
    let blob: Vec<u8> = (0..(TX_BUF_SIZE - 1024))
        .map(|i| (i.wrapping_mul(13) % 251) as u8)
        .collect();
    for chunk in blob.chunks(32 << 10) {
        g.send(&from_guest(Op::Rw, 5000, 1234), chunk);
    }
    let key = super::connection::ConnKey {
        local_port: 1234,
        peer_port: 5000,
    };
    let queued = g
        .dev
        .lock()
        .unwrap()
        .backend
        .connection(key)
        .unwrap()
        .buffered();
    assert!(queued > 0, "the host socket took everything");
    let state = g.dev.lock().unwrap().save_state();
    let handed = g.dev.lock().unwrap().hand_over_connections().unwrap();
    assert_eq!(handed[0].0.tx_data.len(), queued);
    let Harness {
        rings,
        dir,
        dev,
        events,
        ..
    } = g;
    drop(events);
    drop(dev);
    let uds = dir.as_path().join("v2.sock");
    let mut dev = new_device(uds.clone());
    dev.use_handed_connections(handed);
    dev.restore_state(&state, mem.clone()).unwrap();
    let mut g = Harness::with_device(&mem, dev, rings, dir, uds);
    // The host reads now: everything the guest sent, once.
    let got = g.host_read(&mut host, blob.len());
    assert_eq!(got, blob);
    host.set_nonblocking(true).unwrap();
    g.pump();
    assert!(
        matches!(host.read(&mut [0u8; 16]), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "nothing more"
    );
}
