use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const SIZE: u16 = 16;
const BUF: u64 = 0x1_0000;
const MRG: bool = true;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn linked(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A frame of `len` bytes, header included, with a recognisable payload.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    f[..VNET_HDR_LEN].fill(0);
    f
}

/// Where the queues' used rings go. (The mock puts its used ring right after the first half
/// of the available ring: `SplitQueueRing::end` counts elements as bytes, so the two overlap.)
const USED: u64 = 0x8000;

/// A queue on the mock's descriptor table and available ring, with its own used ring.
fn queue(vq: &MockSplitQueue<GuestMemoryMmap>) -> Queue {
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q
}

fn used_idx(m: &GuestMemoryMmap) -> u16 {
    m.read_obj(GuestAddress(USED + 2)).unwrap()
}

fn used_entry(m: &GuestMemoryMmap, slot: u16) -> (u32, u32) {
    let at = USED + 4 + 8 * u64::from(slot);
    (
        m.read_obj(GuestAddress(at)).unwrap(),
        m.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

fn used(m: &GuestMemoryMmap) -> Vec<(u32, u32)> {
    (0..used_idx(m)).map(|i| used_entry(m, i % SIZE)).collect()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// Adds receive chains of one writable buffer each, at descriptor `first` onwards.
fn post(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, bufs: &[(u64, u32)]) {
    let descs: Vec<_> = bufs.iter().map(|&(a, l)| desc(a, l, F_WRITE)).collect();
    vq.add_desc_chains(&descs, first).unwrap();
}

/// Puts chain heads into the available ring.
fn make_available(vq: &MockSplitQueue<GuestMemoryMmap>, heads: &[u16]) {
    let idx = vq.avail().idx().load();
    for (k, &head) in heads.iter().enumerate() {
        let slot = (usize::from(idx) + k) % usize::from(SIZE);
        vq.avail().ring().ref_at(slot).unwrap().store(head);
    }
    vq.avail().idx().store(idx + heads.len() as u16);
}

// ---- transmit ----

#[test]
fn tx_frame_is_gathered_from_every_descriptor_in_order() {
    let m = mem();
    let f = frame(1000, 1);
    m.write_slice(&f[..12], GuestAddress(BUF)).unwrap();
    m.write_slice(&f[12..500], GuestAddress(BUF + 0x1000))
        .unwrap();
    m.write_slice(&f[500..], GuestAddress(BUF + 0x3000))
        .unwrap();
    let vq = MockSplitQueue::new(&m, SIZE);
    let chain = vq
        .build_desc_chain(&[
            desc(BUF, 12, 0),
            desc(BUF + 0x1000, 488, 0),
            desc(BUF + 0x2000, 0, 0),
            desc(BUF + 0x3000, 500, 0),
        ])
        .unwrap();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    assert_eq!(read_tx_frame(chain, &m, &mut buf), Ok(1000));
    assert_eq!(&buf[..1000], &f[..]);
}

/// Sends a chain through [`send_tx_frame`] to a socket stand-in for the tap; returns what the
/// function said and the datagram the host end got.
fn send_through_socket(
    m: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    acked: u64,
) -> (Result<usize, BadChain>, Option<Vec<u8>>) {
    let (tap, host) = Tap::socket_pair();
    let vq = MockSplitQueue::new(m, SIZE);
    let chain = vq.build_desc_chain(descs).unwrap();
    let mut bounce = vec![0u8; MAX_FRAME_LEN];
    let said = send_tx_frame(chain, m, &tap, acked, &mut bounce).map(|(len, sent)| {
        assert_eq!(sent.unwrap(), len, "the whole frame in one write");
        len
    });
    let mut got = vec![0u8; MAX_FRAME_LEN];
    let received = host.recv(&mut got).ok().map(|n| got[..n].to_vec());
    (said, received)
}

/// A frame of `len` bytes whose vnet header uses every field but the offload flags (which
/// the check looks at), so a header mangled on its way out shows.
fn frame_with_full_header(len: usize, seed: u8) -> Vec<u8> {
    let mut f = frame(len, seed);
    f[1] = VIRTIO_NET_HDR_GSO_NONE as u8;
    for (i, b) in f[2..VNET_HDR_LEN].iter_mut().enumerate() {
        *b = 0x40 + i as u8;
    }
    f
}

#[test]
fn tx_frames_are_sent_straight_from_guest_memory() {
    let m = mem();
    let f = frame_with_full_header(1000, 5);
    // The header split over two buffers, an empty one, and the rest in two more.
    m.write_slice(&f[..5], GuestAddress(BUF)).unwrap();
    m.write_slice(&f[5..500], GuestAddress(BUF + 0x1000))
        .unwrap();
    m.write_slice(&f[500..], GuestAddress(BUF + 0x3000))
        .unwrap();
    let descs = [
        desc(BUF, 5, 0),
        desc(BUF + 0x1000, 495, 0),
        desc(BUF + 0x2000, 0, 0),
        desc(BUF + 0x3000, 500, 0),
    ];
    assert_eq!(send_through_socket(&m, &descs, 0), (Ok(1000), Some(f)));
}

#[test]
fn tx_frames_in_one_mapping_need_no_bounce_buffer() {
    let m = mem();
    let f = frame_with_full_header(1500, 6);
    m.write_slice(&f, GuestAddress(BUF)).unwrap();
    let (tap, host) = Tap::socket_pair();
    let vq = MockSplitQueue::new(&m, SIZE);
    let chain = vq
        .build_desc_chain(&[desc(BUF, 7, 0), desc(BUF + 7, 1493, 0)])
        .unwrap();
    // No room at all to bounce through: a copy would fail with TooLong.
    let (len, sent) = send_tx_frame(chain, &m, &tap, 0, &mut []).unwrap();
    assert_eq!((len, sent.unwrap()), (1500, 1500));
    let mut got = vec![0u8; 2000];
    let n = host.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
}

#[test]
fn tx_buffers_across_memory_regions_go_through_the_bounce_buffer() {
    // Two regions back to back: a buffer over the boundary is not one mapping.
    let m = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 1 << 20),
        (GuestAddress(1 << 20), 1 << 20),
    ])
    .unwrap();
    let f = frame(3000, 9);
    let at = (1u64 << 20) - 1000;
    m.write_slice(&f, GuestAddress(at)).unwrap();
    let (said, got) = send_through_socket(&m, &[desc(at, 3000, 0)], 0);
    assert_eq!((said, got), (Ok(3000), Some(f)));
    // The header's offloads are checked on that path too.
    let mut offload = frame(100, 1);
    offload[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    m.write_slice(&offload, GuestAddress((1 << 20) - 50))
        .unwrap();
    let (said, got) = send_through_socket(&m, &[desc((1 << 20) - 50, 100, 0)], 0);
    assert_eq!((said, got), (Err(BadChain::UnnegotiatedOffload), None));
}

#[test]
fn tx_headers_are_checked_once_copied_out() {
    let m = mem();
    let mut f = frame_with_full_header(200, 3);
    f[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    m.write_slice(&f, GuestAddress(BUF)).unwrap();
    let descs = [desc(BUF, 7, 0), desc(BUF + 7, 193, 0)];
    assert_eq!(
        send_through_socket(&m, &descs, 0),
        (Err(BadChain::UnnegotiatedOffload), None)
    );
    let csum = feature(VIRTIO_NET_F_CSUM);
    assert_eq!(send_through_socket(&m, &descs, csum), (Ok(200), Some(f)));
}

#[test]
fn malformed_tx_chains_are_refused() {
    let m = mem();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let cases: Vec<(Vec<RawDescriptor>, BadChain)> = vec![
        (vec![desc(BUF, 64, F_WRITE)], BadChain::WrongDirection),
        (
            vec![desc(BUF, 12, 0), desc(BUF + 64, 64, F_WRITE)],
            BadChain::WrongDirection,
        ),
        (vec![desc(0xffff_0000_0000, 64, 0)], BadChain::OutsideMemory),
        (vec![desc((1 << 20) - 8, 64, 0)], BadChain::OutsideMemory),
        (vec![desc(BUF, 11, 0)], BadChain::TooShort),
        (vec![desc(BUF, 0, 0)], BadChain::TooShort),
        (
            vec![desc(BUF, MAX_FRAME_LEN as u32 + 1, 0)],
            BadChain::TooLong,
        ),
        (
            vec![desc(BUF, 60_000, 0), desc(BUF, 6_000, 0)],
            BadChain::TooLong,
        ),
        (
            vec![desc(BUF, u32::MAX, 0), desc(BUF, 2, 0)],
            BadChain::TooLong,
        ),
    ];
    for (descs, want) in cases {
        let vq = MockSplitQueue::new(&m, SIZE);
        let chain = vq.build_desc_chain(&descs).unwrap();
        assert_eq!(read_tx_frame(chain, &m, &mut buf), Err(want), "{descs:?}");
        // Sending refuses them the same way, and sends nothing.
        assert_eq!(
            send_through_socket(&m, &descs, 0),
            (Err(want), None),
            "{descs:?}"
        );
    }
}

#[test]
fn looping_and_dangling_tx_chains_are_refused() {
    let m = mem();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    // 0 -> 1 -> 0 -> ...: the iterator gives up after SIZE steps.
    let vq = MockSplitQueue::new(&m, SIZE);
    vq.add_desc_chains(&[linked(BUF, 1, F_NEXT, 1), linked(BUF, 1, F_NEXT, 0)], 0)
        .unwrap();
    let mut q = queue(&vq);
    let chain = next_chain(&mut q, &m).unwrap().unwrap();
    assert_eq!(read_tx_frame(chain, &m, &mut buf), Err(BadChain::Broken));
    // A next index beyond the table.
    let vq = MockSplitQueue::new(&m, SIZE);
    vq.add_desc_chains(&[linked(BUF, 20, F_NEXT, 200)], 0)
        .unwrap();
    let mut q = queue(&vq);
    let chain = next_chain(&mut q, &m).unwrap().unwrap();
    assert_eq!(read_tx_frame(chain, &m, &mut buf), Err(BadChain::Broken));
    // An indirect table of 300 linked empty buffers: more than any frame needs.
    let table = 0x8_0000u64;
    for i in 0..300u16 {
        let d = if i < 299 {
            linked(BUF, 0, F_NEXT, i + 1)
        } else {
            desc(BUF, 12, 0)
        };
        m.write_obj(d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }
    let vq = MockSplitQueue::new(&m, SIZE);
    vq.add_desc_chains(&[desc(table, 300 * 16, 4)], 0).unwrap();
    let mut q = queue(&vq);
    let chain = next_chain(&mut q, &m).unwrap().unwrap();
    assert_eq!(
        read_tx_frame(chain, &m, &mut buf),
        Err(BadChain::TooManyDescriptors)
    );
    // A head index beyond the table: no descriptor at all.
    let vq = MockSplitQueue::new(&m, SIZE);
    vq.add_desc_chains(&[desc(BUF, 20, 0)], 0).unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(999);
    let mut q = queue(&vq);
    let chain = next_chain(&mut q, &m).unwrap().unwrap();
    assert_eq!(read_tx_frame(chain, &m, &mut buf), Err(BadChain::Broken));
}

#[test]
fn tx_headers_may_only_use_negotiated_offloads() {
    let csum = feature(VIRTIO_NET_F_CSUM);
    let tso4 = feature(VIRTIO_NET_F_HOST_TSO4);
    let tso6 = feature(VIRTIO_NET_F_HOST_TSO6);
    let hdr = |flags: u32, gso: u32| {
        let mut h = vec![0u8; 64];
        h[0] = flags as u8;
        h[1] = gso as u8;
        h
    };
    assert_eq!(check_tx_header(&hdr(0, 0), 0), Ok(()));
    assert_eq!(
        check_tx_header(&hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0), csum),
        Ok(())
    );
    assert_eq!(
        check_tx_header(&hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0), 0),
        Err(BadChain::UnnegotiatedOffload)
    );
    let tcp4 = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
    assert_eq!(check_tx_header(&tcp4, csum | tso4), Ok(()));
    assert_eq!(
        check_tx_header(&tcp4, csum | tso6),
        Err(BadChain::UnnegotiatedOffload)
    );
    let tcp6 = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6);
    assert_eq!(check_tx_header(&tcp6, csum | tso6), Ok(()));
    let all = csum | tso4 | tso6;
    for gso in [3u32, 5, 0x81, 0x84, 200] {
        assert_eq!(
            check_tx_header(&hdr(1, gso), all),
            Err(BadChain::UnnegotiatedOffload)
        );
    }
    assert_eq!(check_tx_header(&[0u8; 4], all), Err(BadChain::TooShort));
}

// ---- receive header ----

#[test]
fn rx_header_follows_what_the_driver_accepted() {
    let guest_csum = feature(VIRTIO_NET_F_GUEST_CSUM);
    let tso4 = feature(VIRTIO_NET_F_GUEST_TSO4);
    let tso6 = feature(VIRTIO_NET_F_GUEST_TSO6);
    let mut f = frame(100, 0);
    f[0] = 2; // DATA_VALID
    assert_eq!(prepare_rx_header(&mut f, 0), Ok(()));
    assert_eq!(f[0], 0, "flags must be zero without GUEST_CSUM");
    f[0] = 2;
    assert_eq!(prepare_rx_header(&mut f, guest_csum), Ok(()));
    assert_eq!(f[0], 2);
    f[0] = 1; // NEEDS_CSUM
    assert_eq!(prepare_rx_header(&mut f, 0), Err(FrameDrop::Offload));
    f[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    assert_eq!(
        prepare_rx_header(&mut f, guest_csum | tso6),
        Err(FrameDrop::Offload)
    );
    assert_eq!(prepare_rx_header(&mut f, guest_csum | tso4), Ok(()));
    f[1] = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
    assert_eq!(prepare_rx_header(&mut f, guest_csum | tso6), Ok(()));
    f[1] = 3; // UDP
    assert_eq!(
        prepare_rx_header(&mut f, guest_csum | tso4 | tso6),
        Err(FrameDrop::Offload)
    );
    assert_eq!(
        prepare_rx_header(&mut [0u8; 11], guest_csum),
        Err(FrameDrop::Runt)
    );
}

// ---- receive ----

struct Rx<'a> {
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    q: Queue,
    m: &'a GuestMemoryMmap,
}

impl<'a> Rx<'a> {
    fn new(m: &'a GuestMemoryMmap) -> Self {
        let vq = MockSplitQueue::new(m, SIZE);
        let q = queue(&vq);
        m.write_obj(0u32, GuestAddress(USED)).unwrap();
        Rx { vq, q, m }
    }

    /// Delivers one frame and publishes; returns the outcome and the bad buffers counted.
    fn deliver(&mut self, f: &[u8], mergeable: bool) -> (Delivery, u64) {
        let mut f = f.to_vec();
        let mut batch = UsedBatch::default();
        let mut bad = 0;
        let d =
            deliver_frame(&mut self.q, self.m, &mut f, mergeable, &mut batch, &mut bad).unwrap();
        batch.finish(&mut self.q, self.m).unwrap();
        (d, bad)
    }
}

fn num_buffers(m: &GuestMemoryMmap, addr: u64) -> u16 {
    let b = read(m, addr + 10, 2);
    u16::from_le_bytes([b[0], b[1]])
}

#[test]
fn one_chain_takes_a_whole_frame_without_mrg_rxbuf() {
    let m = mem();
    let mut rx = Rx::new(&m);
    // A chain of two buffers: the header may straddle them.
    rx.vq
        .add_desc_chains(
            &[
                linked(BUF, 8, F_WRITE | F_NEXT, 1),
                desc(BUF + 0x1000, 2000, F_WRITE),
            ],
            0,
        )
        .unwrap();
    let mut f = frame(1514 + 12, 3);
    f[10] = 0xaa; // stale num_buffers from the tap
    assert_eq!(rx.deliver(&f, !MRG), (Delivery::Delivered(1), 0));
    assert_eq!(used(&m), vec![(0, 1526)]);
    let mut got = read(&m, BUF, 8);
    got.extend(read(&m, BUF + 0x1000, 1518));
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
}

#[test]
fn a_frame_too_big_for_a_lone_chain_is_dropped_and_the_chain_kept() {
    let m = mem();
    let mut rx = Rx::new(&m);
    post(&rx.vq, 0, &[(BUF, 1000)]);
    assert_eq!(
        rx.deliver(&frame(1200, 0), !MRG),
        (Delivery::Dropped(FrameDrop::TooBig), 0)
    );
    assert_eq!(rx.q.next_avail(), 0, "the chain was put back");
    assert!(used(&m).is_empty());
    assert_eq!(
        rx.deliver(&frame(900, 0), !MRG),
        (Delivery::Delivered(1), 0)
    );
    assert_eq!(used(&m), vec![(0, 900)]);
}

#[test]
fn mrg_rxbuf_splits_a_frame_across_buffers_and_publishes_it_whole() {
    let m = mem();
    let mut rx = Rx::new(&m);
    post(
        &rx.vq,
        0,
        &[
            (BUF, 512),
            (BUF + 0x1000, 512),
            (BUF + 0x2000, 512),
            (BUF + 0x3000, 512),
        ],
    );
    let f = frame(1300, 9);
    let mut copy = f.clone();
    let mut batch = UsedBatch::default();
    let mut bad = 0;
    let d = deliver_frame(&mut rx.q, &m, &mut copy, MRG, &mut batch, &mut bad).unwrap();
    assert_eq!(d, Delivery::Delivered(3));
    assert_eq!(
        used_idx(&m),
        0,
        "nothing visible before the batch is published"
    );
    batch.finish(&mut rx.q, &m).unwrap();
    assert_eq!(used(&m), vec![(0, 512), (1, 512), (2, 276)]);
    assert_eq!(num_buffers(&m, BUF), 3);
    let mut got = read(&m, BUF, 512);
    got.extend(read(&m, BUF + 0x1000, 512));
    got.extend(read(&m, BUF + 0x2000, 276));
    assert_eq!(&got[12..], &f[12..]);
    // The fourth buffer is still available for the next frame.
    assert_eq!(rx.deliver(&frame(100, 1), MRG), (Delivery::Delivered(1), 0));
    assert_eq!(num_buffers(&m, BUF + 0x3000), 1);
}

#[test]
fn without_enough_buffers_nothing_is_consumed_and_order_is_kept() {
    let m = mem();
    let mut rx = Rx::new(&m);
    post(&rx.vq, 0, &[(BUF, 256), (BUF + 0x1000, 256)]);
    let f = frame(1000, 5);
    assert_eq!(rx.deliver(&f, MRG), (Delivery::NoBuffers, 0));
    assert_eq!(rx.q.next_avail(), 0);
    assert!(used(&m).is_empty());
    post(&rx.vq, 2, &[(BUF + 0x2000, 256), (BUF + 0x3000, 256)]);
    assert_eq!(rx.deliver(&f, MRG), (Delivery::Delivered(4), 0));
    assert_eq!(used(&m), vec![(0, 256), (1, 256), (2, 256), (3, 232)]);
}

#[test]
fn a_frame_bigger_than_the_whole_ring_is_dropped() {
    let m = mem();
    let mut rx = Rx::new(&m);
    let bufs: Vec<_> = (0..SIZE)
        .map(|i| (BUF + 0x100 * u64::from(i), 64))
        .collect();
    post(&rx.vq, 0, &bufs);
    assert_eq!(
        rx.deliver(&frame(2000, 0), MRG),
        (Delivery::Dropped(FrameDrop::TooBig), 0)
    );
    assert_eq!(rx.q.next_avail(), 0);
    assert_eq!(rx.deliver(&frame(100, 0), MRG), (Delivery::Delivered(2), 0));
}

#[test]
fn malformed_rx_chains_go_back_empty_and_the_frame_takes_the_next_good_one() {
    let m = mem();
    for mergeable in [false, true] {
        let mut rx = Rx::new(&m);
        let table = [
            desc(BUF, 2000, 0),                    // 0: device-readable
            desc(0xffff_0000_0000, 2000, F_WRITE), // 1: outside memory
            desc((1 << 20) - 100, 2000, F_WRITE),  // 2: runs off the end of memory
            desc(BUF, 11, F_WRITE),                // 3: no room for the header
            linked(BUF, 100, F_WRITE | F_NEXT, 4), // 4: loops on itself
            linked(BUF, 100, F_WRITE | F_NEXT, 6), // 5: writable, then readable 6
            desc(BUF + 0x100, 100, 0),
            desc(BUF + 0x1000, 2000, F_WRITE), // 7: good
        ];
        for (i, d) in table.iter().enumerate() {
            rx.vq.desc_table().store(i as u16, *d).unwrap();
        }
        make_available(&rx.vq, &[0, 1, 2, 3, 4, 5, 7]);
        let f = frame(1500, 2);
        let (d, bad) = rx.deliver(&f, mergeable);
        assert_eq!(d, Delivery::Delivered(1));
        assert_eq!(bad, 6);
        let u = used(&m);
        assert_eq!(
            u,
            vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (7, 1500)],
            "mergeable={mergeable}"
        );
        assert_eq!(&read(&m, BUF + 0x1000, 1500)[12..], &f[12..]);
    }
}

#[test]
fn a_bad_chain_between_gathered_buffers_returns_them_all_empty() {
    let m = mem();
    let mut rx = Rx::new(&m);
    rx.vq
        .add_desc_chains(
            &[
                desc(BUF, 256, F_WRITE),
                desc(BUF + 0x1000, 256, 0), // bad
                desc(BUF + 0x2000, 256, F_WRITE),
                desc(BUF + 0x3000, 256, F_WRITE),
            ],
            0,
        )
        .unwrap();
    let (d, bad) = rx.deliver(&frame(400, 0), MRG);
    assert_eq!(d, Delivery::Delivered(2));
    assert_eq!(bad, 2);
    assert_eq!(used(&m), vec![(0, 0), (1, 0), (2, 256), (3, 144)]);
    assert_eq!(num_buffers(&m, BUF + 0x2000), 2);
}

#[test]
fn a_head_outside_the_ring_is_not_returned() {
    let m = mem();
    let mut rx = Rx::new(&m);
    post(&rx.vq, 0, &[(BUF, 2000), (BUF + 0x1000, 2000)]);
    rx.vq.avail().ring().ref_at(0).unwrap().store(999);
    let (d, bad) = rx.deliver(&frame(100, 0), !MRG);
    assert_eq!((d, bad), (Delivery::Delivered(1), 1));
    assert_eq!(used(&m), vec![(1, 100)]);
}

#[test]
fn an_unready_queue_has_no_buffers() {
    let m = mem();
    let mut rx = Rx::new(&m);
    post(&rx.vq, 0, &[(BUF, 2000)]);
    rx.q.set_ready(false);
    assert_eq!(buffers_available(&rx.q, &m), Ok(false));
    assert_eq!(request_buffer_notification(&mut rx.q, &m), Ok(false));
    assert_eq!(rx.deliver(&frame(100, 0), MRG), (Delivery::NoBuffers, 0));
}

// ---- notifications and the used ring ----

fn used_event_addr(vq: &MockSplitQueue<GuestMemoryMmap>) -> GuestAddress {
    vq.avail_addr().unchecked_add(4 + 2 * u64::from(SIZE))
}

fn avail_event(m: &GuestMemoryMmap) -> u16 {
    m.read_obj(GuestAddress(USED + 4 + 8 * u64::from(SIZE)))
        .unwrap()
}

#[test]
fn waiting_for_buffers_asks_to_be_told_of_the_next_one() {
    let m = mem();
    let mut rx = Rx::new(&m);
    rx.q.set_event_idx(true);
    post(&rx.vq, 0, &[(BUF, 100), (BUF + 0x1000, 100)]);
    assert_eq!(rx.deliver(&frame(1000, 0), MRG), (Delivery::NoBuffers, 0));
    assert_eq!(request_buffer_notification(&mut rx.q, &m), Ok(false));
    // The driver is at 2 already: notify when it moves past 2, not past the device's 0.
    assert_eq!(avail_event(&m), 2);
    assert_eq!(rx.q.next_avail(), 0, "the device's position is untouched");
    // Without EVENT_IDX the driver is asked to notify at all (flags cleared).
    rx.q.set_event_idx(false);
    rx.q.disable_notification(&m).unwrap();
    let flags: u16 = m.read_obj(GuestAddress(USED)).unwrap();
    assert_eq!(flags, 1);
    assert_eq!(request_buffer_notification(&mut rx.q, &m), Ok(false));
    let flags: u16 = m.read_obj(GuestAddress(USED)).unwrap();
    assert_eq!(flags, 0);
}

#[test]
fn interrupts_follow_used_event_and_no_interrupt() {
    let m = mem();
    let mut rx = Rx::new(&m);
    rx.q.set_event_idx(true);
    post(
        &rx.vq,
        0,
        &[
            (BUF, 100),
            (BUF + 0x100, 100),
            (BUF + 0x200, 100),
            (BUF + 0x300, 100),
        ],
    );
    let push_two = |rx: &mut Rx, used_event: u16| {
        m.write_obj(used_event, used_event_addr(&rx.vq)).unwrap();
        let mut batch = UsedBatch::default();
        for _ in 0..2 {
            let chain = next_chain(&mut rx.q, &m).unwrap().unwrap();
            batch.push(&mut rx.q, &m, chain.head_index(), 1).unwrap();
        }
        batch.finish(&mut rx.q, &m).unwrap()
    };
    // Entries 0 and 1: the driver wants an interrupt after entry 1 (used_event = 1).
    assert!(push_two(&mut rx, 1));
    // Entries 2 and 3: the driver asked for entry 5; nothing yet.
    assert!(!push_two(&mut rx, 5));

    let mut rx = Rx::new(&m);
    post(
        &rx.vq,
        0,
        &[
            (BUF, 100),
            (BUF + 0x100, 100),
            (BUF + 0x200, 100),
            (BUF + 0x300, 100),
        ],
    );
    assert!(push_two(&mut rx, 0));
    m.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, rx.vq.avail_addr())
        .unwrap();
    assert!(!push_two(&mut rx, 0));
}

#[test]
fn a_batch_larger_than_the_ring_is_published_in_parts() {
    let m = mem();
    let mut rx = Rx::new(&m);
    let mut batch = UsedBatch::default();
    for i in 0..(SIZE + 3) {
        batch.push(&mut rx.q, &m, i % SIZE, u32::from(i)).unwrap();
    }
    assert_eq!(used_idx(&m), SIZE, "the first ring-full went out");
    batch.finish(&mut rx.q, &m).unwrap();
    assert_eq!(used_idx(&m), SIZE + 3);
    assert_eq!(rx.q.next_used(), SIZE + 3);
    assert_eq!(
        used_entry(&m, 1),
        (1, u32::from(SIZE) + 1),
        "entry 17 wrapped to slot 1"
    );
}
