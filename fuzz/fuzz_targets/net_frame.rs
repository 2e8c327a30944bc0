//! Fuzzes virtio-net frame handling with guest-controlled rings: transmit chains are read and
//! their headers checked against fuzzed features, and sent to a socket standing in for the tap
//! straight from guest memory, which must send exactly what the copying read accepts; and a
//! fuzzed frame is delivered into receive chains the input lays out (mergeable buffers or not).

#![no_main]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use libfuzzer_sys::fuzz_target;
use lockstep_devices::virtio::net::frame::{
    check_tx_header, deliver_frame, prepare_rx_header, read_tx_frame, send_tx_frame, UsedBatch,
};
use lockstep_devices::virtio::net::{Tap, MAX_FRAME_LEN};
use lockstep_devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: two regions back to back, so that buffers across the boundary take the
/// transmit path's bounce copy.
const REGION_SIZE: usize = 1 << 19;
const QUEUE_SIZE: u16 = 16;

fn queue_at(base: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
    q.set_ready(true);
    q
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 10 {
        return;
    }
    let acked = u64::from_le_bytes(input[..8].try_into().unwrap());
    let mergeable = input[8] & 1 == 1;
    let rest = &input[9..];
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SIZE),
        (GuestAddress(REGION_SIZE as u64), REGION_SIZE),
    ])
    .unwrap();
    // Two rings (TX at 0x0, RX at 0x10000), each: 16 descriptors, then the available ring; the
    // rest of the input is data from 0x20000 on, where descriptors may point.
    let (tx_ring, rest) = rest.split_at(rest.len().min(292));
    let (rx_ring, rest) = rest.split_at(rest.len().min(292));
    for (ring, base) in [(tx_ring, 0u64), (rx_ring, 0x10000)] {
        let (table, avail) = ring.split_at(ring.len().min(256));
        mem.write_slice(table, GuestAddress(base)).unwrap();
        mem.write_slice(avail, GuestAddress(base + 0x1000)).unwrap();
    }
    mem.write_slice(rest, GuestAddress(0x20000)).unwrap();

    let mut tx = queue_at(0);
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let mut bounce = vec![0u8; MAX_FRAME_LEN];
    let mut got = vec![0u8; MAX_FRAME_LEN + 1];
    let (ours, host) = UnixDatagram::pair().unwrap();
    host.set_nonblocking(true).unwrap();
    // Non-blocking like a tap: a full socket shows up as a failed send, not a hang.
    ours.set_nonblocking(true).unwrap();
    let tap = Tap::from_file(File::from(OwnedFd::from(ours)), "fuzz");
    if let Ok(iter) = tx.iter(&mem) {
        let chains: Vec<_> = iter.collect();
        for chain in chains {
            let read = read_tx_frame(chain.clone(), &mem, &mut buf)
                .and_then(|len| check_tx_header(&buf[..len], acked).map(|()| len));
            let sent = send_tx_frame(chain, &mem, &tap, acked, &mut bounce);
            let received = host.recv(&mut got).ok();
            match (read, sent) {
                (Ok(len), Ok((sent_len, Ok(n)))) => {
                    assert_eq!((sent_len, n, received), (len, len, Some(len)));
                    assert_eq!(&got[..len], &buf[..len], "sent what the copying read saw");
                }
                // Both refuse it, and send nothing.
                (Err(_), Err(_)) => assert_eq!(received, None, "a refused chain sends nothing"),
                (read, sent) => panic!(
                    "read {read:?} but sent {:?}",
                    sent.map(|(l, r)| (l, r.map_err(|e| e.to_string())))
                ),
            }
        }
    }

    let mut rx = queue_at(0x10000);
    let mut frame: Vec<u8> = rest.iter().copied().take(4096).collect();
    frame.resize(frame.len().max(12), 0);
    if prepare_rx_header(&mut frame, acked).is_ok() {
        let mut batch = UsedBatch::default();
        let mut bad = 0u64;
        let _ = deliver_frame(&mut rx, &mem, &mut frame, mergeable, &mut batch, &mut bad);
        let _ = batch.finish(&mut rx, &mem);
    }
});
