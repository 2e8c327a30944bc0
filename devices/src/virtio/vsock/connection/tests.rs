use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use super::*;

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 52;

fn now() -> Instant {
    Instant::now()
}

/// The device's end (non-blocking) and the host program's end of a socket.
fn pair() -> (UnixStream, UnixStream) {
    let (dev, host) = UnixStream::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    (dev, host)
}

fn small_send_buffer(s: &UnixStream) {
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt with a valid int option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

fn from_guest(op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port: HOST_PORT,
        len: 0,
        kind: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn shutdown(flags: u32) -> Header {
    Header {
        flags,
        ..from_guest(Op::Shutdown, 1 << 20, 0)
    }
}

fn next(c: &mut Connection, room: usize) -> Option<(Header, Vec<u8>, bool)> {
    let mut scratch = vec![0u8; MAX_PAYLOAD];
    c.next_packet(room, &mut scratch, now())
        .map(|o| (o.header, scratch[..o.header.len as usize].to_vec(), o.last))
}

fn op_of(p: &Option<(Header, Vec<u8>, bool)>) -> Option<Op> {
    p.as_ref().and_then(|(h, _, _)| h.op())
}

/// A guest-initiated connection past its RESPONSE; the guest offers `buf_alloc`.
fn established(buf_alloc: u32) -> (Connection, UnixStream) {
    let (dev, host) = pair();
    let mut c = Connection::guest_initiated(dev, GUEST_CID, &from_guest(Op::Request, buf_alloc, 0));
    assert!(c.wants_rx());
    let (h, _, last) = next(&mut c, 4096).unwrap();
    assert_eq!(h.op(), Some(Op::Response));
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (HOST_CID, GUEST_CID, HOST_PORT, GUEST_PORT)
    );
    assert_eq!((h.buf_alloc, h.fwd_cnt, last), (TX_BUF_SIZE, 0, false));
    assert!(!c.wants_rx());
    (c, host)
}

fn data(c: &mut Connection, bytes: &[u8], fwd_cnt: u32) -> Verdict {
    let mut h = from_guest(Op::Rw, 1 << 20, fwd_cnt);
    h.len = bytes.len() as u32;
    c.on_guest_packet(&h, bytes)
}

fn read_all(host: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match host.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn guest_data_reaches_the_host_and_host_data_the_guest() {
    let (mut c, mut host) = established(1 << 20);
    assert_eq!(data(&mut c, b"hello host", 0), Verdict::Keep);
    assert_eq!(read_all(&mut host), b"hello host");
    assert_eq!(c.buffered(), 0);

    assert_eq!(c.interest(), EventSet::IN, "waits for host data");
    host.write_all(b"hello guest").unwrap();
    c.on_host_event(EventSet::IN);
    assert_eq!(
        c.interest(),
        EventSet::empty(),
        "known readable: no need to watch"
    );
    let (h, payload, _) = next(&mut c, 4096).unwrap();
    assert_eq!(h.op(), Some(Op::Rw));
    assert_eq!(payload, b"hello guest");
    assert_eq!(h.fwd_cnt, 10, "tells the guest what reached the host");
    // The next read blocks: nothing to send, watch again.
    assert!(next(&mut c, 4096).is_none());
    assert_eq!(c.interest(), EventSet::IN);
}

#[test]
fn host_initiated_connections_answer_ok_with_their_port() {
    let (dev, mut host) = pair();
    let key = ConnKey {
        local_port: 1 << 30,
        peer_port: HOST_PORT,
    };
    let mut c = Connection::host_initiated(dev, GUEST_CID, key);
    let t0 = now();
    let (h, _, _) = next(&mut c, 4096).unwrap();
    assert_eq!(h.op(), Some(Op::Request));
    assert_eq!(
        (h.src_port, h.dst_port, h.dst_cid),
        (1 << 30, HOST_PORT, GUEST_CID)
    );
    assert!(c.deadline().unwrap() >= t0 + REQUEST_TIMEOUT);
    assert!(next(&mut c, 4096).is_none(), "waits for the guest");
    // Data from the host program waits until the guest accepted.
    host.write_all(b"early").unwrap();
    c.on_host_event(EventSet::IN);
    assert!(!c.wants_rx());

    let mut resp = from_guest(Op::Response, 1 << 20, 0);
    (resp.src_port, resp.dst_port) = (HOST_PORT, 1 << 30);
    assert_eq!(c.on_guest_packet(&resp, &[]), Verdict::Keep);
    assert_eq!(c.deadline(), None);
    assert_eq!(read_all(&mut host), b"OK 1073741824\n");
    let (h, payload, _) = next(&mut c, 4096).unwrap();
    assert_eq!((h.op(), payload.as_slice()), (Some(Op::Rw), &b"early"[..]));
    // The OK line is ours: it does not use the guest's credit.
    assert_eq!(h.fwd_cnt, 0);
}

#[test]
fn host_initiated_refused_or_timed_out() {
    let key = ConnKey {
        local_port: 1 << 30,
        peer_port: HOST_PORT,
    };
    let (dev, _host) = pair();
    let mut c = Connection::host_initiated(dev, GUEST_CID, key);
    next(&mut c, 4096).unwrap();
    assert_eq!(
        c.on_guest_packet(&from_guest(Op::Rst, 0, 0), &[]),
        Verdict::Forget
    );

    let (dev, _host) = pair();
    let mut c = Connection::host_initiated(dev, GUEST_CID, key);
    next(&mut c, 4096).unwrap();
    c.on_timer(now());
    assert!(!c.wants_rx(), "not yet");
    c.on_timer(now() + REQUEST_TIMEOUT + Duration::from_millis(1));
    let p = next(&mut c, 4096).unwrap();
    assert_eq!((p.0.op(), p.2), (Some(Op::Rst), true));

    // A host program that hangs up before the REQUEST went out is simply forgotten.
    let (dev, host) = pair();
    let mut c = Connection::host_initiated(dev, GUEST_CID, key);
    drop(host);
    c.on_host_event(EventSet::IN | EventSet::HANG_UP);
    assert!(c.abandoned() && c.hung_up());
}

#[test]
fn never_more_than_the_guest_credit() {
    let (mut c, mut host) = established(100);
    host.write_all(&[7u8; 300]).unwrap();
    c.on_host_event(EventSet::IN);
    let (h, p, _) = next(&mut c, 4096).unwrap();
    assert_eq!((h.op(), p.len()), (Some(Op::Rw), 100));
    assert_eq!(c.peer_free(), 0);
    // Out of credit: one CREDIT_REQUEST, then silence (and the socket is not watched).
    assert_eq!(op_of(&next(&mut c, 4096)), Some(Op::CreditRequest));
    assert!(next(&mut c, 4096).is_none());
    assert!(!c.wants_rx());
    assert_eq!(c.interest(), EventSet::empty());
    // A credit update that frees nothing changes nothing.
    c.on_guest_packet(&from_guest(Op::CreditUpdate, 100, 0), &[]);
    assert!(!c.wants_rx());
    // The guest consumed 60 bytes.
    c.on_guest_packet(&from_guest(Op::CreditUpdate, 100, 60), &[]);
    let (_, p, _) = next(&mut c, 4096).unwrap();
    assert_eq!(p.len(), 60);
    // The RX buffer's room limits too.
    c.on_guest_packet(&from_guest(Op::CreditUpdate, 1000, 160), &[]);
    let (_, p, _) = next(&mut c, 30).unwrap();
    assert_eq!(p.len(), 30);
    let (_, p, _) = next(&mut c, 4096).unwrap();
    assert_eq!(p.len(), 110);
}

#[test]
fn credit_counters_wrap() {
    let (mut c, mut host) = established(1000);
    // Pretend a long history: the guest has consumed almost 4 GiB.
    c.credit.rx_cnt = Wrapping(u32::MAX - 10);
    c.credit.peer_fwd_cnt = Wrapping(u32::MAX - 10);
    host.write_all(&[1u8; 2000]).unwrap();
    c.on_host_event(EventSet::IN);
    let (_, p, _) = next(&mut c, 4096).unwrap();
    assert_eq!(p.len(), 1000);
    assert_eq!(c.credit.rx_cnt.0, 1000 - 11);
    c.on_guest_packet(&from_guest(Op::CreditUpdate, 1000, 1000 - 11), &[]);
    assert_eq!(c.peer_free(), 1000);
    // A guest claiming to have consumed more than it got leaves no credit, not a huge one.
    c.on_guest_packet(&from_guest(Op::CreditUpdate, 1000, 5000), &[]);
    assert_eq!(c.peer_free(), 0);

    c.tx.fwd_cnt = Wrapping(u32::MAX - 1);
    c.credit.fwd_cnt_told = Wrapping(u32::MAX - 1);
    assert_eq!(data(&mut c, b"abcd", 0), Verdict::Keep);
    assert_eq!(read_all(&mut host), b"abcd");
    assert_eq!(c.tx.fwd_cnt.0, 2);
    assert_eq!(c.credit_granted(), TX_BUF_SIZE - 4);
}

#[test]
fn slow_host_buffers_up_to_the_credit_then_resets() {
    let (mut c, _host) = established(1 << 20);
    small_send_buffer(&c.stream);
    let chunk = vec![9u8; MAX_PAYLOAD];
    let mut sent = 0usize;
    while sent + chunk.len() <= TX_BUF_SIZE as usize {
        assert_eq!(data(&mut c, &chunk, 0), Verdict::Keep);
        sent += chunk.len();
    }
    assert!(c.buffered() > 0, "the host socket is full");
    assert!(c.buffered() <= TX_BUF_SIZE as usize);
    assert_eq!(c.interest(), EventSet::IN | EventSet::OUT);
    // What the guest knows: nothing reached the host beyond the first bytes.
    let granted = c.credit_granted();
    assert!(granted < MAX_PAYLOAD as u32);
    // Going past what the buffer can hold is a protocol violation, not data to keep.
    let too_much = vec![1u8; TX_BUF_SIZE as usize - c.buffered() + 1];
    assert!(matches!(data(&mut c, &too_much, 0), Verdict::Reset(_)));

    // The host catches up: the buffer drains and the guest hears of its new credit.
    let (mut c, mut host) = established(1 << 20);
    small_send_buffer(&c.stream);
    for _ in 0..4 {
        assert_eq!(data(&mut c, &chunk, 0), Verdict::Keep);
    }
    let mut got = read_all(&mut host).len();
    while c.buffered() > 0 {
        c.on_host_event(EventSet::OUT);
        got += read_all(&mut host).len();
    }
    got += read_all(&mut host).len();
    assert_eq!(got, TX_BUF_SIZE as usize);
    assert_eq!(c.interest(), EventSet::IN);
    let (h, _, _) = next(&mut c, 4096).unwrap();
    assert_eq!(h.op(), Some(Op::CreditUpdate));
    assert_eq!(h.fwd_cnt, TX_BUF_SIZE);
    assert_eq!(c.credit_granted(), TX_BUF_SIZE);
}

#[test]
fn guest_close_flushes_then_resets() {
    let (mut c, mut host) = established(1 << 20);
    small_send_buffer(&c.stream);
    let chunk = vec![3u8; MAX_PAYLOAD];
    data(&mut c, &chunk, 0);
    data(&mut c, &chunk, 0);
    assert!(c.buffered() > 0);
    assert_eq!(
        c.on_guest_packet(&shutdown(SHUTDOWN_BOTH), &[]),
        Verdict::Keep
    );
    assert!(!c.wants_rx(), "buffered data first");
    let mut got = read_all(&mut host).len();
    while c.buffered() > 0 {
        c.on_host_event(EventSet::OUT);
        got += read_all(&mut host).len();
    }
    assert_eq!(got, 2 * MAX_PAYLOAD);
    let (h, _, last) = next(&mut c, 4096).unwrap();
    assert_eq!((h.op(), last), (Some(Op::Rst), true));
    // The host program saw end of file.
    host.set_nonblocking(false).unwrap();
    assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
}

#[test]
fn half_closes_both_ways() {
    // The guest stops sending; the host answers and closes.
    let (mut c, mut host) = established(1 << 20);
    data(&mut c, b"request", 0);
    c.on_guest_packet(&shutdown(SHUTDOWN_SEND), &[]);
    host.set_nonblocking(false).unwrap();
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request", "end of file after the data");
    host.write_all(b"reply").unwrap();
    drop(host);
    c.on_host_event(EventSet::IN | EventSet::HANG_UP);
    assert!(c.hung_up());
    let (h, p, _) = next(&mut c, 4096).unwrap();
    assert_eq!((h.op(), p.as_slice()), (Some(Op::Rw), &b"reply"[..]));
    let (h, _, last) = next(&mut c, 4096).unwrap();
    assert_eq!(h.op(), Some(Op::Shutdown));
    assert_eq!((h.flags, last), (SHUTDOWN_BOTH, false));
    assert!(c.deadline().is_some(), "waits for the guest's RST");
    assert!(next(&mut c, 4096).is_none());
    // Late data and credit updates are ignored; the RST ends it.
    assert_eq!(data(&mut c, b"late", 0), Verdict::Keep);
    assert_eq!(
        c.on_guest_packet(&from_guest(Op::Rst, 0, 0), &[]),
        Verdict::Forget
    );

    // The host stops sending first (shutdown(SHUT_WR)); the guest still can.
    let (mut c, mut host) = established(1 << 20);
    host.shutdown(Shutdown::Write).unwrap();
    c.on_host_event(EventSet::IN);
    let (h, _, _) = next(&mut c, 4096).unwrap();
    assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_SEND));
    assert_eq!(c.interest(), EventSet::empty(), "nothing more to read");
    assert_eq!(data(&mut c, b"more", 0), Verdict::Keep);
    assert_eq!(read_all(&mut host), b"more");
    // The guest closes too: the host sees end of file, the guest gets its RST.
    c.on_guest_packet(&shutdown(SHUTDOWN_BOTH), &[]);
    let (h, _, last) = next(&mut c, 4096).unwrap();
    assert_eq!((h.op(), last), (Some(Op::Rst), true));

    // Both stop sending, nobody said RCV: we close with SHUTDOWN both and wait for the RST,
    // and reset after the timeout.
    let (mut c, host) = established(1 << 20);
    c.on_guest_packet(&shutdown(SHUTDOWN_SEND), &[]);
    host.shutdown(Shutdown::Write).unwrap();
    c.on_host_event(EventSet::IN);
    let (h, _, _) = next(&mut c, 4096).unwrap();
    assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_BOTH));
    c.on_timer(now() + SHUTDOWN_TIMEOUT + Duration::from_millis(1));
    let (h, _, last) = next(&mut c, 4096).unwrap();
    assert_eq!((h.op(), last), (Some(Op::Rst), true));
}

#[test]
fn guest_refusing_data_stops_the_host_writer() {
    let (mut c, mut host) = established(1 << 20);
    c.on_guest_packet(&shutdown(SHUTDOWN_RCV), &[]);
    assert_eq!(
        c.interest(),
        EventSet::empty(),
        "the host socket is not read"
    );
    let err = host.write_all(b"unwanted").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BrokenPipe);
    // The guest can still send.
    assert_eq!(data(&mut c, b"still", 0), Verdict::Keep);
    assert_eq!(read_all(&mut host), b"still");
}

#[test]
fn host_gone_while_guest_sends() {
    let (mut c, host) = established(1 << 20);
    drop(host);
    // The write fails: the guest is told the host receives no more.
    assert_eq!(data(&mut c, b"lost", 0), Verdict::Keep);
    c.on_host_event(EventSet::IN | EventSet::HANG_UP);
    let (h, _, _) = next(&mut c, 4096).unwrap();
    assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_BOTH));
    assert_eq!(
        h.fwd_cnt, 4,
        "discarded bytes still free the guest's credit"
    );
}

#[test]
fn protocol_violations_reset() {
    type Case = Box<dyn Fn(&mut Connection) -> Verdict>;
    let cases: [(&str, Case); 5] = [
        (
            "second REQUEST",
            Box::new(|c| c.on_guest_packet(&from_guest(Op::Request, 1, 0), &[])),
        ),
        (
            "RESPONSE from the accepting side",
            Box::new(|c| c.on_guest_packet(&from_guest(Op::Response, 1, 0), &[])),
        ),
        (
            "unknown op",
            Box::new(|c| {
                let mut h = from_guest(Op::Rw, 1, 0);
                h.op = 42;
                c.on_guest_packet(&h, &[])
            }),
        ),
        (
            "data after SHUTDOWN SEND",
            Box::new(|c| {
                c.on_guest_packet(&shutdown(SHUTDOWN_SEND), &[]);
                data(c, b"x", 0)
            }),
        ),
        (
            "more than the credit at once",
            Box::new(|c| data(c, &vec![0u8; TX_BUF_SIZE as usize + 1], 0)),
        ),
    ];
    for (name, case) in cases {
        let (mut c, _host) = established(1 << 20);
        assert!(matches!(case(&mut c), Verdict::Reset(_)), "{name}");
    }
    // Before the RESPONSE went out, the guest may only reset.
    let (dev, _host) = pair();
    let mut c = Connection::guest_initiated(dev, GUEST_CID, &from_guest(Op::Request, 1, 0));
    assert!(matches!(data(&mut c, b"x", 0), Verdict::Reset(_)));
}
