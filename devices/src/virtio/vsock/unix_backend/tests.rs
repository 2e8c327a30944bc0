use std::io::{Read, Write};

use vmm_sys_util::tempdir::TempDir;

use super::*;

const GUEST_CID: u64 = 3;

fn backend(dir: &TempDir) -> UnixBackend {
    let path = dir.as_path().join("v.sock");
    UnixBackend::bind(&path, GUEST_CID, Arc::new(VsockMetrics::default())).unwrap()
}

fn guest(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        kind: TYPE_STREAM,
        op: op as u16,
        buf_alloc: 1 << 16,
        ..Header::default()
    }
}

fn next(b: &mut UnixBackend) -> Option<Header> {
    let mut scratch = vec![0u8; 4096];
    b.next_packet(4096, &mut scratch, Instant::now())
}

#[test]
fn connect_lines() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52), "tolerates CRLF");
    assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
    assert_eq!(parse_connect(b"CONNECT -1"), None);
    assert_eq!(parse_connect(b"CONNECT"), None);
    assert_eq!(parse_connect(b"connect 52"), None);
    assert_eq!(parse_connect(b"CONNECT 5 2"), None);
    assert_eq!(parse_connect(b"\xffCONNECT 52"), None);
}

#[test]
fn connecting_never_blocks() {
    let dir = TempDir::new().unwrap();
    let long = dir.as_path().join("x".repeat(120));
    assert_eq!(
        connect_nonblocking(&long).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let path = dir.as_path().join("l.sock");
    assert!(connect_nonblocking(&path).is_err(), "nobody listens");
    let _listener = UnixListener::bind(&path).unwrap();
    // A listener that never accepts: once its backlog is full, connecting fails at once.
    let mut open = Vec::new();
    let err = loop {
        match connect_nonblocking(&path) {
            Ok(s) => open.push(s),
            Err(e) => break e,
        }
        assert!(open.len() < 100_000, "the backlog never filled");
    };
    assert_eq!(err.kind(), ErrorKind::WouldBlock);
}

#[test]
fn guest_packets_for_nobody_get_a_reset() {
    let dir = TempDir::new().unwrap();
    let mut b = backend(&dir);
    b.on_guest_packet(&guest(Op::Rw, 1000, 52), &[]);
    let r = next(&mut b).unwrap();
    assert_eq!(r.op(), Some(Op::Rst));
    assert_eq!(
        (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
        (2, 3, 52, 1000)
    );
    // A RST is never answered.
    b.on_guest_packet(&guest(Op::Rst, 1000, 52), &[]);
    assert!(next(&mut b).is_none());
    // Nobody listens on v.sock_52.
    b.on_guest_packet(&guest(Op::Request, 1000, 52), &[]);
    assert_eq!(next(&mut b).unwrap().op(), Some(Op::Rst));
    assert_eq!(b.metrics.connections_refused.load(Ordering::Relaxed), 1);
    // To another CID, or not a stream.
    let mut h = guest(Op::Request, 1000, 52);
    h.dst_cid = 7;
    b.on_guest_packet(&h, &[]);
    assert_eq!(next(&mut b).unwrap().op(), Some(Op::Rst));
    let mut h = guest(Op::Request, 1000, 52);
    h.kind = 2;
    b.on_guest_packet(&h, &[]);
    assert_eq!(next(&mut b).unwrap().op(), Some(Op::Rst));
    // Spoofed source: dropped, counted, not answered.
    let mut h = guest(Op::Rw, 1000, 52);
    h.src_cid = 9;
    b.on_guest_packet(&h, &[]);
    assert!(next(&mut b).is_none());
    assert_eq!(b.metrics.malformed.load(Ordering::Relaxed), 1);
}

#[test]
fn pending_resets_are_bounded() {
    let dir = TempDir::new().unwrap();
    let mut b = backend(&dir);
    for port in 0..MAX_PENDING_RESETS as u32 {
        assert!(!b.resets_full());
        b.on_guest_packet(&guest(Op::Rw, port, 52), &[]);
    }
    assert!(b.resets_full());
    assert!(b.has_rx_work());
    next(&mut b).unwrap();
    assert!(!b.resets_full());
}

#[test]
fn guest_connections_reach_the_port_socket() {
    let dir = TempDir::new().unwrap();
    let mut b = backend(&dir);
    let listener = UnixListener::bind(dir.as_path().join("v.sock_52")).unwrap();
    b.on_guest_packet(&guest(Op::Request, 1000, 52), &[]);
    let resp = next(&mut b).unwrap();
    assert_eq!(resp.op(), Some(Op::Response));
    let key = ConnKey {
        local_port: 52,
        peer_port: 1000,
    };
    assert!(b.connection(key).is_some());
    let (mut host, _) = listener.accept().unwrap();
    b.on_guest_packet(&guest(Op::Rw, 1000, 52), b"");
    let mut h = guest(Op::Rw, 1000, 52);
    h.len = 2;
    b.on_guest_packet(&h, b"hi");
    let mut got = [0u8; 2];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
    // A second REQUEST on the same ports resets the connection.
    b.on_guest_packet(&guest(Op::Request, 1000, 52), &[]);
    assert_eq!(next(&mut b).unwrap().op(), Some(Op::Rst));
    assert!(b.connection(key).is_none());
    let closed: Vec<RawFd> = b.take_retired().iter().map(|s| s.as_raw_fd()).collect();
    assert_eq!(closed.len(), 1);
    assert_eq!(
        host.read(&mut got).unwrap(),
        0,
        "the host program sees the close"
    );
}

#[test]
fn host_programs_say_connect_first() {
    let dir = TempDir::new().unwrap();
    let mut b = backend(&dir);
    let path = dir.as_path().join("v.sock");
    let mut good = UnixStream::connect(&path).unwrap();
    let mut bad = UnixStream::connect(&path).unwrap();
    let mut long = UnixStream::connect(&path).unwrap();
    b.accept();
    assert_eq!(b.sockets().count(), 3);
    let fds: Vec<RawFd> = b.sockets().map(|(fd, _)| fd).collect();
    // The line may come in pieces; data after it stays for the guest.
    good.write_all(b"CONN").unwrap();
    bad.write_all(b"HELLO 52\n").unwrap();
    long.write_all(&[b'1'; 100]).unwrap();
    for &fd in &fds {
        assert!(b.on_socket_event(fd, EventSet::IN));
    }
    assert_eq!(
        b.take_retired().len(),
        2,
        "bad and too-long lines are closed"
    );
    good.write_all(b"ECT 52\nearly data").unwrap();
    for &fd in &fds {
        b.on_socket_event(fd, EventSet::IN);
    }
    let req = next(&mut b).unwrap();
    assert_eq!(req.op(), Some(Op::Request));
    assert_eq!((req.dst_port, req.src_port), (52, FIRST_LOCAL_PORT));
    assert_eq!(b.connection_count(), 1);
    assert!(!b.on_socket_event(12345, EventSet::IN));
}

#[test]
fn local_ports_are_not_reused_while_open() {
    let dir = TempDir::new().unwrap();
    let mut b = backend(&dir);
    b.next_local_port = u32::MAX;
    let (a, _peer) = UnixStream::pair().unwrap();
    let key = ConnKey {
        local_port: FIRST_LOCAL_PORT,
        peer_port: 7,
    };
    b.connections
        .insert(key, Connection::host_initiated(a, GUEST_CID, key));
    assert_eq!(b.free_local_port(), u32::MAX);
    assert_eq!(
        b.free_local_port(),
        FIRST_LOCAL_PORT + 1,
        "wraps, skips the taken one"
    );
}

#[test]
fn too_many_host_programs_are_turned_away() {
    let dir = TempDir::new().unwrap();
    let mut b = backend(&dir);
    let path = dir.as_path().join("v.sock");
    let mut clients = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 3 {
        clients.push(UnixStream::connect(&path).unwrap());
        b.accept();
    }
    assert_eq!(b.sockets().count(), MAX_CONNECTIONS);
    assert_eq!(b.metrics.connections_refused.load(Ordering::Relaxed), 3);
    // The guest cannot open more either.
    let _l = UnixListener::bind(dir.as_path().join("v.sock_52")).unwrap();
    b.on_guest_packet(&guest(Op::Request, 1, 52), &[]);
    assert_eq!(next(&mut b).unwrap().op(), Some(Op::Rst));
    b.close_all();
    assert_eq!(b.sockets().count(), 0);
    assert_eq!(b.take_retired().len(), MAX_CONNECTIONS);
}

#[test]
fn the_socket_file_goes_with_the_backend() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("v.sock");
    let b = backend(&dir);
    assert!(path.exists());
    assert!(UnixBackend::bind(&path, GUEST_CID, Arc::new(VsockMetrics::default())).is_err());
    drop(b);
    assert!(!path.exists());
}

#[test]
fn a_passed_listener_leaves_the_socket_file_until_the_vm_is_ours() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("v.sock");
    let source = backend(&dir);
    let (file, handed) = source.hand_over().unwrap();
    let listener = || UnixListener::from(OwnedFd::from(file.try_clone().unwrap()));
    let metrics = || Arc::new(VsockMetrics::default());
    // Another socket, or a path it is not bound to, is refused.
    let other = dir.as_path().join("other.sock");
    let stranger = UnixListener::bind(&other).unwrap();
    assert!(UnixBackend::from_passed(stranger, &path, GUEST_CID, metrics()).is_err());
    assert!(UnixBackend::from_passed(listener(), &other, GUEST_CID, metrics()).is_err());
    // A destination that never switched leaves the file to the source.
    drop(UnixBackend::from_passed(listener(), &path, GUEST_CID, metrics()).unwrap());
    assert!(path.exists());
    // After the switch the source leaves it, and the destination owns it.
    let destination = UnixBackend::from_passed(listener(), &path, GUEST_CID, metrics()).unwrap();
    destination.own_socket_file();
    handed.store(true, Ordering::SeqCst);
    drop(source);
    assert!(path.exists());
    UnixStream::connect(&path).unwrap();
    drop(destination);
    assert!(!path.exists());
}
