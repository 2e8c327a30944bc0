//! Pause, snapshot and restore on KVM: a guest counter, its memory, its disk and its network
//! carry on in a new host process; a paused guest loses and duplicates no I/O; corrupt,
//! truncated or incompatible snapshots are refused while the host keeps serving.

use std::net::UdpSocket;
use std::time::Duration;

use lockstep_tests::host::TestHost;
use lockstep_tests::netns::NetNs;
use lockstep_tests::pattern::{sector_pattern, udp_check};
use lockstep_tests::{guest_images, require_kvm, GuestReport, VmConfigBuilder};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);

fn counters(serial: &str) -> Vec<(u64, u64)> {
    GuestReport::parse(serial)
        .all("counter")
        .filter_map(|v| {
            let n = v.split_whitespace().next()?.parse().ok()?;
            let ns = GuestReport::field(v, "ns")?.parse().ok()?;
            Some((n, ns))
        })
        .collect()
}

#[test]
fn snapshot_restores_into_a_new_host_process_and_carries_on() {
    if !require_kvm("snapshot_restores_into_a_new_host_process_and_carries_on") {
        return;
    }
    let ns = NetNs::create();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let script = format!(
        "memfill 16 7;blk 0 write 0 64 9;blk 0 flush;counter 100 40;memcheck;blk 0 read 0 64 9;net ping {} 3;clock",
        ns.host_ip()
    );
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&format!("lks.mode=run lks.ip={}/24 lks.run=\"{script}\"", ns.guest_ip()))
        .vcpus(2)
        .mem_mib(256)
        .set("name", json!("keeper"))
        .set("drives", json!([{ "drive_id": "data", "path_on_host": disk, "is_root_device": false, "cache_type": "Writeback" }]))
        .set("network-interfaces", json!([{ "iface_id": "eth0", "host_dev_name": ns.tap(), "guest_mac": "06:00:0a:4d:00:09" }]))
        .build();

    let mut first = TestHost::start_in(vec![vm], json!({}), Some(ns.name()));
    first.wait_serial("keeper", "LKS counter=8 ", WAIT);
    let state = dir.path().join("keeper.state");
    let memory = dir.path().join("keeper.mem");
    let reply = first.call(
        "POST",
        "/v1/vms/{name}/snapshot",
        "/v1/vms/keeper/snapshot",
        Some(&json!({ "state_path": state, "memory_path": memory })),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["memory_bytes"], 256u64 << 20);
    // The first host stops its VM at once; whatever it did after the snapshot is lost.
    let shutdown = json!({ "force": true });
    first.call(
        "POST",
        "/v1/vms/{name}/shutdown",
        "/v1/vms/keeper/shutdown",
        Some(&shutdown),
    );
    let before = counters(&first.serial("keeper"));
    assert_eq!(first.stop(), Some(0));

    let second = TestHost::start_in(vec![], json!({}), Some(ns.name()));
    let reply = second.call(
        "POST",
        "/v1/restore",
        "/v1/restore",
        Some(&json!({ "state_path": state, "memory_path": memory, "name": "revived" })),
    );
    assert_eq!(reply.status, 201, "{}", reply.text());
    let serial = second.wait_serial("revived", "LKS clock", WAIT);
    let after = counters(&serial);
    let snapshot_at = before
        .iter()
        .map(|c| c.0)
        .filter(|&n| n >= 8)
        .min()
        .unwrap();
    assert!(
        after.first().unwrap().0 >= snapshot_at
            && after.first().unwrap().0 <= before.last().unwrap().0 + 1,
        "the counter goes on from the snapshot: before {before:?}, after {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "no jumps: {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[1].1 >= w[0].1),
        "the guest clock never runs backwards: {after:?}"
    );
    let saved_ns = before
        .iter()
        .find(|c| c.0 == after[0].0.saturating_sub(1))
        .map(|c| c.1)
        .unwrap_or(0);
    assert!(
        after[0].1 >= saved_ns && after[0].1 - saved_ns < 5_000_000_000,
        "the clock carries on near where it was: {saved_ns} then {}",
        after[0].1
    );
    let report = GuestReport::parse(&serial);
    assert!(
        report.require("memcheck").contains("status=match"),
        "guest memory survived: {serial}"
    );
    assert!(
        report.require("blk read").contains("pattern=match"),
        "the disk works after restore"
    );
    assert!(
        report.require("net ping").contains("received=3"),
        "the network works after restore: {serial}"
    );
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(&data[..512], &sector_pattern(9, 0)[..]);
}

#[test]
fn corrupt_truncated_or_foreign_snapshots_are_refused() {
    if !require_kvm("corrupt_truncated_or_foreign_snapshots_are_refused") {
        return;
    }
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args("lks.mode=run lks.run=\"counter 100\"")
        .set("name", json!("orig"))
        .build();
    let host = TestHost::start(vec![vm]);
    host.wait_serial("orig", "LKS counter=2 ", WAIT);
    let dir = tempfile::tempdir().unwrap();
    let (state, memory) = (dir.path().join("s.state"), dir.path().join("s.mem"));
    let body = json!({ "state_path": state, "memory_path": memory });
    assert_eq!(
        host.call(
            "POST",
            "/v1/vms/{name}/snapshot",
            "/v1/vms/orig/snapshot",
            Some(&body)
        )
        .status,
        200
    );
    let good_state = std::fs::read(&state).unwrap();
    let good_memory_len = std::fs::metadata(&memory).unwrap().len();

    let restore = |name: &str| -> (u16, Value) {
        let body = json!({ "state_path": state, "memory_path": memory, "name": name });
        let reply = host.call("POST", "/v1/restore", "/v1/restore", Some(&body));
        (reply.status, reply.json())
    };
    // What is wrong, how to damage the files, what the error must say.
    type Case<'a> = (&'a str, Box<dyn Fn()>, &'a str);
    let mut cases: Vec<Case> = Vec::new();
    let (s1, g1) = (state.clone(), good_state.clone());
    cases.push((
        "flipped state byte",
        Box::new(move || {
            let mut b = g1.clone();
            let at = b.len() - 100;
            b[at] ^= 0x40;
            std::fs::write(&s1, b).unwrap();
        }),
        "corrupt",
    ));
    let (s2, g2) = (state.clone(), good_state.clone());
    cases.push((
        "truncated state",
        Box::new(move || std::fs::write(&s2, &g2[..g2.len() / 2]).unwrap()),
        "truncated",
    ));
    let (s3, g3) = (state.clone(), good_state.clone());
    cases.push((
        "not a snapshot",
        Box::new(move || {
            let mut b = g3.clone();
            b[..8].copy_from_slice(b"GARBAGE!");
            std::fs::write(&s3, b).unwrap();
        }),
        "not a lockstep snapshot",
    ));
    let (s4, g4) = (state.clone(), good_state.clone());
    cases.push((
        "other format version",
        Box::new(move || {
            let mut b = g4.clone();
            b[8..12].copy_from_slice(&99u32.to_le_bytes());
            std::fs::write(&s4, b).unwrap();
        }),
        "format version 99",
    ));
    let (s5, g5, m5) = (state.clone(), good_state.clone(), memory.clone());
    cases.push((
        "truncated memory",
        Box::new(move || {
            std::fs::write(&s5, &g5).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&m5)
                .unwrap()
                .set_len(good_memory_len / 2)
                .unwrap();
        }),
        "truncated",
    ));

    for (what, damage, needle) in cases {
        damage();
        let (status, body) = restore("copy");
        assert_eq!(status, 400, "{what}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(needle), "{what}: {message}");
        // Nothing changed: no new VM, the original still runs, the API still answers.
        let list = host.call("GET", "/v1/vms", "/v1/vms", None).json();
        assert_eq!(list.as_array().unwrap().len(), 1, "{what}: {list}");
        assert_eq!(host.state("orig"), "running");
    }
}

#[test]
fn pause_in_the_middle_of_disk_and_network_transfers_loses_nothing() {
    if !require_kvm("pause_in_the_middle_of_disk_and_network_transfers_loses_nothing") {
        return;
    }
    let ns = NetNs::create();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let host_ip = ns.host_ip();
    let receiver = {
        let host_ip = host_ip.clone();
        ns.run(move || {
            let sock = UdpSocket::bind((host_ip.as_str(), 9100)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            let mut seqs = Vec::new();
            let mut buf = [0u8; 2048];
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                seqs.push(udp_check(&buf[..n]).expect("intact payload"));
                if seqs.len() == 1500 {
                    break;
                }
            }
            seqs
        })
    };
    let script = format!("net udp-stream {host_ip} 9100 512 1500 2000;blk 0 stream 0 2048 100 30");
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&format!("lks.mode=run lks.ip={}/24 lks.run=\"{script}\"", ns.guest_ip()))
        .set("name", json!("busy"))
        .set("drives", json!([{ "drive_id": "d", "path_on_host": disk, "is_root_device": false }]))
        .set("network-interfaces", json!([{ "iface_id": "eth0", "host_dev_name": ns.tap(), "guest_mac": "06:00:0a:4d:00:0a" }]))
        .build();
    let host = TestHost::start_in(vec![vm], json!({}), Some(ns.name()));
    host.wait_serial("busy", "LKS net udp-stream start", WAIT);
    std::thread::sleep(Duration::from_millis(700));
    for _ in 0..3 {
        assert_eq!(
            host.call("POST", "/v1/vms/{name}/pause", "/v1/vms/busy/pause", None)
                .json()["state"],
            "paused"
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            host.call("POST", "/v1/vms/{name}/resume", "/v1/vms/busy/resume", None)
                .json()["state"],
            "running"
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    let seqs = receiver.join().unwrap();
    assert_eq!(
        seqs,
        (0..1500).collect::<Vec<u32>>(),
        "every datagram once, in order, across the pauses"
    );
    host.wait_serial("busy", "LKS blk stream start", WAIT);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..2 {
        host.call("POST", "/v1/vms/{name}/pause", "/v1/vms/busy/pause", None);
        std::thread::sleep(Duration::from_millis(400));
        host.call("POST", "/v1/vms/{name}/resume", "/v1/vms/busy/resume", None);
        std::thread::sleep(Duration::from_millis(300));
    }
    let serial = host.wait_serial("busy", "LKS run done", WAIT);
    let line = GuestReport::parse(&serial)
        .all("blk stream")
        .last()
        .unwrap()
        .to_string();
    assert!(
        line.contains("passes=30")
            && line.contains("bad_used=0")
            && line.contains("readback=match"),
        "{line}"
    );
    let data = std::fs::read(&disk).unwrap();
    for s in [0u64, 1000, 2047] {
        assert_eq!(
            &data[(s * 512) as usize..(s * 512 + 512) as usize],
            &sector_pattern(129, s)[..],
            "sector {s} holds the last pass"
        );
    }
}

#[test]
fn a_restored_vm_can_be_snapshotted_and_restored_again() {
    if !require_kvm("a_restored_vm_can_be_snapshotted_and_restored_again") {
        return;
    }
    // The restored VM's memory maps the first snapshot file, so its second snapshot must carry
    // pages the guest never touched since.
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args("lks.mode=run lks.run=\"memfill 32 5;counter 100 50;memcheck\"")
        .set("name", json!("gen0"))
        .build();
    let host = TestHost::start(vec![vm]);
    let dir = tempfile::tempdir().unwrap();
    let snapshot = |n: u32| -> Value {
        json!({ "state_path": dir.path().join(format!("{n}.state")), "memory_path": dir.path().join(format!("{n}.mem")) })
    };
    // Snapshot VM `from` as snapshot `n` and restore it as VM `to`.
    let pass_on = |from: &str, n: u32, to: &str| {
        let taken = snapshot(n);
        assert_eq!(
            host.call(
                "POST",
                "/v1/vms/{name}/snapshot",
                &format!("/v1/vms/{from}/snapshot"),
                Some(&taken)
            )
            .status,
            200
        );
        let mut restore = taken;
        restore["name"] = json!(to);
        assert_eq!(
            host.call("POST", "/v1/restore", "/v1/restore", Some(&restore))
                .status,
            201
        );
    };
    host.wait_serial("gen0", "LKS counter=3 ", WAIT);
    pass_on("gen0", 1, "gen1");
    host.wait_serial("gen1", "LKS counter=", WAIT);
    pass_on("gen1", 2, "gen2");
    // The whole line: a read in the middle of it once saw only "LKS memcheck mi".
    let serial = host.wait_serial_line("gen2", "LKS memcheck", WAIT);
    assert!(
        GuestReport::parse(&serial)
            .require("memcheck")
            .contains("status=match"),
        "{serial}"
    );
}
