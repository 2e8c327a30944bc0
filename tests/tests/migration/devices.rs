//! Devices across the switch: a disk written with sequence numbers all the way through, a UDP
//! request/response stream through a bridge that loses at most what the pause explains, the
//! guest announced on its new tap (RARP frames, the bridge's FDB), vsock connections reset.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_tests::host::TestHost;
use lockstep_tests::netns::NetNs;
use lockstep_tests::pattern::{fnv1a64, sector_pattern, udp_payload};
use lockstep_tests::{guest_images, require_kvm, GuestReport, VmConfigBuilder};
use serde_json::{json, Value};

use super::*;

const MAC: &str = "06:00:0a:4e:00:07";
const MAC_BYTES: [u8; 6] = [0x06, 0x00, 0x0a, 0x4e, 0x00, 0x07];

/// Migrates `vm` from `source` to `destination` over a fresh Unix socket, with `overrides`
/// merged into the incoming request; returns the source's last progress.
pub(crate) fn migrate_over_unix(
    source: &TestHost,
    destination: &TestHost,
    vm: &str,
    overrides: Value,
) -> Value {
    let path = destination.dir().join("incoming.sock");
    let mut body = json!({ "listen": format!("unix:{}", path.display()), "name": vm });
    if let (Some(b), Some(o)) = (body.as_object_mut(), overrides.as_object()) {
        b.extend(o.clone());
    }
    let (in_id, listen, token) = incoming_with(destination, &body);
    let id = migrate(source, vm, json!({ "destination": listen, "token": token }));
    let info = wait_ended(source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    let arrived = wait_ended(destination, &in_id, WAIT);
    assert_eq!(
        arrived["phase"],
        "completed",
        "{arrived}\n{}",
        destination.log()
    );
    eprintln!("migrated {vm}: {info}");
    info
}

#[test]
fn disk_writes_go_on_across_the_switch_with_no_pass_lost_and_the_image_complete() {
    if !require_kvm("disk_writes_go_on_across_the_switch_with_no_pass_lost_and_the_image_complete")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("shared.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    // 2 MiB rewritten pass after pass (4 KiB requests, 4 in flight), each pass its own seed.
    let passes = 100;
    let mut config = vm_config(
        "writer",
        &format!("blk 0 stream 0 4096 100 {passes}"),
        1,
        128,
    );
    config["drives"] =
        json!([{ "drive_id": "data", "path_on_host": disk, "is_root_device": false }]);
    let source = TestHost::start(vec![config]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("writer", "LKS blk stream pass=3 ", WAIT);
    migrate_over_unix(&source, &destination, "writer", json!({}));
    let before = source.serial("writer");
    let after = destination.wait_serial("writer", "LKS run done", WAIT);
    let all = format!("{before}{after}");
    let report = GuestReport::parse(&all);
    let seen: Vec<u64> = report
        .all("blk stream pass")
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        GuestReport::parse(&after).all("blk stream pass").count() > 0,
        "the destination went on writing: {after}"
    );
    assert_eq!(
        seen,
        (seen[0]..seen[0] + passes).collect::<Vec<_>>(),
        "every pass once, in order, across the switch"
    );
    let done = report
        .all("blk stream")
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(
        GuestReport::field(&done, "passes") == Some(&passes.to_string())
            && done.contains("status=ok")
            && done.contains("bad_used=0")
            && done.contains("readback=match"),
        "{done}"
    );
    let last_seed: u64 = GuestReport::field(&done, "last_seed")
        .unwrap()
        .parse()
        .unwrap();
    // The image holds the last pass everywhere: no write lost at the switch, none replayed
    // late from an older pass.
    let data = std::fs::read(&disk).unwrap();
    let bad: Vec<u64> = (0..4096u64)
        .filter(|&s| {
            data[(s * 512) as usize..(s * 512 + 512) as usize] != sector_pattern(last_seed, s)
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{} sectors differ, first {:?}",
        bad.len(),
        bad.first()
    );
    let fnv = format!("{:016x}", fnv1a64(&data[..4096 * 512]));
    assert_eq!(
        GuestReport::field(&done, "fnv1a64"),
        Some(fnv.as_str()),
        "{done}"
    );
}

/// A namespace with a bridge `br0` at the host address, and two taps on it: the source's and
/// the destination's (one L2 segment, as two hosts' ports on one switch).
pub(crate) struct Bridged {
    pub(crate) ns: NetNs,
    pub(crate) tap_b: String,
}

impl Bridged {
    pub(crate) fn create() -> Bridged {
        let ns = NetNs::create();
        let tap_b = format!("{}b", ns.tap());
        ns.exec(&["ip", "addr", "flush", "dev", ns.tap()]);
        ns.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec(&["ip", "link", "set", ns.tap(), "master", "br0"]);
        ns.exec(&[
            "ip", "tuntap", "add", "dev", &tap_b, "mode", "tap", "vnet_hdr",
        ]);
        ns.exec(&["ip", "link", "set", &tap_b, "master", "br0"]);
        ns.exec(&["ip", "link", "set", &tap_b, "up"]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.host_ip()),
            "dev",
            "br0",
        ]);
        ns.exec(&["ip", "link", "set", "br0", "up"]);
        Bridged { ns, tap_b }
    }

    fn vm(&self, name: &str, script: &str) -> Value {
        VmConfigBuilder::new(&guest_images().elf)
            .boot_args(&format!(
                "lks.mode=run lks.ip={}/24 lks.run=\"{script}\"",
                self.ns.guest_ip()
            ))
            .mem_mib(128)
            .set("name", json!(name))
            .set(
                "network-interfaces",
                json!([{ "iface_id": "eth0", "host_dev_name": self.ns.tap(), "guest_mac": MAC }]),
            )
            .build()
    }

    pub(crate) fn overrides(&self) -> Value {
        json!({ "network_overrides": [{ "iface_id": "eth0", "host_dev_name": self.tap_b }] })
    }

    /// The bridge ports on which the FDB holds `MAC`.
    fn fdb_ports(&self) -> Vec<String> {
        let out = self.ns.output(&["bridge", "fdb", "show", "br", "br0"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(MAC))
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "dev")?;
                words.next().map(str::to_string)
            })
            .collect()
    }
}

/// Captures the frames arriving on `tap` (what the host process writes into it, and what the
/// bridge sends it) until `stop`; returns each frame's Ethernet bytes.
fn capture_rarp(
    ns: &NetNs,
    tap: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let capture = ns.capture(tap, stop);
    std::thread::spawn(move || {
        let seen = capture.join().expect("the capture thread");
        seen.into_iter().map(|(_, frame)| frame).collect()
    })
}

#[test]
fn the_guest_is_announced_on_its_new_port_and_the_bridge_learns_it() {
    if !require_kvm("the_guest_is_announced_on_its_new_port_and_the_bridge_learns_it") {
        return;
    }
    let net = Bridged::create();
    // An idle guest: nothing but the announcement can teach the bridge where it went.
    let source = TestHost::start_in(
        vec![net.vm("quiet", "counter 100")],
        json!({}),
        Some(net.ns.name()),
    );
    let destination = TestHost::start_in(vec![], json!({}), Some(net.ns.name()));
    source.wait_serial("quiet", "LKS counter=3 ", WAIT);
    let stop = Arc::new(AtomicBool::new(false));
    let capture = capture_rarp(&net.ns, &net.tap_b, stop.clone());
    migrate_over_unix(&source, &destination, "quiet", net.overrides());
    let last = counters(&source.serial("quiet")).last().copied().unwrap();
    counter_moves(|| destination.serial("quiet"), last);
    // The announcements go over 800 ms; the FDB has the MAC on the new port by then.
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.fdb_ports() != [net.tap_b.clone()] {
        assert!(
            Instant::now() < deadline,
            "the bridge never learned {MAC} on {}: {:?}\n{}",
            net.tap_b,
            net.fdb_ports(),
            destination.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let frames = capture.join().unwrap();
    let announced: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| {
            f.len() >= 42
                && f[..6] == [0xff; 6]
                && f[6..12] == MAC_BYTES
                && f[12..14] == [0x80, 0x35]
        })
        .collect();
    assert_eq!(
        announced.len(),
        5,
        "five RARP announcements from {MAC} on the new tap: {frames:?}"
    );
    for f in announced {
        assert_eq!(&f[20..22], &[0, 3], "request reverse");
        assert_eq!(&f[22..28], &MAC_BYTES);
        assert_eq!(&f[32..38], &MAC_BYTES);
    }
}

#[test]
fn udp_request_response_loses_at_most_what_the_pause_explains() {
    if !require_kvm("udp_request_response_loses_at_most_what_the_pause_explains") {
        return;
    }
    let net = Bridged::create();
    let source = TestHost::start_in(
        vec![net.vm("echo", "net udp-echo 7000")],
        json!({}),
        Some(net.ns.name()),
    );
    let destination = TestHost::start_in(vec![], json!({}), Some(net.ns.name()));
    source.wait_serial("echo", "LKS net udp-echo listening", WAIT);

    // One request every 2 ms for 6 s; the answers are read between requests.
    const INTERVAL: Duration = Duration::from_millis(2);
    const REQUESTS: u32 = 3000;
    let answered = Arc::new(AtomicU32::new(0));
    let client = {
        let (host_ip, guest_ip, answered) = (net.ns.host_ip(), net.ns.guest_ip(), answered.clone());
        net.ns.run(move || {
            let sock = UdpSocket::bind((host_ip.as_str(), 0)).unwrap();
            sock.connect((guest_ip.as_str(), 7000)).unwrap();
            sock.set_nonblocking(true).unwrap();
            let mut sent_at = Vec::with_capacity(REQUESTS as usize);
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            let start = Instant::now();
            let mut drain = |got: &mut Vec<u32>| {
                while let Ok(n) = sock.recv(&mut buf) {
                    let seq =
                        lockstep_tests::pattern::udp_check(&buf[..n]).expect("an intact answer");
                    got.push(seq);
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            };
            for q in 0..REQUESTS {
                let due = start + INTERVAL * q;
                while Instant::now() < due {
                    drain(&mut got);
                    std::thread::sleep(Duration::from_micros(200));
                }
                sent_at.push(start.elapsed());
                sock.send(&udp_payload(q, 64)).unwrap();
                drain(&mut got);
            }
            let end = Instant::now() + Duration::from_secs(1);
            while Instant::now() < end {
                drain(&mut got);
                std::thread::sleep(Duration::from_millis(1));
            }
            sock.send(b"stop").unwrap();
            (sent_at, got)
        })
    };
    // Migrate once the stream is well under way.
    let deadline = Instant::now() + WAIT;
    while answered.load(Ordering::Relaxed) < 300 {
        assert!(Instant::now() < deadline, "no answers from the guest");
        std::thread::sleep(Duration::from_millis(10));
    }
    let info = migrate_over_unix(&source, &destination, "echo", net.overrides());
    let downtime = info["downtime_ms"].as_f64().unwrap();
    let (sent_at, got) = client.join().unwrap();
    let mut seen = vec![0u32; REQUESTS as usize];
    for &q in &got {
        seen[q as usize] += 1;
    }
    let repeated: Vec<usize> = (0..seen.len()).filter(|&q| seen[q] > 1).collect();
    assert!(repeated.is_empty(), "answers repeated: {repeated:?}");
    let lost: Vec<usize> = (0..seen.len()).filter(|&q| seen[q] == 0).collect();
    eprintln!(
        "downtime {downtime:.1} ms; {} of {REQUESTS} requests unanswered: {lost:?}",
        lost.len()
    );
    assert!(
        seen[REQUESTS as usize - 100..].iter().all(|&n| n == 1),
        "the destination answers: {lost:?}"
    );
    // What the pause explains: the requests sent while the VM was paused (and queued on the
    // tap the source then closed), give or take what was in flight around it.
    let allowed = (downtime / INTERVAL.as_secs_f64() / 1e3).ceil() as usize + 10;
    assert!(
        lost.len() <= allowed,
        "{} requests lost, a {downtime:.1} ms pause explains {allowed}: {lost:?}",
        lost.len()
    );
    if let (Some(&first), Some(&last)) = (lost.first(), lost.last()) {
        let span = sent_at[last] - sent_at[first];
        assert!(
            span.as_secs_f64() * 1e3 <= downtime + 20.0 * INTERVAL.as_secs_f64() * 1e3,
            "the losses lie within the pause: {span:?} between the first and the last, pause {downtime:.1} ms"
        );
    }
    let after = destination.wait_serial("echo", "LKS run done", WAIT);
    let line = GuestReport::parse(&after)
        .require("net udp-echo port")
        .to_string();
    assert!(
        line.contains("bad=0") && line.contains("stopped_by=stop"),
        "{line}"
    );
}

#[test]
fn vsock_connections_are_reset_by_the_switch_and_new_ones_work() {
    if !require_kvm("vsock_connections_are_reset_by_the_switch_and_new_ones_work") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let script = "vsock listen 6000 15;vsock info;vsock listen 6001 30;vsock info";
    let mut config = vm_config("talker", script, 1, 128);
    config["vsock"] = json!({ "guest_cid": 3, "uds_path": a });
    let source = TestHost::start(vec![config]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("talker", "LKS vsock listening port=6000", WAIT);

    let connect = |path: &std::path::Path, port: u32| {
        let mut conn = UnixStream::connect(path).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        conn.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        assert!(ok.starts_with("OK "), "{ok:?}");
        (conn, reader)
    };
    let (mut old, mut old_reader) = connect(&a, 6000);
    old.write_all(b"before").unwrap();
    let mut echo = [0u8; 6];
    old_reader.read_exact(&mut echo).unwrap_or_else(|e| {
        let _ = source.wait_serial(
            "talker",
            "LKS vsock listen port=6000",
            Duration::from_secs(5),
        );
        panic!(
            "no echo before the migration: {e}\n{}\n{}",
            source.serial("talker"),
            source.log()
        )
    });
    assert_eq!(&echo, b"before");

    migrate_over_unix(
        &source,
        &destination,
        "talker",
        json!({ "vsock_override": { "uds_path": b } }),
    );
    // The connection to the old host ends (end of file or a reset), well before its timeout.
    let mut rest = Vec::new();
    let started = Instant::now();
    match old_reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "still open after {:?}",
            started.elapsed()
        ),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.exists() {
        assert!(Instant::now() < deadline, "the source's socket is gone");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The guest saw the transport reset, and a new connection on the new host works.
    destination.wait_serial("talker", "LKS vsock listening port=6001", WAIT);
    let (mut new, mut new_reader) = connect(&b, 6001);
    new.write_all(b"after the move").unwrap();
    new.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    new_reader.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, b"after the move");
    let after = destination.wait_serial("talker", "LKS run done", WAIT);
    let all = format!("{}{after}", source.serial("talker"));
    let report = GuestReport::parse(&all);
    let infos: Vec<&str> = report.all("vsock info").collect();
    assert!(
        infos.len() == 2 && infos.iter().all(|l| l.contains("resets=1")),
        "one TRANSPORT_RESET, at the switch: {infos:?}"
    );
    let listens: Vec<&str> = report.all("vsock listen port").collect();
    assert!(
        listens
            .last()
            .is_some_and(|l| l.starts_with("6001 result=ok") && l.contains("received=14")),
        "{listens:?}"
    );
}
