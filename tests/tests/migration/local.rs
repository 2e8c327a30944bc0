//! Same-host migration (issue #12 point 6): over a Unix socket between two hosts of the same
//! user, guest memory is handed over as memfds instead of being copied, so the bytes on the
//! wire and the pause do not grow with memory size; a local peer passing bogus descriptors is
//! refused and the destination serves on.

use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use lockstep_tests::host::TestHost;
use lockstep_tests::netns::NetNs;
use lockstep_tests::pattern::udp_check;
use lockstep_tests::{guest_images, require_kvm, VmConfigBuilder};
use lockstep_vmm::migration::protocol::{self, Handshake, Kind};
use serde_json::Value;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;

/// The generous bound on a same-host pause (the benchmark measures the real figure).
const MAX_PAUSE_MS: f64 = 100.0;

fn unix_listen(dir: &tempfile::TempDir, name: &str) -> String {
    format!("unix:{}", dir.path().join(name).display())
}

#[test]
fn a_same_host_migration_hands_memory_over_instead_of_copying_it() {
    if !require_kvm("a_same_host_migration_hands_memory_over_instead_of_copying_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The guest fills 16 MiB and checks it after the move: copied, that is 16 MiB on the wire.
    let info = migrate_and_check(&unix_listen(&dir, "in.sock"), 1, 512);
    let bytes = info["bytes"].as_u64().unwrap();
    let pause = info["downtime_ms"].as_f64().unwrap();
    eprintln!("same host, 512 MiB: {bytes} bytes on the wire, pause {pause:.1} ms");
    assert_eq!(info["pages"], 0, "no page was copied: {info}");
    assert!(bytes < 1 << 20, "only the state on the wire: {bytes} bytes");
    assert!(pause < MAX_PAUSE_MS, "pause {pause:.1} ms");
}

/// Migrates an idle counting guest of `mem_mib` over the same-host path; returns the source's
/// last progress.
fn idle_move(mem_mib: u64) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let source = TestHost::start(vec![vm_config("idle", "counter 100", 1, mem_mib)]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("idle", "LKS counter=3 ", WAIT);
    let (in_id, listen, token) = incoming(&destination, &unix_listen(&dir, "in.sock"), "idle");
    let id = migrate(
        &source,
        "idle",
        json!({ "destination": listen, "token": token }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "completed");
    let last = counters(&source.serial("idle")).last().copied().unwrap();
    counter_moves(|| destination.serial("idle"), last);
    info
}

#[test]
fn the_same_host_pause_does_not_grow_with_memory_size() {
    if !require_kvm("the_same_host_pause_does_not_grow_with_memory_size") {
        return;
    }
    let small = idle_move(512);
    let large = idle_move(2048);
    let figures = |v: &Value| {
        (
            v["downtime_ms"].as_f64().unwrap(),
            v["bytes"].as_u64().unwrap(),
        )
    };
    let ((p512, b512), (p2g, b2g)) = (figures(&small), figures(&large));
    eprintln!(
        "same-host pause: 512 MiB {p512:.1} ms ({b512} bytes), 2 GiB {p2g:.1} ms ({b2g} bytes)"
    );
    assert!(
        p512 < MAX_PAUSE_MS && p2g < MAX_PAUSE_MS,
        "pauses {p512:.1} ms and {p2g:.1} ms"
    );
    // What moves is the state: the same few bytes whatever the memory size.
    assert!(
        b2g < b512 + (64 << 10) && b512 < 1 << 20,
        "{b512} and {b2g} bytes"
    );
    assert_eq!(
        (small["pages"].as_u64(), large["pages"].as_u64()),
        (Some(0), Some(0))
    );
}

/// A local peer that holds the token, offers the same-host path and passes `fds` for the
/// regions of a `mem_mib` guest; returns what the destination answered after the descriptors.
fn hostile_local_source(
    path: &str,
    token: &str,
    config: &Value,
    mem_mib: u64,
    fds: &[RawFd],
) -> protocol::Frame {
    let (mut conn, regions) = local_handshake(path, token, config, mem_mib, true, None);
    let accept = protocol::expect_frame(&mut conn, Kind::Accept, "Accept").unwrap();
    assert_eq!(accept, [1], "the destination takes the same-host path");
    let mut frame = vec![Kind::Fds as u8];
    frame.extend_from_slice(&(16 * regions.len() as u32).to_le_bytes());
    for (a, l) in &regions {
        frame.extend_from_slice(&a.to_le_bytes());
        frame.extend_from_slice(&l.to_le_bytes());
    }
    conn.send_with_fds(&[&frame[..]], fds).unwrap();
    protocol::read_frame(&mut conn).unwrap()
}

/// Connects to `path` and sends an authenticated handshake for a `mem_mib` guest (offering
/// the same-host path or not, from another lockstep version if given); returns the connection
/// and the regions.
fn local_handshake(
    path: &str,
    token: &str,
    config: &Value,
    mem_mib: u64,
    same_host: bool,
    version: Option<&str>,
) -> (UnixStream, Vec<(u64, u64)>) {
    let mut conn = UnixStream::connect(path.strip_prefix("unix:").unwrap()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let nonce = protocol::expect_frame(&mut conn, Kind::Hello, "Hello").unwrap();
    let config = lockstep_api::VmConfig::from_json(&config.to_string()).unwrap();
    let regions: Vec<(u64, u64)> = lockstep_vmm::memory::ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect();
    let handshake = serde_json::to_vec(&Handshake {
        format: protocol::FORMAT_VERSION,
        lockstep_version: version.unwrap_or(env!("CARGO_PKG_VERSION")).to_string(),
        config: serde_json::to_string(&config).unwrap(),
        regions: regions.clone(),
        cpuid: vec![],
        same_host,
        connections: false,
        ft: None,
    })
    .unwrap();
    let mut auth = protocol::mac(token, &nonce, &handshake).unwrap().to_vec();
    auth.extend_from_slice(&handshake);
    protocol::write_frame(&mut conn, Kind::Auth, &auth).unwrap();
    (conn, regions)
}

fn memfd(len: u64, seal: bool) -> std::fs::File {
    // SAFETY: a NUL-terminated name; the new descriptor is owned by the File.
    let file = unsafe {
        std::fs::File::from_raw_fd(libc::memfd_create(
            c"hostile".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        ))
    };
    file.set_len(len).unwrap();
    if seal {
        // SAFETY: F_ADD_SEALS on our own descriptor.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(rc, 0);
    }
    file
}

#[test]
fn bogus_descriptors_from_a_local_peer_are_refused_and_the_destination_serves_on() {
    if !require_kvm("bogus_descriptors_from_a_local_peer_are_refused_and_the_destination_serves_on")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let destination = TestHost::start(vec![]);
    let config = vm_config("victim", "counter 100", 1, 64);
    let plain = tempfile::tempfile().unwrap();
    plain.set_len(64 << 20).unwrap();
    let small = memfd(32 << 20, true);
    let unsealed = memfd(64 << 20, false);
    let good = memfd(64 << 20, true);
    let cases: [(&str, Vec<RawFd>, &str); 5] = [
        ("a regular file", vec![plain.as_raw_fd()], "not a memfd"),
        (
            "a memfd of the wrong size",
            vec![small.as_raw_fd()],
            "not 67108864",
        ),
        (
            "an unsealed memfd",
            vec![unsealed.as_raw_fd()],
            "not sealed",
        ),
        ("no descriptor", vec![], "0 descriptors"),
        (
            "more descriptors than regions",
            vec![good.as_raw_fd(); 2],
            "2 descriptors",
        ),
    ];
    // Another lockstep version is refused over the copying stream, and accepted on the same
    // host (a VMM upgrade), where the state decoder has the last word.
    for same_host in [false, true] {
        let (id, listen, token) = incoming(&destination, &unix_listen(&dir, "in.sock"), "victim");
        let (mut conn, _) =
            local_handshake(&listen, &token, &config, 64, same_host, Some("0.0.0-other"));
        let answer = protocol::read_frame(&mut conn).unwrap();
        match same_host {
            false => assert_eq!(
                (
                    answer.kind,
                    protocol::reason_text(&answer.payload).contains("0.0.0-other")
                ),
                (Kind::Refuse, true)
            ),
            true => assert_eq!((answer.kind, answer.payload), (Kind::Accept, vec![1])),
        }
        drop(conn);
        assert_eq!(wait_ended(&destination, &id, WAIT)["phase"], "failed");
        nothing_left(&destination, "victim");
    }
    for (what, fds, why) in cases {
        let (id, listen, token) = incoming(&destination, &unix_listen(&dir, "in.sock"), "victim");
        let answer = hostile_local_source(&listen, &token, &config, 64, &fds);
        assert_eq!(answer.kind, Kind::Abort, "{what}");
        let info = wait_ended(&destination, &id, WAIT);
        assert_eq!(info["phase"], "failed", "{what}: {info}");
        let error = info["error"].as_str().unwrap();
        assert!(error.contains(why), "{what}: {error}");
        nothing_left(&destination, "victim");
    }
}

#[test]
fn takeover_moves_every_running_vm_into_a_new_process_and_the_old_one_exits() {
    if !require_kvm("takeover_moves_every_running_vm_into_a_new_process_and_the_old_one_exits") {
        return;
    }
    // With console sockets: the old process holds them until each switch.
    let old = TestHost::start_with(
        vec![
            vm_config("one", "counter 100", 1, 128),
            vm_config("two", "counter 100", 2, 256),
        ],
        json!({ "console_sockets": true }),
    );
    old.wait_serial("one", "LKS counter=3 ", WAIT);
    old.wait_serial("two", "LKS counter=3 ", WAIT);
    let old_pid = old.pid();
    let (new, code) = old.take_over();
    assert_eq!(code, Some(0), "the old host exits 0:\n{}", new.log());
    assert_ne!(new.pid(), old_pid);
    // The old process is gone: the control API that answers is the new one's.
    assert_eq!(new.call("GET", "/v1/host", "/v1/host", None).status, 200);
    let list = new.call("GET", "/v1/vms", "/v1/vms", None).json();
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    for vm in ["one", "two"] {
        assert_eq!(new.state(vm), "running", "{}", new.log());
        let moved = counters(&new.serial(vm)).last().copied().unwrap();
        counter_moves(|| new.serial(vm), moved + 2);
        // One serial log, written by the old process and then the new: the whole transcript.
        let all = counters(&new.serial(vm));
        assert!(
            all.first() == Some(&1) && all.windows(2).all(|w| w[1] == w[0] + 1),
            "{vm}: the counter goes on with nothing lost or repeated: {all:?}"
        );
    }
    assert!(
        new.log().contains("2 running VMs moved into this process"),
        "{}",
        new.log()
    );
    // The console sockets are the new process's, at the same place.
    for vm in ["one", "two"] {
        let path = new.dir().join("state").join(vm).join("console.sock");
        let _client = UnixStream::connect(&path).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let line = format!("console client connected on {}", path.display());
        while !new.log().contains(&line) {
            assert!(std::time::Instant::now() < deadline, "{}", new.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn the_tap_is_handed_over_and_a_udp_stream_goes_on_across_a_same_host_migration() {
    if !require_kvm("the_tap_is_handed_over_and_a_udp_stream_goes_on_across_a_same_host_migration")
    {
        return;
    }
    const COUNT: usize = 3000;
    let ns = NetNs::create();
    let dir = tempfile::tempdir().unwrap();
    let host_ip = ns.host_ip();
    let receiver = {
        let host_ip = host_ip.clone();
        ns.run(move || {
            let sock = std::net::UdpSocket::bind((host_ip.as_str(), 9100)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut seqs = Vec::new();
            let mut buf = [0u8; 2048];
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                let seq = udp_check(&buf[..n]).expect("intact payload");
                seqs.push(seq);
                if seq as usize == COUNT - 1 {
                    break;
                }
            }
            seqs
        })
    };
    // 3000 datagrams at 1000 a second: the migration happens in the middle of the stream.
    let script = format!("net udp-stream {host_ip} 9100 512 {COUNT} 1000");
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&format!(
            "lks.mode=run lks.ip={}/24 lks.run=\"{script}\"",
            ns.guest_ip()
        ))
        .set("name", json!("talker"))
        .set("network-interfaces", json!([{ "iface_id": "eth0", "host_dev_name": ns.tap(), "guest_mac": "06:00:0a:4d:00:0b" }]))
        .build();
    let source = TestHost::start_in(vec![vm], json!({}), Some(ns.name()));
    let destination = TestHost::start_in(vec![], json!({}), Some(ns.name()));
    source.wait_serial("talker", "LKS net udp-stream start", WAIT);
    std::thread::sleep(Duration::from_millis(800));
    let (in_id, listen, token) = incoming(&destination, &unix_listen(&dir, "in.sock"), "talker");
    let id = migrate(
        &source,
        "talker",
        json!({ "destination": listen, "token": token }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "completed");
    assert_eq!(info["pages"], 0, "{info}");
    let seqs = receiver.join().unwrap();
    let pause = info["downtime_ms"].as_f64().unwrap();
    eprintln!(
        "tap handed over: {} of {COUNT} datagrams, pause {pause:.1} ms",
        seqs.len()
    );
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]) && seqs.last() == Some(&(COUNT as u32 - 1)),
        "the stream goes on through the destination, nothing repeated or reordered: {:?}",
        &seqs[seqs.len().saturating_sub(20)..]
    );
    // At 1000 a second, a pause below 100 ms explains fewer than 100 missing datagrams.
    assert!(
        seqs.len() + 100 >= COUNT,
        "{} of {COUNT} datagrams arrived",
        seqs.len()
    );
    let serial = destination.wait_serial("talker", "LKS run done", WAIT);
    assert!(serial.contains("LKS run done"));
}

#[test]
fn a_takeover_that_cannot_move_every_vm_gives_the_moved_ones_back() {
    if !require_kvm("a_takeover_that_cannot_move_every_vm_gives_the_moved_ones_back") {
        return;
    }
    let mut old = TestHost::start(vec![
        vm_config("a", "counter 100", 1, 128),
        vm_config("b", "counter 100", 1, 64),
    ]);
    old.wait_serial("a", "LKS counter=3 ", WAIT);
    old.wait_serial("b", "LKS counter=3 ", WAIT);
    // A file where the new process would listen for "b": it is never taken over, so "b"
    // cannot move. "a" moves first (VMs go in name order), then comes back.
    let in_the_way = old.dir().join("state").join(".takeover-b.sock");
    std::fs::write(&in_the_way, "not a socket").unwrap();
    let (code, log) = old.failed_take_over();
    assert_eq!(code, Some(1), "the new process gives up:\n{log}");
    assert!(log.contains("takeover: b:"), "{log}");
    assert!(
        log.contains("a went back to the old host"),
        "{log}\n{}",
        old.log()
    );
    assert_eq!(std::fs::read(&in_the_way).unwrap(), b"not a socket");
    // The old host serves on with both VMs, and "a" counts on there.
    assert_eq!(old.call("GET", "/v1/host", "/v1/host", None).status, 200);
    for vm in ["a", "b"] {
        assert_eq!(old.state(vm), "running", "{}", old.log());
        let now = counters(&old.serial(vm)).last().copied().unwrap();
        counter_moves(|| old.serial(vm), now + 1);
        let all = counters(&old.serial(vm));
        assert!(
            all.first() == Some(&1) && all.windows(2).all(|w| w[1] == w[0] + 1),
            "{vm}: nothing lost or repeated: {all:?}"
        );
    }
}

#[test]
fn the_vsock_socket_is_handed_over_and_answers_on_the_destination() {
    if !require_kvm("the_vsock_socket_is_handed_over_and_answers_on_the_destination") {
        return;
    }
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut vm = vm_config("sock", "counter 100 30;vsock listen 6000 60", 1, 128);
    vm["vsock"] = json!({ "guest_cid": 3, "uds_path": uds });
    let source = TestHost::start(vec![vm]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("sock", "LKS counter=3 ", WAIT);
    let (in_id, listen, token) = incoming(&destination, &unix_listen(&dir, "in.sock"), "sock");
    let id = migrate(
        &source,
        "sock",
        json!({ "destination": listen, "token": token }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "completed");
    // The source's VM is gone and left the socket file to the destination.
    assert_eq!(vm_status(&source, "sock"), 404);
    assert!(uds.exists(), "the vsock socket file stays");
    destination.wait_serial("sock", "LKS vsock listening port=6000", WAIT);
    let mut conn = UnixStream::connect(&uds).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(
        ok.starts_with("OK "),
        "the destination answers CONNECT: {ok:?}"
    );
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    conn.write_all(&data).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    reader.read_to_end(&mut echoed).unwrap();
    assert!(
        echoed == data,
        "the echo through the destination is byte-exact"
    );
}

/// Reads `stream` until its output holds `needle`; panics on end of file or a quiet 20 s.
fn read_until(stream: &mut UnixStream, seen: &mut String, needle: &str) {
    use std::io::Read;
    let mut buf = [0u8; 1024];
    while !seen.contains(needle) {
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}\n{seen}"));
        assert!(
            n > 0,
            "the console closed while waiting for {needle:?}:\n{seen}"
        );
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[test]
fn a_vsock_connection_carries_numbered_messages_across_a_same_host_migration() {
    if !require_kvm("a_vsock_connection_carries_numbered_messages_across_a_same_host_migration") {
        return;
    }
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut vm = vm_config("talk", "vsock listen 6000 90;vsock info", 1, 128);
    vm["vsock"] = json!({ "guest_cid": 3, "uds_path": uds });
    let source = TestHost::start(vec![vm]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("talk", "LKS vsock listening port=6000", WAIT);
    let mut conn = UnixStream::connect(&uds).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");

    // A writer numbers its messages and sends one every 2 ms until told to stop; a reader
    // keeps every byte echoed back until the guest closes.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, sent, mut conn) = (stop.clone(), sent.clone(), conn.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut all = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let msg = format!("message {:06}\n", sent.load(Ordering::SeqCst));
                conn.write_all(msg.as_bytes()).unwrap();
                all.extend_from_slice(msg.as_bytes());
                sent.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            all
        })
    };
    let echoed = Arc::new(Mutex::new(Vec::new()));
    let reading = {
        let echoed = echoed.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return None,
                    Ok(n) => echoed.lock().unwrap().extend_from_slice(&buf[..n]),
                    Err(e) => return Some(e.to_string()),
                }
            }
        })
    };
    let echoed_count = || {
        echoed
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    };
    let wait_echoed = |n: usize| {
        let deadline = std::time::Instant::now() + WAIT;
        while echoed_count() < n {
            assert!(std::time::Instant::now() < deadline, "{n} echoes");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_echoed(50);
    let (in_id, listen, token) = incoming(&destination, &unix_listen(&dir, "in.sock"), "talk");
    let id = migrate(
        &source,
        "talk",
        json!({ "destination": listen, "token": token }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    assert_eq!(info["pages"], 0, "the same-host path: {info}");
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "completed");
    // Messages went on during the move; more after it, through the destination.
    let at_switch = sent.load(Ordering::SeqCst);
    wait_echoed(at_switch + 50);
    stop.store(true, Ordering::SeqCst);
    let all = writer.join().unwrap();
    let error = reading.join().unwrap();
    assert_eq!(error, None, "the connection failed");
    let echoed = echoed.lock().unwrap().clone();
    let lines = all.iter().filter(|&&b| b == b'\n').count();
    assert!(
        echoed == all,
        "every message echoed once, in order: sent {lines} messages ({} bytes), got {} bytes back",
        all.len(),
        echoed.len()
    );
    let after = destination.wait_serial("talk", "LKS run done", WAIT);
    let report = GuestReport::parse(&format!("{}{after}", source.serial("talk")));
    let listen: Vec<&str> = report.all("vsock listen port").collect();
    assert!(
        listen.len() == 1
            && listen[0].contains(&format!("received={} ", all.len()))
            && listen[0].contains("closed_by=peer-shutdown"),
        "the guest's one connection took every byte and ended by the host's shutdown: {listen:?}"
    );
    let infos: Vec<&str> = report.all("vsock info").collect();
    assert!(
        infos.len() == 1 && infos[0].contains("resets=0"),
        "no transport reset reached the guest: {infos:?}"
    );
}

#[test]
fn a_console_client_keeps_its_session_across_a_same_host_migration() {
    if !require_kvm("a_console_client_keeps_its_session_across_a_same_host_migration") {
        return;
    }
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args("lks.mode=monitor")
        .mem_mib(128)
        .set("name", json!("chat"))
        .build();
    let consoles = json!({ "console_sockets": true });
    let source = TestHost::start_with(vec![vm], consoles.clone());
    let destination = TestHost::start_with(vec![], consoles);
    source.wait_serial("chat", "lks> ", WAIT);
    let path = source.dir().join("state").join("chat").join("console.sock");
    let mut client = UnixStream::connect(&path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut seen = String::new();
    client.write_all(b"echo typed-before\r").unwrap();
    read_until(&mut client, &mut seen, "\ntyped-before");
    read_until(&mut client, &mut seen, "lks> ");

    let (in_id, listen, token) = incoming(&destination, &unix_listen(&dir, "in.sock"), "chat");
    let id = migrate(
        &source,
        "chat",
        json!({ "destination": listen, "token": token }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    assert_eq!(info["pages"], 0, "the same-host path: {info}");
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "completed");
    assert_eq!(vm_status(&source, "chat"), 404);

    // The same connection, now served by the destination: keys reach the guest and its
    // answer comes back.
    client.write_all(b"echo typed-after\r").unwrap();
    read_until(&mut client, &mut seen, "\ntyped-after");
    assert!(
        destination.log().contains("console client handed over"),
        "{}",
        destination.log()
    );
}

#[test]
fn a_console_client_keeps_its_session_across_a_takeover() {
    if !require_kvm("a_console_client_keeps_its_session_across_a_takeover") {
        return;
    }
    use std::io::Write;
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args("lks.mode=monitor")
        .mem_mib(128)
        .set("name", json!("chat"))
        .build();
    let old = TestHost::start_with(vec![vm], json!({ "console_sockets": true }));
    old.wait_serial("chat", "lks> ", WAIT);
    let path = old.dir().join("state").join("chat").join("console.sock");
    let mut client = UnixStream::connect(&path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut seen = String::new();
    client.write_all(b"echo typed-before\r").unwrap();
    read_until(&mut client, &mut seen, "\ntyped-before");
    read_until(&mut client, &mut seen, "lks> ");
    let (new, code) = old.take_over();
    assert_eq!(code, Some(0), "the old host exits 0:\n{}", new.log());
    assert_eq!(new.state("chat"), "running", "{}", new.log());
    // The old process is gone; the client's connection is the new one's.
    client.write_all(b"echo typed-after\r").unwrap();
    read_until(&mut client, &mut seen, "\ntyped-after");
}
