use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress};

use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const A: u64 = 0x1_0000;
const B: u64 = 0x2_0000;
const C: u64 = 0x3_0000;
const OUTSIDE: u64 = 0xffff_ffff_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn rw(len: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1234,
        dst_port: 52,
        len,
        kind: TYPE_STREAM,
        op: Op::Rw as u16,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 7,
    }
}

fn put(m: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    m.write_slice(bytes, GuestAddress(addr)).unwrap();
}

fn read(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<(Header, Vec<u8>), TxError> {
    let vq = MockSplitQueue::new(m, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    let mut payload = vec![0xee; 3];
    read_tx(chain, m, &mut payload).map(|h| (h, payload))
}

#[test]
fn header_layout_is_the_specs() {
    let h = rw(0x0102_0304);
    let b = h.to_bytes();
    assert_eq!(b.len(), 44);
    assert_eq!(&b[0..8], &3u64.to_le_bytes());
    assert_eq!(&b[8..16], &2u64.to_le_bytes());
    assert_eq!(&b[16..20], &1234u32.to_le_bytes());
    assert_eq!(&b[20..24], &52u32.to_le_bytes());
    assert_eq!(&b[24..28], &[4, 3, 2, 1]);
    assert_eq!(&b[28..30], &[1, 0]);
    assert_eq!(&b[30..32], &[5, 0]);
    assert_eq!(&b[36..40], &4096u32.to_le_bytes());
    assert_eq!(&b[40..44], &7u32.to_le_bytes());
    assert_eq!(Header::from_bytes(&b), h);
    for op in 1..=7 {
        assert_eq!(Op::from_raw(op).map(|o| o as u16), Some(op));
    }
    assert_eq!(Op::from_raw(0), None);
    assert_eq!(Op::from_raw(8), None);
    let r = h.rst_reply();
    assert_eq!(
        (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
        (2, 3, 52, 1234)
    );
    assert_eq!(r.op(), Some(Op::Rst));
}

#[test]
fn reads_header_and_payload_however_split() {
    let m = mem();
    let data: Vec<u8> = (0..100u8).collect();
    put(&m, A, &rw(100).to_bytes());
    put(&m, B, &data);
    // Linux's layout: header, then payload.
    let (h, p) = read(&m, &[desc(A, 44, 0), desc(B, 100, 0)]).unwrap();
    assert_eq!(h, rw(100));
    assert_eq!(p, data);

    // One buffer holding both.
    let mut both = rw(100).to_bytes().to_vec();
    both.extend_from_slice(&data);
    put(&m, C, &both);
    let (_, p) = read(&m, &[desc(C, 144, 0)]).unwrap();
    assert_eq!(p, data);

    // The header split in two, the payload over three buffers, longer than needed.
    let (h, p) = read(
        &m,
        &[
            desc(C, 10, 0),
            desc(C + 10, 40, 0),
            desc(C + 50, 30, 0),
            desc(C + 80, 4096, 0),
        ],
    )
    .unwrap();
    assert_eq!(h, rw(100));
    assert_eq!(p, data);
}

#[test]
fn only_rw_packets_carry_a_payload() {
    let m = mem();
    let mut h = rw(5);
    h.op = Op::Shutdown as u16;
    h.flags = SHUTDOWN_BOTH;
    put(&m, A, &h.to_bytes());
    let (got, p) = read(&m, &[desc(A, 44, 0), desc(B, 5, 0)]).unwrap();
    assert_eq!(got, h);
    assert!(p.is_empty());
    // Even with no buffer for the claimed length.
    let (_, p) = read(&m, &[desc(A, 44, 0)]).unwrap();
    assert!(p.is_empty());
    // An unknown operation is returned for the caller to answer.
    h.op = 99;
    put(&m, A, &h.to_bytes());
    assert_eq!(read(&m, &[desc(A, 44, 0)]).unwrap().0.op(), None);
    // An empty RW is fine.
    put(&m, A, &rw(0).to_bytes());
    assert!(read(&m, &[desc(A, 44, 0)]).unwrap().1.is_empty());
}

#[test]
fn malformed_chains_are_refused() {
    let m = mem();
    put(&m, A, &rw(100).to_bytes());
    let no_header = |r: Result<(Header, Vec<u8>), TxError>| matches!(r, Err(TxError::NoHeader(_)));
    let invalid = |r: Result<(Header, Vec<u8>), TxError>| match r {
        Err(TxError::Invalid { header, .. }) => header.src_port == 1234,
        _ => false,
    };
    assert!(no_header(read(&m, &[desc(A, 43, 0)])), "short header");
    assert!(no_header(read(&m, &[desc(A, 20, 0), desc(A + 20, 23, 0)])));
    assert!(
        no_header(read(&m, &[desc(OUTSIDE, 44, 0)])),
        "header outside memory"
    );
    assert!(
        no_header(read(&m, &[desc(A, 44, F_WRITE)])),
        "a device-writable header is not read"
    );
    assert!(
        no_header(read(&m, &[desc((1 << 20) - 20, 44, 0)])),
        "header past the end of memory"
    );
    assert!(invalid(read(&m, &[desc(A, 44, 0)])), "no payload buffer");
    assert!(
        invalid(read(&m, &[desc(A, 44, 0), desc(B, 99, 0)])),
        "payload shorter than len"
    );
    assert!(
        invalid(read(
            &m,
            &[desc(A, 44, 0), desc(B, 50, 0), desc(B, 60, F_WRITE)]
        )),
        "a writable buffer ends the readable part"
    );
    assert!(
        invalid(read(&m, &[desc(A, 44, 0), desc(OUTSIDE, 100, 0)])),
        "payload outside memory"
    );
    put(&m, A, &rw(MAX_PAYLOAD as u32 + 1).to_bytes());
    assert!(
        invalid(read(
            &m,
            &[desc(A, 44, 0), desc(B, 0x10_0000 - B as u32, 0)]
        )),
        "more than 64 KiB"
    );
    put(&m, A, &rw(u32::MAX).to_bytes());
    assert!(invalid(read(&m, &[desc(A, 44, 0), desc(B, u32::MAX, 0)])));
}

#[test]
fn looping_chains_terminate() {
    let m = mem();
    put(&m, A, &rw(4096).to_bytes());
    let vq = MockSplitQueue::new(&m, 16);
    // Descriptor 1 chains to itself: the walk stops at the queue size.
    vq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(A, 44, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(B, 8, F_NEXT, 1)),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.iter(&m).unwrap().next().unwrap();
    let mut payload = Vec::new();
    assert!(matches!(
        read_tx(chain, &m, &mut payload),
        Err(TxError::Invalid { .. })
    ));
    assert!(payload.is_empty(), "nothing kept from a refused packet");

    // An indirect table pointing outside memory yields nothing.
    let vq = MockSplitQueue::new(&m, 16);
    vq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            OUTSIDE, 64, F_INDIRECT, 0,
        ))],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.iter(&m).unwrap().next().unwrap();
    assert!(matches!(
        read_tx(chain, &m, &mut payload),
        Err(TxError::NoHeader(_))
    ));
}

fn rx(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<RxBuffer, &'static str> {
    let vq = MockSplitQueue::new(m, 16);
    RxBuffer::new(vq.build_desc_chain(descs).unwrap(), m)
}

#[test]
fn rx_buffers_hold_header_then_payload() {
    let m = mem();
    let h = rw(0);
    let data: Vec<u8> = (0..200u8).collect();

    // Linux 6.x: one buffer for header and payload.
    let buf = rx(&m, &[desc(A, 44 + 4096, F_WRITE)]).unwrap();
    assert_eq!(buf.payload_room(), 4096);
    assert_eq!(buf.write(&h, &data, &m), Some(244));
    let mut raw = [0u8; 44];
    m.read_slice(&mut raw, GuestAddress(A)).unwrap();
    assert_eq!(Header::from_bytes(&raw).len, 200);
    let mut got = vec![0u8; 200];
    m.read_slice(&mut got, GuestAddress(A + 44)).unwrap();
    assert_eq!(got, data);

    // Older drivers: header and payload apart; read-only buffers are skipped.
    let buf = rx(
        &m,
        &[desc(C, 8, 0), desc(B, 44, F_WRITE), desc(C, 100, F_WRITE)],
    )
    .unwrap();
    assert_eq!(buf.payload_room(), 100);
    assert_eq!(
        buf.write(&h, &data, &m),
        Some(144),
        "payload cut to the room"
    );
    m.read_slice(&mut raw, GuestAddress(B)).unwrap();
    assert_eq!(Header::from_bytes(&raw).len, 100);
    let mut got = vec![0u8; 100];
    m.read_slice(&mut got, GuestAddress(C)).unwrap();
    assert_eq!(got, data[..100]);

    // A header split over buffers.
    let buf = rx(&m, &[desc(A, 30, F_WRITE), desc(B, 30, F_WRITE)]).unwrap();
    assert_eq!(buf.payload_room(), 16);
    assert_eq!(buf.write(&h, &data[..16], &m), Some(60));
    let mut raw2 = [0u8; 44];
    m.read_slice(&mut raw2[..30], GuestAddress(A)).unwrap();
    m.read_slice(&mut raw2[30..], GuestAddress(B)).unwrap();
    assert_eq!(Header::from_bytes(&raw2).len, 16);

    // Huge buffers: the payload is still at most 64 KiB.
    let buf = rx(&m, &[desc(A, 0x8_0000, F_WRITE)]).unwrap();
    assert_eq!(buf.payload_room(), MAX_PAYLOAD);
}

#[test]
fn unusable_rx_buffers_are_refused() {
    let m = mem();
    assert!(
        rx(&m, &[desc(A, 43, F_WRITE)]).is_err(),
        "no room for a header"
    );
    assert!(rx(&m, &[desc(A, 100, 0)]).is_err(), "device-readable only");
    assert!(rx(&m, &[desc(OUTSIDE, 100, F_WRITE)]).is_err());
    assert!(rx(&m, &[desc(A, 44, F_WRITE), desc(OUTSIDE, 100, F_WRITE)]).is_err());
    assert!(
        rx(&m, &[desc((1 << 20) - 10, 44, F_WRITE)]).is_err(),
        "past the end of memory"
    );
}

#[test]
fn events_need_four_writable_bytes() {
    let m = mem();
    put(&m, A, &[0xff; 8]);
    let vq = MockSplitQueue::new(&m, 16);
    let chain = vq.build_desc_chain(&[desc(A, 8, F_WRITE)]).unwrap();
    assert_eq!(write_event(chain, &m, 0), Some(4));
    assert_eq!(m.read_obj::<u32>(GuestAddress(A)).unwrap(), 0);
    let chain = vq.build_desc_chain(&[desc(A, 2, F_WRITE)]).unwrap();
    assert_eq!(write_event(chain, &m, 0), None);
    let chain = vq.build_desc_chain(&[desc(A, 8, 0)]).unwrap();
    assert_eq!(write_event(chain, &m, 0), None);
    let chain = vq.build_desc_chain(&[desc(OUTSIDE, 8, F_WRITE)]).unwrap();
    assert_eq!(write_event(chain, &m, 0), None);
}
