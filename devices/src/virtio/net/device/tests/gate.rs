//! The FT output gate on the socket-pair stand-in for the tap: frames held until their epoch
//! is released, in order; a full tap, a full gate, a fence, and opening again.

use super::*;
use crate::virtio::net::{GateMode, MAX_HELD_BYTES, MAX_HELD_FRAMES};

/// `n` frames of distinct sizes, numbered from `first`, with their vnet headers.
fn numbered(first: u32, n: u32) -> Vec<Vec<u8>> {
    sizes(n)
        .map(|(s, l)| with_header(&ethernet(first + s, l)))
        .collect()
}

fn post_all(tx: &mut Ring, frames: &[Vec<u8>]) {
    for f in frames {
        tx.post_tx(f);
    }
}

fn held(net: &Net) -> (u64, u64) {
    let m = net.metrics();
    (
        m.tx_held_frames.load(Ordering::Relaxed),
        m.tx_held_bytes.load(Ordering::Relaxed),
    )
}

fn bytes(frames: &[Vec<u8>]) -> u64 {
    frames.iter().map(|f| f.len() as u64).sum()
}

/// Whether the device rang its own transmit doorbell since the last look.
fn doorbell_rung(net: &Net) -> bool {
    net.base().queue_evts()[TX_QUEUE].read().is_ok()
}

/// The receive and transmit rings of a test.
fn rings(m: &GuestMemoryMmap) -> (Ring<'_>, Ring<'_>) {
    (
        Ring::new(m, RX_RING, RX_BUFS),
        Ring::new(m, TX_RING, TX_BUFS),
    )
}

/// A started device on the socket-pair stand-in for the tap, and the host's end.
fn on_socket_pair(
    m: &GuestMemoryMmap,
    rx: &Ring,
    tx: &Ring,
) -> (Net, std::os::unix::net::UnixDatagram) {
    let (tap, host) = Tap::socket_pair();
    (started(tap, base_features(), m, rx, tx), host)
}

/// Lets the device write to a tap with room again (what EPOLLOUT does) until `want` frames
/// have arrived, or 100 tries.
fn drain_until(
    net: &mut Net,
    host: &std::os::unix::net::UnixDatagram,
    arrived: &mut Vec<Vec<u8>>,
    want: usize,
) {
    for _ in 0..100 {
        if arrived.len() >= want {
            break;
        }
        net.tx_blocked = false;
        net.process_tx();
        arrived.extend(drain(host));
    }
}

#[test]
fn gated_frames_leave_only_when_their_epoch_is_released_and_in_order() {
    let m = mem();
    let (rx, mut tx) = rings(&m);
    let (mut net, host) = on_socket_pair(&m, &rx, &tx);
    net.gate_output();
    assert_eq!(net.output_gate_mode(), GateMode::Gated);

    let epoch1 = numbered(0, 5);
    post_all(&mut tx, &epoch1);
    net.process_tx();
    // The guest gets its chains back at once, and nothing reaches the tap.
    assert_eq!(tx.take_used().len(), 5);
    assert!(drain(&host).is_empty());
    assert_eq!(held(&net), (5, bytes(&epoch1)));
    assert_eq!(net.mark_output_epoch(), 1);

    let epoch2 = numbered(100, 3);
    post_all(&mut tx, &epoch2);
    net.process_tx();
    assert_eq!(net.mark_output_epoch(), 2);
    let epoch3 = numbered(200, 2);
    post_all(&mut tx, &epoch3);
    net.process_tx();
    assert_eq!(tx.take_used().len(), 5);
    assert!(drain(&host).is_empty());
    // The guest reuses its buffers: the gate kept copies.
    m.write_slice(&vec![0xee; 16 * SLOT as usize], GuestAddress(TX_BUFS))
        .unwrap();

    net.release_output(1);
    let out = drain(&host);
    assert_eq!(seqs(&out), seqs(&epoch1));
    assert!(out == epoch1, "released frames arrived intact");
    // Releasing past the last closed epoch releases only closed ones: epoch 3 is still open.
    net.release_output(7);
    let out = drain(&host);
    assert_eq!(seqs(&out), seqs(&epoch2));
    assert!(out == epoch2);
    assert_eq!(held(&net), (2, bytes(&epoch3)));
    // An old epoch released again changes nothing.
    net.release_output(1);
    assert!(drain(&host).is_empty());
    assert_eq!(net.mark_output_epoch(), 3);
    net.release_output(3);
    assert_eq!(drain(&host), epoch3);
    assert_eq!(held(&net), (0, 0));
    let metrics = net.metrics();
    assert_eq!(metrics.tx_released_frames.load(Ordering::Relaxed), 10);
    assert_eq!(metrics.tx_frames.load(Ordering::Relaxed), 10);
    let payload = bytes(&epoch1) + bytes(&epoch2) + bytes(&epoch3) - 10 * VNET_HDR_LEN as u64;
    assert_eq!(metrics.tx_bytes.load(Ordering::Relaxed), payload);
    assert!(!net.base().is_broken());
}

#[test]
fn released_frames_wait_for_a_full_tap_in_order_while_the_guest_goes_on() {
    let m = mem();
    let (rx, mut tx) = rings(&m);
    let (mut net, host) = on_socket_pair(&m, &rx, &tx);
    net.gate_output();
    let _ = doorbell_rung(&net);
    let first = numbered(0, 40);
    post_all(&mut tx, &first);
    net.process_tx();
    assert_eq!(tx.take_used().len(), 40);
    assert_eq!(net.mark_output_epoch(), 1);
    net.release_output(1);
    // The socket holds only a few: the rest stays held, and the event loop is called in to
    // watch for EPOLLOUT.
    assert!(net.tx_blocked);
    assert!(doorbell_rung(&net));
    let mut arrived = drain(&host);
    assert!(
        !arrived.is_empty() && arrived.len() < 40,
        "{}",
        arrived.len()
    );
    // A full tap does not hold up the guest: its next frames are taken into the next epoch.
    let second = numbered(100, 10);
    post_all(&mut tx, &second);
    net.process_tx();
    assert_eq!(tx.take_used().len(), 10);
    drain_until(&mut net, &host, &mut arrived, first.len());
    assert_eq!(
        seqs(&arrived),
        seqs(&first),
        "epoch 1 whole, in order, nothing more"
    );
    assert!(arrived == first);
    assert_eq!(held(&net), (10, bytes(&second)));
    assert!(net.metrics().tx_waits.load(Ordering::Relaxed) >= 1);
    assert_eq!(net.mark_output_epoch(), 2);
    net.tx_blocked = false;
    net.release_output(2);
    assert_eq!(drain(&host), second);
}

#[test]
fn no_released_frame_leaves_after_the_releases_deadline() {
    let m = mem();
    let (rx, mut tx) = rings(&m);
    let (mut net, host) = on_socket_pair(&m, &rx, &tx);
    net.gate_output();
    let first = numbered(0, 40);
    post_all(&mut tx, &first);
    net.process_tx();
    assert_eq!(net.mark_output_epoch(), 1);
    // A deadline already past: nothing leaves (a process that stalled before the write).
    let past = std::time::Instant::now() - std::time::Duration::from_millis(1);
    net.release_output_by(1, Some(past));
    assert!(drain(&host).is_empty());
    assert_eq!(held(&net), (40, bytes(&first)));
    // In time: what the tap takes leaves; the rest waits for room, and once the deadline has
    // passed it stays held even when the tap has room again (a process stopped in the middle
    // of a release may have been replaced meanwhile).
    let soon = std::time::Instant::now() + std::time::Duration::from_millis(50);
    net.release_output_by(1, Some(soon));
    let mut arrived = drain(&host);
    assert!(
        !arrived.is_empty() && arrived.len() < 40,
        "{}",
        arrived.len()
    );
    std::thread::sleep(std::time::Duration::from_millis(60));
    net.tx_blocked = false; // what EPOLLOUT does
    net.process_tx();
    assert!(drain(&host).is_empty(), "nothing after the deadline");
    // The next release lets the rest go, in order.
    net.release_output_by(
        1,
        Some(std::time::Instant::now() + std::time::Duration::from_secs(5)),
    );
    drain_until(&mut net, &host, &mut arrived, first.len());
    assert!(arrived == first, "epoch 1 whole and in order");
    assert_eq!(held(&net), (0, 0));
}

#[test]
fn a_full_gate_stops_consuming_the_ring_until_a_release_makes_room() {
    let m = mem();
    let (rx, mut tx) = rings(&m);
    let (mut net, host) = on_socket_pair(&m, &rx, &tx);
    net.gate.set_limits(4, MAX_HELD_BYTES);
    net.gate_output();
    let frames = numbered(0, 10);
    post_all(&mut tx, &frames);
    net.process_tx();
    assert_eq!(
        tx.take_used().len(),
        4,
        "only what the gate holds is consumed"
    );
    net.process_tx(); // a kick from the guest changes nothing
    assert!(tx.take_used().is_empty());
    assert_eq!(held(&net).0, 4);
    assert!(net.metrics().tx_gate_stalls.load(Ordering::Relaxed) >= 1);
    assert!(!net.base().is_broken());

    let _ = doorbell_rung(&net);
    assert_eq!(net.mark_output_epoch(), 1);
    net.release_output(1);
    assert_eq!(drain(&host), frames[..4]);
    // The release calls the event loop back to the ring.
    assert!(doorbell_rung(&net));
    net.process_tx();
    assert_eq!(tx.take_used().len(), 4);
    assert_eq!(net.mark_output_epoch(), 2);
    net.release_output(2);
    net.process_tx();
    assert_eq!(tx.take_used().len(), 2);
    assert_eq!(net.mark_output_epoch(), 3);
    net.release_output(3);
    assert_eq!(drain(&host), frames[4..]);

    // The byte bound: a chain is taken only while a largest frame would still fit.
    net.gate.set_limits(MAX_HELD_FRAMES, MAX_FRAME_LEN + 3000);
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|s| with_header(&ethernet(100 + s, 1000 - VNET_HDR_LEN)))
        .collect();
    post_all(&mut tx, &frames);
    net.process_tx();
    assert_eq!(tx.take_used().len(), 4);
    assert_eq!(held(&net), (4, 4000));
}

#[test]
fn a_fenced_gate_drops_everything_for_good_and_the_guest_goes_on() {
    let m = mem();
    let (rx, mut tx) = rings(&m);
    let (mut net, host) = on_socket_pair(&m, &rx, &tx);
    net.gate_output();
    post_all(&mut tx, &numbered(0, 6));
    net.process_tx();
    assert_eq!(net.mark_output_epoch(), 1);
    post_all(&mut tx, &numbered(10, 2));
    net.process_tx();
    assert_eq!(tx.take_used().len(), 8);
    net.fence_output();
    assert_eq!(net.output_gate_mode(), GateMode::Fenced);
    assert_eq!(held(&net), (0, 0));
    net.release_output(1);
    assert!(drain(&host).is_empty());
    // Chains are still consumed, and dropped.
    post_all(&mut tx, &numbered(20, 5));
    net.process_tx();
    assert_eq!(tx.take_used().len(), 5);
    // Neither opening nor gating again lets anything out.
    net.open_output();
    net.gate_output();
    assert_eq!(net.output_gate_mode(), GateMode::Fenced);
    post_all(&mut tx, &numbered(30, 3));
    net.process_tx();
    assert_eq!(net.mark_output_epoch(), 2);
    net.release_output(2);
    assert_eq!(tx.take_used().len(), 3);
    assert!(drain(&host).is_empty(), "a fenced device sent a frame");
    let metrics = net.metrics();
    assert_eq!(metrics.tx_fenced_drops.load(Ordering::Relaxed), 16);
    assert_eq!(metrics.tx_frames.load(Ordering::Relaxed), 0);
    assert!(!net.base().is_broken());
}

#[test]
fn opening_the_gate_releases_everything_held_then_writes_directly() {
    let m = mem();
    let (rx, mut tx) = rings(&m);
    let (mut net, host) = on_socket_pair(&m, &rx, &tx);
    net.gate_output();
    let closed = numbered(0, 3);
    post_all(&mut tx, &closed);
    net.process_tx();
    assert_eq!(net.mark_output_epoch(), 1);
    let open_epoch = numbered(10, 2);
    post_all(&mut tx, &open_epoch);
    net.process_tx();
    assert!(drain(&host).is_empty());
    net.open_output();
    assert_eq!(net.output_gate_mode(), GateMode::Open);
    let expected: Vec<Vec<u8>> = closed.iter().chain(&open_epoch).cloned().collect();
    assert_eq!(drain(&host), expected);
    assert!(net.gate.is_idle());
    let direct = numbered(20, 2);
    post_all(&mut tx, &direct);
    net.process_tx();
    assert_eq!(drain(&host), direct);
    let metrics = net.metrics();
    assert_eq!(metrics.tx_released_frames.load(Ordering::Relaxed), 5);
    assert_eq!(metrics.tx_frames.load(Ordering::Relaxed), 7);
    // Epoch numbers go on where they were.
    assert_eq!(net.mark_output_epoch(), 2);
}

#[test]
fn an_open_gate_leaves_transmission_as_it_was() {
    let m = mem();
    let (rx, mut tx) = rings(&m);
    let (mut net, host) = on_socket_pair(&m, &rx, &tx);
    assert_eq!(net.output_gate_mode(), GateMode::Open);
    let frames = numbered(0, 4);
    post_all(&mut tx, &frames);
    net.process_tx();
    assert_eq!(drain(&host), frames);
    // Epoch marks and releases do nothing to an open gate.
    assert_eq!(net.mark_output_epoch(), 1);
    net.release_output(1);
    assert!(net.gate.is_idle());
    let metrics = net.metrics();
    assert_eq!(metrics.tx_released_frames.load(Ordering::Relaxed), 0);
    assert_eq!(held(&net), (0, 0));
}

#[test]
fn a_gated_frame_too_long_or_with_an_unnegotiated_offload_is_dropped_not_held() {
    let m = mem();
    let (rx, mut tx) = rings(&m);
    let (mut net, host) = on_socket_pair(&m, &rx, &tx);
    net.gate_output();
    tx.post(MAX_FRAME_LEN as u32 + 1, 0);
    let mut tso = with_header(&ethernet(0, 200));
    tso[1] = 1; // GSO TCPv4, not negotiated
    tx.post_tx(&tso);
    tx.post(100, F_WRITE);
    let good = numbered(7, 1);
    post_all(&mut tx, &good);
    net.process_tx();
    assert_eq!(tx.take_used().len(), 4);
    assert_eq!(net.metrics().tx_drops.load(Ordering::Relaxed), 3);
    assert_eq!(held(&net), (1, bytes(&good)));
    assert_eq!(net.mark_output_epoch(), 1);
    net.release_output(1);
    assert_eq!(drain(&host), good);
}

#[test]
fn the_event_loop_finishes_a_release_the_tap_could_not_take_at_once() {
    let m = mem();
    let rx = Ring::new(&m, RX_RING, RX_BUFS);
    let mut tx = Ring::new(&m, TX_RING, TX_BUFS);
    let (tap, host) = Tap::socket_pair();
    let mut net = Net::with_tap("eth0", tap, Some(MAC), irq()).unwrap();
    net.base_mut().set_acked_features(base_features());
    rx.attach(&mut net.base_mut().queues_mut()[RX_QUEUE]);
    tx.attach(&mut net.base_mut().queues_mut()[TX_QUEUE]);
    let tx_bell = net.base().queue_evts()[TX_QUEUE].try_clone().unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut events = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    events.add_subscriber(net.clone());
    net.lock().unwrap().base_mut().activate(m.clone()).unwrap();
    events.run_with_timeout(100).unwrap();

    net.lock().unwrap().gate_output();
    let frames = numbered(0, 40);
    post_all(&mut tx, &frames);
    tx_bell.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tx.take_used().len() < frames.len() && Instant::now() < deadline {
        events.run_with_timeout(50).unwrap();
    }
    events.run_with_timeout(50).unwrap();
    assert!(drain(&host).is_empty(), "nothing leaves before its release");
    {
        let mut net = net.lock().unwrap();
        assert_eq!(net.mark_output_epoch(), 1);
        // As the owner thread does: outside the event loop.
        net.release_output(1);
    }
    let mut arrived = drain(&host);
    assert!(arrived.len() < frames.len(), "the socket took everything");
    let deadline = Instant::now() + Duration::from_secs(10);
    while arrived.len() < frames.len() && Instant::now() < deadline {
        events.run_with_timeout(50).unwrap();
        arrived.extend(drain(&host));
    }
    assert_eq!(seqs(&arrived), seqs(&frames));
    assert!(arrived == frames);
    assert_eq!(held(&net.lock().unwrap()), (0, 0));
}

#[test]
fn held_frames_outlive_a_driver_reset_and_leave_on_release() {
    let m = mem();
    let (rx, mut tx) = rings(&m);
    let (mut net, host) = on_socket_pair(&m, &rx, &tx);
    net.gate_output();
    let frames = numbered(0, 40);
    post_all(&mut tx, &frames);
    net.process_tx();
    assert_eq!(net.mark_output_epoch(), 1);
    net.release_output(1);
    assert!(net.tx_blocked);
    let mut arrived = drain(&host);
    // The guest saw these frames sent: a reset of its driver does not take them back, and
    // the released ones still wait for the tap's EPOLLOUT.
    net.reset();
    assert!(net.tx_blocked, "released frames still wait for the tap");
    for _ in 0..100 {
        if arrived.len() >= frames.len() {
            break;
        }
        net.tx_blocked = false; // what EPOLLOUT does
        net.process_tx();
        arrived.extend(drain(&host));
    }
    assert_eq!(seqs(&arrived), seqs(&frames));
    assert!(!net.tx_blocked);
    // Nothing waits any more: a reset clears the flag as before.
    net.tx_blocked = true;
    net.reset();
    assert!(!net.tx_blocked);
}

#[test]
fn gated_frames_reach_a_real_tap_only_on_release() {
    in_private_netns(|| {
        let m = mem();
        let rx = Ring::new(&m, RX_RING, RX_BUFS);
        let mut tx = Ring::new(&m, TX_RING, TX_BUFS);
        let (_, mut net, wire) = started_on_real_tap(&m, &rx, &tx);
        net.gate_output();
        let out: Vec<Vec<u8>> = sizes(20).map(|(s, l)| ethernet(s, l)).collect();
        for f in &out {
            tx.post_tx(&with_header(f));
        }
        net.process_tx();
        assert_eq!(tx.take_used().len(), out.len());
        assert_eq!(
            wire.recv(),
            None,
            "a frame left before its epoch was released"
        );
        assert_eq!(net.mark_output_epoch(), 1);
        net.release_output(1);
        let mut arrived = Vec::new();
        while let Some(f) = wire.recv() {
            arrived.push(f);
            if arrived.len() == out.len() {
                break;
            }
        }
        assert_eq!(seqs(&arrived), seqs(&out), "every frame, in order");
        assert!(arrived == out, "frames arrived intact");
        assert_eq!(net.metrics().tx_errors.load(Ordering::Relaxed), 0);
        // Fenced, nothing reaches the wire again.
        net.fence_output();
        tx.post_tx(&with_header(&ethernet(99, 100)));
        net.process_tx();
        assert_eq!(net.mark_output_epoch(), 2);
        net.release_output(2);
        assert_eq!(wire.recv(), None, "a fenced device sent a frame");
    });
}
