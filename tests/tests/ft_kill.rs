//! FT's promise under fire (issue #13, point 7): a client sends numbered requests over UDP to the
//! test guest's journaling service (`net udp-journal`: each request written to the disk and
//! flushed before its answer) while the primary's host process is killed with SIGKILL at a
//! random point. Two host processes, each with its own tap on a bridge in a namespace the test
//! makes, each with its own disk image, and a real etcd in that namespace as the arbiter. After
//! every kill: every request the client saw answered is on the new primary's own disk with the
//! digest it was answered with, requests go on being answered by the new primary to the last
//! one, and none was answered twice with different results. `LKS_FT_TRIALS` (default 10) and
//! `LKS_FT_SEED` replay or widen it (`bench/run.sh ft-kill` runs 100).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use lockstep_tests::etcd::Etcd;
use lockstep_tests::host::TestHost;
use lockstep_tests::journal::{
    check_answered_on_disk, run_client, send_stop, ClientConfig, StoppedBy, SECTOR,
};
use lockstep_tests::netns::NetNs;
use lockstep_tests::relay::Relay;
use lockstep_tests::require_kvm;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const VM: &str = "journal";
const PORT: u16 = 7100;
const MAC: &str = "06:00:0a:4d:00:0f";
/// A header and 16383 record slots: more than the requests of a trial.
const DISK_SECTORS: u64 = 16384;
/// Requests per trial: with output-triggered checkpoints the primary answers about 3,000 a
/// second, so the load outlasts the latest kill point (1.55 s) and the new primary answers too.
const REQUESTS: u64 = 12_000;

fn journal_vm(ns: &NetNs, disk: &Path) -> Value {
    let script = format!("net udp-journal {PORT}");
    lockstep_tests::journal::journal_vm(ns, disk, &script, VM, MAC)
        .mem_mib(128)
        .build()
}

fn wait_for(host: &TestHost, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    host.wait_migration(id, what, WAIT, check)
}

fn image(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(DISK_SECTORS * SECTOR as u64)
        .unwrap();
}

/// A namespace whose tap is on a bridge with a second tap (one per host process) and an etcd
/// inside it; `None` (said loudly) without KVM or etcd.
fn fixture(test: &str) -> Option<(NetNs, String, Etcd)> {
    if !require_kvm(test) {
        return None;
    }
    let ns = NetNs::create();
    let tap_b = ns.bridge_with_second_tap();
    let etcd = Etcd::start_in(&format!("ft_kill::{test}"), Some(ns.name()))?;
    Some((ns, tap_b, etcd))
}

/// A journal VM paired between two hosts on the bridge, each with its own image.
struct Paired {
    primary: TestHost,
    secondary: TestHost,
    out_id: String,
    in_id: String,
    pair: String,
    disk_a: std::path::PathBuf,
    disk_b: std::path::PathBuf,
    target: SocketAddr,
    /// The replication connection's relay, where the test asked for one.
    relay: Option<Relay>,
    _dir: tempfile::TempDir,
}

/// How the primary reaches the secondary.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    Direct,
    /// Through a [`Relay`] in the namespace that the test can hold.
    Relayed,
}

fn paired(ns: &NetNs, etcd: &Etcd, tap_b: &str, pair: &str, link: Link) -> Paired {
    let dir = tempfile::tempdir().unwrap();
    let (disk_a, disk_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    image(&disk_a);
    image(&disk_b);
    let ft = |host: &str| {
        json!({ "arbiter": [etcd.endpoint().to_string()], "host_id": host, "pair": pair,
                "epoch_ms": 50, "heartbeat_timeout_ms": 500 })
    };
    let primary = TestHost::start_in(vec![journal_vm(ns, &disk_a)], json!({}), Some(ns.name()));
    let secondary = TestHost::start_in(vec![], json!({}), Some(ns.name()));
    primary.wait_serial(VM, "LKS net udp-journal listening", WAIT);
    let reply = secondary.call(
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(&json!({
            "listen": "127.0.0.1:0", "name": VM, "ft": ft("b"),
            "network_overrides": [{ "iface_id": "eth0", "host_dev_name": tap_b }],
            "drive_overrides": [{ "drive_id": "journal", "path_on_host": disk_b }],
        })),
    );
    assert_eq!(reply.status, 201, "{}", reply.text());
    let incoming = reply.json();
    let relay = (link == Link::Relayed).then(|| {
        let to = incoming["listen"].as_str().unwrap().to_string();
        ns.run(move || Relay::start(&to)).join().unwrap()
    });
    let destination = relay
        .as_ref()
        .map_or(incoming["listen"].clone(), |r| json!(r.addr()));
    let reply = primary.call(
        "POST",
        "/v1/vms/{name}/migrate",
        &format!("/v1/vms/{VM}/migrate"),
        Some(&json!({ "destination": destination, "token": incoming["token"], "ft": ft("a") })),
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
    let out_id = reply.json()["id"].as_str().unwrap().to_string();
    let in_id = incoming["id"].as_str().unwrap().to_string();
    wait_for(&primary, &out_id, "protection", |i| {
        i["phase"] == "protecting" && i["ft"]["committed_epoch"].as_u64() >= Some(3)
    });
    Paired {
        primary,
        secondary,
        out_id,
        in_id,
        pair: pair.to_string(),
        disk_a,
        disk_b,
        target: SocketAddr::new(ns.guest_ip().parse().unwrap(), PORT),
        relay,
        _dir: dir,
    }
}

/// Starts the client on `REQUESTS` requests; returns it and when it started.
fn load(
    ns: &NetNs,
    target: SocketAddr,
) -> (
    std::thread::JoinHandle<lockstep_tests::journal::ClientReport>,
    Instant,
) {
    let mut config = ClientConfig::new(target, REQUESTS);
    config.bind = SocketAddr::new(ns.host_ip().parse().unwrap(), 0);
    config.window = 32;
    config.resend_after = Duration::from_millis(150);
    config.max_sends = 200;
    config.deadline = Duration::from_secs(45);
    let started = Instant::now();
    (
        ns.run(move || run_client(&config).expect("the client's socket")),
        started,
    )
}

/// Who took over: the original secondary (B: its migration `p.in_id`, the record's epoch 2), or
/// after a planned failover the original primary (A: the migration it stood by under, and the
/// record's epoch).
#[derive(Clone, Copy)]
enum NewPrimary<'a> {
    B,
    A(&'a str, u64),
}

/// After a takeover: the client saw every request answered, consistently, some by the new
/// primary (after `since`); each is on the new primary's own disk; the record names it.
fn check_after_takeover(
    ns: &NetNs,
    etcd: &Etcd,
    p: &mut Paired,
    new: NewPrimary,
    report: &lockstep_tests::journal::ClientReport,
    since: Duration,
) -> usize {
    let (host, in_id, disk, record) = match new {
        NewPrimary::B => (&mut p.secondary, p.in_id.as_str(), &p.disk_b, ("b", 2)),
        NewPrimary::A(id, epoch) => (&mut p.primary, id, &p.disk_a, ("a", epoch)),
    };
    let took = wait_for(host, in_id, "takeover", |i| {
        ["completed", "failed", "cancelled"].contains(&i["phase"].as_str().unwrap_or(""))
    });
    assert_eq!(took["phase"], "completed", "{took}\n{}", host.log());
    assert!(
        report.consistent(),
        "nothing answered twice with different results: {report}"
    );
    assert_eq!(
        report.stopped_by,
        StoppedBy::Count,
        "every request answered, the last ones by the new primary: {report}\n{}",
        host.log()
    );
    assert!(report.gaps().is_empty(), "{report}");
    let after = report.answered.values().filter(|a| a.at > since).count();
    assert!(after > 0, "the new primary answered requests: {report}");
    let target = p.target;
    let stop_from = SocketAddr::new(ns.host_ip().parse().unwrap(), 0);
    ns.run(move || send_stop(stop_from, target))
        .join()
        .unwrap()
        .unwrap();
    host.wait_serial(VM, "stopped_by=stop", WAIT);
    host.stop();
    // Every answer the client saw is on the new primary's own disk, with its digest.
    if let Err(lost) = check_answered_on_disk(report, disk) {
        panic!("answered but not on the new primary's disk: {lost}");
    }
    assert_eq!(etcd.record(&p.pair), Some((record.0.to_string(), record.1)));
    after
}

/// One trial: pair, load, kill the primary `kill_after` into the load, check.
fn trial(ns: &NetNs, etcd: &Etcd, tap_b: &str, trial: u32, kill_after: Duration) -> (usize, usize) {
    let mut p = paired(ns, etcd, tap_b, &format!("journal-{trial}"), Link::Direct);
    let (running, started) = load(ns, p.target);
    // The kill point, not an assertion: the client runs on meanwhile.
    std::thread::sleep(kill_after);
    let killed = started.elapsed();
    // SAFETY: signals our own child, the primary's host process.
    unsafe { libc::kill(p.primary.pid() as i32, libc::SIGKILL) };
    let report = running.join().expect("the client thread");
    eprintln!("trial {trial}: SIGKILL {kill_after:?} into the load: {report}");
    let after = check_after_takeover(ns, etcd, &mut p, NewPrimary::B, &report, killed);
    (report.answered.len(), after)
}

#[test]
fn a_frozen_primary_sends_nothing_after_the_takeover_and_stops_itself() {
    frozen_primary(
        "a_frozen_primary_sends_nothing_after_the_takeover_and_stops_itself",
        Link::Direct,
    );
}

/// The window a frozen primary is most dangerous in: it sent a checkpoint, the secondary
/// acknowledged it, and the ack waits unread in the primary's socket while the primary is
/// stopped and the secondary takes over. Thawed, the primary reads an ack that looks fresh; the
/// output of that epoch must stay held (the secondary may already be answering in its place).
/// The relay holds the acks back until the primary is frozen, then delivers them.
#[test]
fn a_primary_frozen_with_an_ack_unread_releases_nothing_after_the_takeover() {
    frozen_primary(
        "a_primary_frozen_with_an_ack_unread_releases_nothing_after_the_takeover",
        Link::Relayed,
    );
}

/// SIGSTOP of the primary 500 ms into the load (with `Link::Relayed`, once a checkpoint's ack
/// is held back), the secondary's takeover, SIGCONT: the old primary puts no frame of the
/// guest's on its tap, stops itself, and every answered request is on the new primary's disk.
fn frozen_primary(test: &str, link: Link) {
    let Some((ns, tap_b, etcd)) = fixture(test) else {
        return;
    };
    let mut p = paired(&ns, &etcd, &tap_b, "frozen", link);
    let (running, started) = load(&ns, p.target);
    std::thread::sleep(Duration::from_millis(500));
    if let Some(relay) = &p.relay {
        relay.hold_back(true);
        // A checkpoint goes out meanwhile (one every 50 ms at most) and its ack is held; the
        // primary waits for it, well within its 500 ms heartbeat timeout.
        std::thread::sleep(Duration::from_millis(120));
    }
    let frozen = started.elapsed();
    // SAFETY: signals our own child, the primary's host process.
    unsafe { libc::kill(p.primary.pid() as i32, libc::SIGSTOP) };
    wait_for(&p.secondary, &p.in_id, "takeover", |i| {
        i["phase"] == "completed"
    });
    if let Some(relay) = &p.relay {
        // The held acks now wait in the frozen primary's socket.
        relay.hold_back(false);
        std::thread::sleep(Duration::from_millis(100));
    }
    // From here on the old primary must never put a frame of the guest's on the wire.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let capture = ns.capture(ns.tap(), stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    unsafe { libc::kill(p.primary.pid() as i32, libc::SIGCONT) };
    let info = wait_for(&p.primary, &p.out_id, "the end", |i| i["phase"] == "failed");
    let error = info["error"].as_str().unwrap();
    assert!(
        error.contains("took over") && error.contains("stopped"),
        "{info}"
    );
    let deadline = Instant::now() + WAIT;
    while p
        .primary
        .call("GET", "/v1/vms/{name}", &format!("/v1/vms/{VM}"), None)
        .status
        != 404
    {
        assert!(
            Instant::now() < deadline,
            "the old primary's VM is still there"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = running.join().expect("the client thread");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = capture.join().expect("the capture thread");
    let mac: Vec<u8> = MAC
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let from_old: Vec<_> = seen
        .iter()
        .filter(|(kind, frame)| {
            *kind != libc::PACKET_OUTGOING && frame.get(6..12) == Some(&mac[..])
        })
        .collect();
    assert!(
        from_old.is_empty(),
        "the old primary sent {} frame(s) after it lost: {:02x?}",
        from_old.len(),
        from_old.first()
    );
    eprintln!(
        "frozen {frozen:?} into the load: {report}; {} frames seen on the old tap",
        seen.len()
    );
    check_after_takeover(&ns, &etcd, &mut p, NewPrimary::B, &report, frozen);
}

#[test]
fn every_answered_request_survives_a_sigkill_of_the_primary() {
    let Some((ns, tap_b, etcd)) =
        fixture("every_answered_request_survives_a_sigkill_of_the_primary")
    else {
        return;
    };
    let trials = lockstep_tests::trials::count("LKS_FT_TRIALS", 10);
    let mut rng = lockstep_tests::trials::Rng::new(
        "every_answered_request_survives_a_sigkill_of_the_primary",
        "LKS_FT_SEED",
    );
    let (mut answered, mut after) = (0, 0);
    for n in 0..trials {
        let kill_after = Duration::from_millis(50 + rng.below(1500));
        let (a, b) = trial(&ns, &etcd, &tap_b, n, kill_after);
        answered += a;
        after += b;
    }
    eprintln!("{trials} trials: {answered} requests answered, {after} by the new primaries");
}

/// The incoming migration on `host` that stands by, other than `not`.
fn standing_by(host: &TestHost, not: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = host
            .call("GET", "/v1/migrations", "/v1/migrations", None)
            .json();
        let found =
            all.as_array().into_iter().flatten().find(|m| {
                m["direction"] == "incoming" && m["phase"] == "standby" && m["id"] != not
            });
        if let Some(found) = found {
            return found["id"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "nothing stands by: {all}\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_planned_failover_under_load_switches_roles_and_the_old_primary_takes_over_again() {
    let Some((ns, tap_b, etcd)) = fixture("a_planned_failover_under_load_switches_roles") else {
        return;
    };
    let mut p = paired(&ns, &etcd, &tap_b, "planned", Link::Direct);
    let (running, started) = load(&ns, p.target);
    std::thread::sleep(Duration::from_millis(300));
    let reply = p.primary.call(
        "POST",
        "/v1/migrations/{id}/failover",
        &format!("/v1/migrations/{}/failover", p.out_id),
        None,
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
    let took = wait_for(&p.secondary, &p.in_id, "the failover", |i| {
        i["phase"] != "standby"
    });
    assert_eq!(took["phase"], "completed", "{took}\n{}", p.secondary.log());
    // A stands by on its own image and tap now; B protects the VM with it.
    let back_id = standing_by(&p.primary, "");
    wait_for(&p.primary, &back_id, "checkpoints", |i| {
        i["ft"]["committed_epoch"].as_u64() >= Some(3)
    });
    assert_eq!(etcd.record(&p.pair), Some(("b".to_string(), 2)));
    // The new primary dies: A takes over from its last checkpoint.
    std::thread::sleep(Duration::from_millis(200));
    let killed = started.elapsed();
    // SAFETY: signals our own child, the new primary's host process.
    unsafe { libc::kill(p.secondary.pid() as i32, libc::SIGKILL) };
    let report = running.join().expect("the client thread");
    eprintln!(
        "planned failover, then SIGKILL of the new primary {killed:?} into the load: {report}"
    );
    check_after_takeover(
        &ns,
        &etcd,
        &mut p,
        NewPrimary::A(&back_id, 3),
        &report,
        killed,
    );
}
