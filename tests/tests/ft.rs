//! Fault-tolerant pairs (issue #13) between two `lockstep host` processes on loopback TCP, with
//! a real etcd as the arbiter: the secondary takes over from a primary killed with SIGKILL or
//! frozen with SIGSTOP, resuming from the last checkpoint; a frozen primary that comes back
//! finds it lost and stops its copy; a primary whose secondary dies runs on unprotected; an
//! unpaired secondary drops its copy; bad options are refused with the field named.

use std::time::{Duration, Instant};

use lockstep_tests::etcd::Etcd;
use lockstep_tests::host::TestHost;
use lockstep_tests::relay::Relay;
use lockstep_tests::{guest_images, GuestReport, VmConfigBuilder};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);

fn vm_config(name: &str, script: &str) -> Value {
    vm_config_smp(name, script, 1)
}

fn vm_config_smp(name: &str, script: &str, vcpus: u32) -> Value {
    VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&format!("lks.mode=run lks.run=\"{script}\""))
        .vcpus(vcpus)
        .mem_mib(128)
        .set("name", json!(name))
        .build()
}

fn counters(serial: &str) -> Vec<u64> {
    GuestReport::parse(serial)
        .all("counter")
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect()
}

fn call(host: &TestHost, method: &str, route: &str, path: &str, body: Option<&Value>) -> Value {
    let reply = host.call(method, route, path, body);
    assert!(reply.status < 300, "{method} {path}: {}", reply.text());
    reply.json()
}

/// Waits until `check` holds for the migration's info; returns it.
fn wait_migration(host: &TestHost, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    host.wait_migration(id, what, WAIT, check)
}

/// A side's options: 50 ms epochs; a 500 ms heartbeat timeout rather than the default 100 ms,
/// so that a loaded test machine's scheduling hiccups are not taken for a dead side (a killed
/// side's connection ends at once anyway; only the SIGSTOP test waits for the timeout).
fn ft_options(etcd: &Etcd, host_id: &str) -> Value {
    json!({
        "arbiter": [etcd.endpoint().to_string()], "host_id": host_id, "epoch_ms": 50,
        "heartbeat_timeout_ms": 500,
    })
}

/// A primary on one host running `script`, paired with a secondary on another; returns both
/// hosts and the two migrations' ids once the secondary has applied a few checkpoints.
struct Pair {
    primary: TestHost,
    secondary: TestHost,
    out_id: String,
    in_id: String,
}

fn pair(etcd: &Etcd, script: &str) -> Pair {
    pair_smp(etcd, script, 1)
}

fn pair_smp(etcd: &Etcd, script: &str, vcpus: u32) -> Pair {
    pair_config(etcd, vm_config_smp("ft", script, vcpus), Setup::default()).0
}

/// What a test adds to a pairing: fields of the secondary's listener request, of each side's
/// `ft` options, and whether the replication link goes through a [`Relay`].
#[derive(Default)]
struct Setup {
    incoming: Value,
    ft_a: Value,
    ft_b: Value,
    relay: bool,
}

/// `base` with the fields of `extra` (an object, or null for none) set.
fn with_fields(mut base: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().into_iter().flatten() {
        base[k] = v.clone();
    }
    base
}

/// Pairs a VM of `config` as `setup` says; returns the pair and its relay, if it has one.
fn pair_config(etcd: &Etcd, config: Value, setup: Setup) -> (Pair, Option<Relay>) {
    let primary = TestHost::start(vec![config]);
    let secondary = TestHost::start(vec![]);
    primary.wait_serial("ft", "LKS counter=3 ", WAIT);
    let request = json!({ "listen": "127.0.0.1:0", "name": "ft",
                          "ft": with_fields(ft_options(etcd, "b"), &setup.ft_b) });
    let incoming = call(
        &secondary,
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(&with_fields(request, &setup.incoming)),
    );
    let relay = setup
        .relay
        .then(|| Relay::start(incoming["listen"].as_str().unwrap()));
    let s = |k: &str| incoming[k].as_str().unwrap().to_string();
    let destination = relay.as_ref().map_or(s("listen"), |r| r.addr().to_string());
    let request = json!({
        "destination": destination, "token": s("token"),
        "ft": with_fields(ft_options(etcd, "a"), &setup.ft_a),
    });
    let out = call(
        &primary,
        "POST",
        "/v1/vms/{name}/migrate",
        "/v1/vms/ft/migrate",
        Some(&request),
    );
    let out_id = out["id"].as_str().unwrap().to_string();
    let in_id = s("id");
    let info = wait_migration(&primary, &out_id, "protection", |i| {
        i["phase"] == "protecting" && i["ft"]["committed_epoch"].as_u64() >= Some(5)
    });
    assert_eq!(info["ft"]["redundancy"], "full", "{info}");
    assert_eq!(info["ft"]["role"], "primary", "{info}");
    let metrics = primary.call("GET", "/metrics", "/metrics", None).text();
    let pair = info["ft"]["pair"].as_str().unwrap();
    assert!(
        metrics.contains(&format!(
            "lockstep_ft_redundancy{{vm=\"ft\",pair=\"{pair}\",side=\"primary\"}} 2"
        )),
        "{metrics}"
    );
    let info = wait_migration(&secondary, &in_id, "standby", |i| i["phase"] == "standby");
    assert_eq!(info["ft"]["redundancy"], "full", "{info}");
    let p = Pair {
        primary,
        secondary,
        out_id,
        in_id,
    };
    (p, relay)
}

fn signal(host: &TestHost, sig: i32) {
    // SAFETY: a signal to the test's own child process.
    assert_eq!(unsafe { libc::kill(host.pid() as i32, sig) }, 0);
}

fn record(etcd: &Etcd, pair: &str) -> (String, u64) {
    let seen = etcd
        .arbiter(Duration::from_secs(5))
        .read(pair)
        .unwrap()
        .expect("the pair has a record");
    (seen.record.live, seen.record.epoch)
}

/// The secondary runs the VM now, from a checkpoint: its counter starts where the primary's
/// was at most a little earlier (a checkpoint), never from the beginning, and goes on.
fn took_over(p: &Pair, last_on_primary: u64) {
    let info = wait_migration(&p.secondary, &p.in_id, "takeover", |i| {
        i["phase"] == "completed" || i["phase"] == "failed"
    });
    assert_eq!(info["phase"], "completed", "{info}\n{}", p.secondary.log());
    assert_eq!(info["ft"]["role"], "primary (took over)", "{info}");
    assert_eq!(info["ft"]["redundancy"], "degraded", "{info}");
    assert_eq!(p.secondary.state("ft"), "running");
    let deadline = Instant::now() + WAIT;
    let resumed = loop {
        let after = counters(&p.secondary.serial("ft"));
        if after.len() >= 3 {
            break after;
        }
        assert!(
            Instant::now() < deadline,
            "the secondary's VM prints nothing"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let first = resumed[0];
    assert!(
        first > 3 && first <= last_on_primary + 1,
        "resumed from a checkpoint: first {first}, the primary had printed {last_on_primary}"
    );
    assert!(
        resumed.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter goes on: {resumed:?}"
    );
}

#[test]
fn a_killed_primary_is_replaced_by_its_secondary_from_the_last_checkpoint() {
    let Some(etcd) = Etcd::start("ft::a_killed_primary") else {
        return;
    };
    let mut p = pair(&etcd, "counter 20");
    assert_eq!(record(&etcd, "ft"), ("a".to_string(), 1));
    let last = *counters(&p.primary.serial("ft")).last().unwrap();
    let killed = Instant::now();
    signal(&p.primary, libc::SIGKILL);
    p.primary.stop();
    took_over(&p, last + 5);
    eprintln!("took over within {:?} of the kill", killed.elapsed());
    assert_eq!(record(&etcd, "ft"), ("b".to_string(), 2));
}

#[test]
fn a_frozen_primary_is_replaced_and_stops_itself_when_it_thaws() {
    let Some(etcd) = Etcd::start("ft::a_frozen_primary") else {
        return;
    };
    let p = pair(&etcd, "counter 20");
    signal(&p.primary, libc::SIGSTOP);
    let last = counters(&p.primary.serial("ft")).last().copied().unwrap();
    took_over(&p, last);
    assert_eq!(record(&etcd, "ft"), ("b".to_string(), 2));
    signal(&p.primary, libc::SIGCONT);
    let info = wait_migration(&p.primary, &p.out_id, "the end", |i| i["phase"] == "failed");
    let error = info["error"].as_str().unwrap();
    assert!(
        error.contains("took over") && error.contains("stopped"),
        "{info}"
    );
    assert_eq!(info["ft"]["redundancy"], "lost", "{info}");
    let deadline = Instant::now() + WAIT;
    while p
        .primary
        .call("GET", "/v1/vms/{name}", "/v1/vms/ft", None)
        .status
        != 404
    {
        assert!(
            Instant::now() < deadline,
            "the old primary's VM is still there"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_primary_whose_secondary_dies_runs_on_unprotected() {
    let Some(etcd) = Etcd::start("ft::a_primary_whose_secondary_dies") else {
        return;
    };
    let mut p = pair(&etcd, "counter 20");
    signal(&p.secondary, libc::SIGKILL);
    p.secondary.stop();
    let info = wait_migration(&p.primary, &p.out_id, "the end", |i| i["phase"] == "failed");
    assert!(
        info["error"].as_str().unwrap().contains("unprotected"),
        "{info}"
    );
    assert_eq!(info["ft"]["redundancy"], "degraded", "{info}");
    assert_eq!(record(&etcd, "ft"), ("a".to_string(), 2));
    assert_eq!(p.primary.state("ft"), "running");
    let now = *counters(&p.primary.serial("ft")).last().unwrap();
    p.primary
        .wait_serial("ft", &format!("LKS counter={} ", now + 3), WAIT);
}

#[test]
fn a_users_pauses_and_resumes_keep_the_pair_protected() {
    let Some(etcd) = Etcd::start("ft::pauses") else {
        return;
    };
    let p = pair(&etcd, "counter 20");
    let pause = |verb: &str| {
        call(
            &p.primary,
            "POST",
            &format!("/v1/vms/{{name}}/{verb}"),
            &format!("/v1/vms/ft/{verb}"),
            None,
        )
    };
    // Pauses and resumes at every point of the epoch, some inside a checkpoint: the user's
    // state wins and the pairing goes on.
    for n in 0..40u64 {
        pause("pause");
        std::thread::sleep(Duration::from_millis(n % 7));
        pause("resume");
        std::thread::sleep(Duration::from_millis(n % 5));
    }
    assert_eq!(p.primary.state("ft"), "running");
    // Checkpoints go on while the user keeps the VM paused, and it stays paused.
    pause("pause");
    let info = wait_migration(&p.primary, &p.out_id, "checkpoints", |i| {
        i["phase"] == "protecting"
    });
    let at = info["ft"]["committed_epoch"].as_u64().unwrap();
    wait_migration(&p.primary, &p.out_id, "checkpoints while paused", |i| {
        i["ft"]["committed_epoch"].as_u64() >= Some(at + 3)
    });
    assert_eq!(p.primary.state("ft"), "paused");
    pause("resume");
    let info = wait_migration(&p.primary, &p.out_id, "checkpoints", |i| {
        i["ft"]["committed_epoch"].as_u64() >= Some(at + 6)
    });
    assert_eq!(info["phase"], "protecting", "{info}\n{}", p.primary.log());
    assert_eq!(info["ft"]["redundancy"], "full", "{info}");
    assert_eq!(p.primary.state("ft"), "running");
    // The counter ran on without a break or a repeat.
    let seen = counters(&p.primary.serial("ft"));
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
}

/// A pair whose replication connection goes through a relay the test can freeze; `a` and `b`
/// go into the primary's and the secondary's `ft` options.
fn pair_via_relay(etcd: &Etcd, a: Value, b: Value) -> (Pair, Relay) {
    let setup = Setup {
        ft_a: a,
        ft_b: b,
        relay: true,
        ..Setup::default()
    };
    let (p, relay) = pair_config(etcd, vm_config("ft", "counter 20"), setup);
    (p, relay.expect("the pair's relay"))
}

/// After a partition of the replication link: which side runs the VM (exactly one does), once
/// both sides have acted.
fn live_side_after_partition(p: &Pair) -> (&'static str, Value, Value) {
    let out = wait_migration(&p.primary, &p.out_id, "the end", |i| {
        i["phase"] != "protecting"
    });
    let back = wait_migration(&p.secondary, &p.in_id, "the end", |i| {
        i["phase"] != "standby"
    });
    let runs = |host: &TestHost| {
        host.call("GET", "/v1/vms/{name}", "/v1/vms/ft", None)
            .status
            == 200
    };
    // The losing primary stops its copy just after its claim fails.
    std::thread::sleep(Duration::from_millis(500));
    let (a, b) = (runs(&p.primary), runs(&p.secondary));
    assert!(
        a != b,
        "exactly one side runs the VM: primary {a}, secondary {b}\nprimary {out}\nsecondary {back}\n{}\n{}",
        p.primary.log(),
        p.secondary.log()
    );
    (if a { "a" } else { "b" }, out, back)
}

#[test]
fn a_partitioned_replication_link_leaves_exactly_one_side_live() {
    let Some(etcd) = Etcd::start("ft::partition") else {
        return;
    };
    // Both sides see silence and ask the arbiter; the side with the shorter timeout asks
    // first and wins. When that is the primary it runs on alone, and the secondary, asking
    // later, must lose: it may replace only the record it knew while standing by, not the one
    // the primary claimed since. When the secondary asks first it takes over, and the primary
    // finds the record moved on and stops its copy.
    for (a_ms, b_ms, winner) in [(400, 2000, "a"), (2000, 400, "b")] {
        let (p, relay) = pair_via_relay(
            &etcd,
            json!({ "heartbeat_timeout_ms": a_ms, "pair": winner }),
            json!({ "heartbeat_timeout_ms": b_ms, "pair": winner }),
        );
        relay.freeze();
        let (live, out, back) = live_side_after_partition(&p);
        assert_eq!(live, winner, "{out}\n{back}");
        assert_eq!(record(&etcd, winner), (winner.to_string(), 2));
        let (host, loser) = if winner == "a" {
            (&p.primary, &back)
        } else {
            (&p.secondary, &out)
        };
        assert_eq!(host.state("ft"), "running");
        let error = loser["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("not taking over") || error.contains("stopped"),
            "{loser}"
        );
    }
}

#[test]
fn a_second_heartbeat_path_keeps_a_secondary_from_taking_over_when_only_the_link_broke() {
    let Some(etcd) = Etcd::start("ft::second_path") else {
        return;
    };
    // The secondary would ask the arbiter first (its timeout is shorter) and win: it still
    // hears the primary on the second path, so it stands down, and the primary goes on alone.
    let path = json!("127.0.0.1:0");
    let (p, relay) = pair_via_relay(
        &etcd,
        json!({ "heartbeat_timeout_ms": 2000, "heartbeat_path": path }),
        json!({ "heartbeat_timeout_ms": 400, "heartbeat_path": path }),
    );
    relay.freeze();
    let (live, out, back) = live_side_after_partition(&p);
    assert_eq!(live, "a", "{out}\n{back}");
    let error = back["error"].as_str().unwrap_or_default();
    assert!(error.contains("second heartbeat path"), "{back}");
    assert_eq!(record(&etcd, "ft"), ("a".to_string(), 2));
    assert_eq!(p.primary.state("ft"), "running");
}

#[test]
fn unpairing_leaves_the_primary_running_and_the_secondary_empty() {
    let Some(etcd) = Etcd::start("ft::unpairing") else {
        return;
    };
    // The secondary keeps its own copy of the drive in an image it makes (it has none yet).
    let dir = tempfile::tempdir().unwrap();
    let (disk_a, disk_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let content = image_content();
    std::fs::write(&disk_a, &content).unwrap();
    let setup = Setup {
        incoming: json!({ "drive_overrides": [{ "drive_id": "data", "path_on_host": disk_b }] }),
        ..Setup::default()
    };
    let (p, _) = pair_config(
        &etcd,
        with_drive(vm_config("ft", "counter 20"), &disk_a),
        setup,
    );
    assert!(
        std::fs::read(&disk_b).unwrap() == content,
        "the image the secondary made holds the primary's disk"
    );
    call(
        &p.primary,
        "DELETE",
        "/v1/migrations/{id}",
        &format!("/v1/migrations/{}", p.out_id),
        None,
    );
    let out = wait_migration(&p.primary, &p.out_id, "the end", |i| {
        i["phase"] == "cancelled"
    });
    let back = wait_migration(&p.secondary, &p.in_id, "the end", |i| {
        i["phase"] == "cancelled"
    });
    eprintln!("primary {out}\nsecondary {back}");
    assert_eq!(p.primary.state("ft"), "running");
    assert_eq!(
        p.secondary
            .call("GET", "/v1/vms/{name}", "/v1/vms/ft", None)
            .status,
        404
    );
    assert!(!p.secondary.dir().join("state").join("ft").exists());
    assert!(
        !disk_b.exists(),
        "the image the secondary made for itself goes with it"
    );
    assert!(std::fs::read(&disk_a).unwrap() == content);
    assert_eq!(record(&etcd, "ft"), ("a".to_string(), 1));
}

/// A drive's content: 1 MiB that no two sectors share.
fn image_content() -> Vec<u8> {
    (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect()
}

/// `config` with one drive, `data`, on `image`.
fn with_drive(mut config: Value, image: &std::path::Path) -> Value {
    config["drives"] = json!([{ "drive_id": "data", "path_on_host": image,
                                "is_root_device": false, "is_read_only": false }]);
    config
}

#[test]
fn bad_pairing_options_are_refused_with_the_field_named() {
    let secondary = TestHost::start(vec![]);
    for (ft, field) in [
        (json!({ "arbiter": [], "host_id": "b" }), "arbiter"),
        (json!({ "arbiter": ["nowhere"], "host_id": "b" }), "arbiter"),
        (
            json!({ "arbiter": ["127.0.0.1:2379"], "host_id": "b c" }),
            "host_id",
        ),
        (
            json!({ "arbiter": ["127.0.0.1:2379"], "host_id": "b", "epoch_ms": 5 }),
            "epoch_ms",
        ),
        (
            json!({ "arbiter": ["127.0.0.1:2379"], "host_id": "b", "heartbeat_timeout_ms": 1 }),
            "heartbeat_timeout_ms",
        ),
        (
            json!({ "arbiter": ["127.0.0.1:2379"], "host_id": "b", "heartbeat_path": "x" }),
            "heartbeat_path",
        ),
        (
            json!({ "arbiter": ["127.0.0.1:2379"], "host_id": "b", "heartbeat_path": "0.0.0.0:0" }),
            "heartbeat_path",
        ),
        (
            json!({ "arbiter": ["127.0.0.1:2379"], "host_id": "b", "heartbeat_path": "192.0.2.1:9" }),
            "heartbeat_path: cannot bind",
        ),
    ] {
        let body = json!({ "listen": "127.0.0.1:0", "name": "ft", "ft": ft });
        let reply = secondary.call(
            "POST",
            "/v1/migrations/incoming",
            "/v1/migrations/incoming",
            Some(&body),
        );
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert!(
            reply.text().contains(&format!("ft: {field}")),
            "{field}: {}",
            reply.text()
        );
    }
}

#[test]
fn a_move_to_a_secondary_listener_is_refused_and_the_vm_runs_on() {
    let Some(etcd) = Etcd::start("ft::a_move_to_a_secondary_listener") else {
        return;
    };
    let primary = TestHost::start(vec![vm_config("ft", "counter 20")]);
    let secondary = TestHost::start(vec![]);
    primary.wait_serial("ft", "LKS counter=3 ", WAIT);
    let incoming = call(
        &secondary,
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(&json!({ "listen": "127.0.0.1:0", "name": "ft", "ft": ft_options(&etcd, "b") })),
    );
    let request = json!({ "destination": incoming["listen"], "token": incoming["token"] });
    let out = call(
        &primary,
        "POST",
        "/v1/vms/{name}/migrate",
        "/v1/vms/ft/migrate",
        Some(&request),
    );
    let id = out["id"].as_str().unwrap();
    let info = wait_migration(&primary, id, "the end", |i| i["phase"] == "failed");
    assert!(
        info["error"]
            .as_str()
            .unwrap()
            .contains("waits for a fault-tolerant pairing"),
        "{info}"
    );
    assert_eq!(primary.state("ft"), "running");
}

/// Asks `from`'s primary side (`out_id`) for a planned failover to `to`'s side (`in_id`), and
/// waits until the roles have switched: `to` runs the VM and protects it with a new pairing
/// (returned), `from` stands by as its secondary (its incoming migration, returned).
fn fail_over(from: &TestHost, out_id: &str, to: &TestHost, in_id: &str) -> (Value, Value) {
    let asked = call(
        from,
        "POST",
        "/v1/migrations/{id}/failover",
        &format!("/v1/migrations/{out_id}/failover"),
        None,
    );
    assert_eq!(asked["phase"], "protecting", "{asked}");
    let out = wait_migration(from, out_id, "the end", |i| i["phase"] != "protecting");
    assert_eq!(out["phase"], "completed", "{out}\n{}", from.log());
    assert_eq!(out["ft"]["role"], "primary (failed over)", "{out}");
    let took = wait_migration(to, in_id, "the end", |i| i["phase"] != "standby");
    assert_eq!(took["phase"], "completed", "{took}\n{}", to.log());
    assert_eq!(took["ft"]["role"], "primary (took over)", "{took}");
    assert_eq!(to.state("ft"), "running");
    let pairing = new_pairing(to, in_id);
    assert_eq!(pairing["ft"]["redundancy"], "full", "{pairing}");
    let deadline = Instant::now() + WAIT;
    let standing = loop {
        let all = call(from, "GET", "/v1/migrations", "/v1/migrations", None);
        let found =
            all.as_array().into_iter().flatten().find(|m| {
                m["direction"] == "incoming" && m["phase"] == "standby" && m["id"] != in_id
            });
        if let Some(found) = found {
            break found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the old primary does not stand by: {all}\n{}",
            from.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(standing["ft"]["role"], "secondary", "{standing}");
    (pairing, standing)
}

#[test]
fn a_planned_failover_switches_roles_with_nothing_lost_or_repeated() {
    let Some(etcd) = Etcd::start("ft::a_planned_failover") else {
        return;
    };
    let p = pair(&etcd, "counter 20");
    // A to B: B runs the VM, A becomes its secondary.
    let (on_b, on_a) = fail_over(&p.primary, &p.out_id, &p.secondary, &p.in_id);
    assert_eq!(record(&etcd, "ft"), ("b".to_string(), 2));
    // A second failover of the ended pairing is refused.
    let again = p.primary.call(
        "POST",
        "/v1/migrations/{id}/failover",
        &format!("/v1/migrations/{}/failover", p.out_id),
        None,
    );
    assert_eq!(again.status, 409, "{}", again.text());
    // And back: A runs the VM again, B stands by.
    let (id, back_id) = (on_b["id"].as_str().unwrap(), on_a["id"].as_str().unwrap());
    fail_over(&p.secondary, id, &p.primary, back_id);
    assert_eq!(record(&etcd, "ft"), ("a".to_string(), 3));
    assert_eq!(
        p.secondary
            .call("GET", "/v1/vms/{name}", "/v1/vms/ft", None)
            .status,
        404,
        "B's copy has ended"
    );
    // The counter ran on A, then on B, then on A again (its serial log goes on), each value
    // printed once.
    let on_a_before = counters(&p.primary.serial("ft")).len();
    let deadline = Instant::now() + WAIT;
    while counters(&p.primary.serial("ft")).len() < on_a_before + 3 {
        assert!(Instant::now() < deadline, "the VM prints nothing on A");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (a, b) = (
        counters(&p.primary.serial("ft")),
        counters(&p.secondary.serial("ft")),
    );
    assert!(
        !b.is_empty() && b.windows(2).all(|w| w[1] == w[0] + 1),
        "B: {b:?}"
    );
    let mut all: Vec<u64> = a.iter().chain(&b).copied().collect();
    all.sort_unstable();
    assert!(
        all.first() == Some(&1) && all.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter goes on with nothing lost or repeated: A {a:?}, B {b:?}"
    );
    assert!(
        a.iter().any(|&n| n > b[b.len() - 1]),
        "A runs after B: {a:?} {b:?}"
    );
}

/// A standby host's listener, for re-protection: (host, migration id, the `standby` object).
fn standby(etcd: &Etcd) -> (TestHost, String, Value) {
    let host = TestHost::start(vec![]);
    let incoming = call(
        &host,
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(&json!({ "listen": "127.0.0.1:0", "name": "ft", "ft": ft_options(etcd, "c") })),
    );
    let id = incoming["id"].as_str().unwrap().to_string();
    (
        host,
        id,
        json!({ "destination": incoming["listen"], "token": incoming["token"] }),
    )
}

/// The host's outgoing pairing of `ft` other than `not`, once it protects the VM.
fn new_pairing(host: &TestHost, not: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = host
            .call("GET", "/v1/migrations", "/v1/migrations", None)
            .json();
        let found = all.as_array().into_iter().flatten().find(|m| {
            m["id"] != not
                && m["direction"] == "outgoing"
                && m["phase"] == "protecting"
                && m["ft"]["committed_epoch"].as_u64() >= Some(3)
        });
        if let Some(found) = found {
            return found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no new protecting pairing: {all}\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_lone_side_is_protected_again_by_the_standby() {
    let Some(etcd) = Etcd::start("ft::a_lone_side_is_protected_again") else {
        return;
    };
    // The secondary dies: the primary pairs with the standby.
    let (third, third_id, spare) = standby(&etcd);
    let primary = TestHost::start(vec![vm_config("ft", "counter 20")]);
    let mut secondary = TestHost::start(vec![]);
    primary.wait_serial("ft", "LKS counter=3 ", WAIT);
    let mut b = ft_options(&etcd, "b");
    b["standby"] = spare.clone();
    let incoming = call(
        &secondary,
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(&json!({ "listen": "127.0.0.1:0", "name": "ft", "ft": b })),
    );
    let mut a = ft_options(&etcd, "a");
    a["standby"] = spare;
    let out = call(
        &primary,
        "POST",
        "/v1/vms/{name}/migrate",
        "/v1/vms/ft/migrate",
        Some(&json!({ "destination": incoming["listen"], "token": incoming["token"], "ft": a })),
    );
    let out_id = out["id"].as_str().unwrap().to_string();
    wait_migration(&primary, &out_id, "protection", |i| {
        i["phase"] == "protecting" && i["ft"]["committed_epoch"].as_u64() >= Some(3)
    });
    signal(&secondary, libc::SIGKILL);
    secondary.stop();
    let again = new_pairing(&primary, &out_id);
    assert_eq!(again["ft"]["redundancy"], "full", "{again}");
    let info = wait_migration(&third, &third_id, "standby", |i| i["phase"] == "standby");
    assert_eq!(info["ft"]["redundancy"], "full", "{info}");
    // The record still names the primary (its claim after losing the secondary won).
    assert_eq!(record(&etcd, "ft"), ("a".to_string(), 2));
    assert_eq!(primary.state("ft"), "running");
}

#[test]
fn a_secondary_that_took_over_is_protected_again_by_the_standby() {
    let Some(etcd) = Etcd::start("ft::a_secondary_that_took_over_is_protected") else {
        return;
    };
    let (third, third_id, spare) = standby(&etcd);
    let mut primary = TestHost::start(vec![vm_config("ft", "counter 20")]);
    let secondary = TestHost::start(vec![]);
    primary.wait_serial("ft", "LKS counter=3 ", WAIT);
    let mut b = ft_options(&etcd, "b");
    b["standby"] = spare;
    let incoming = call(
        &secondary,
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(&json!({ "listen": "127.0.0.1:0", "name": "ft", "ft": b })),
    );
    let in_id = incoming["id"].as_str().unwrap().to_string();
    let out = call(
        &primary,
        "POST",
        "/v1/vms/{name}/migrate",
        "/v1/vms/ft/migrate",
        Some(&json!({
            "destination": incoming["listen"], "token": incoming["token"],
            "ft": ft_options(&etcd, "a"),
        })),
    );
    let out_id = out["id"].as_str().unwrap().to_string();
    wait_migration(&primary, &out_id, "protection", |i| {
        i["phase"] == "protecting" && i["ft"]["committed_epoch"].as_u64() >= Some(3)
    });
    wait_migration(&secondary, &in_id, "standby", |i| i["phase"] == "standby");
    signal(&primary, libc::SIGKILL);
    primary.stop();
    let again = new_pairing(&secondary, &in_id);
    assert_eq!(again["ft"]["redundancy"], "full", "{again}");
    wait_migration(&third, &third_id, "standby", |i| i["phase"] == "standby");
    assert_eq!(record(&etcd, "ft"), ("b".to_string(), 2));
    assert_eq!(secondary.state("ft"), "running");
}

#[test]
fn a_two_vcpu_guest_survives_the_kill_of_its_primary() {
    let Some(etcd) = Etcd::start("ft::a_two_vcpu_guest") else {
        return;
    };
    // The second vCPU is online (halted with interrupts on) while the first counts: both
    // vCPUs' states are in every checkpoint and come back on the secondary.
    let mut p = pair_smp(&etcd, "counter 20", 2);
    assert!(p.primary.serial("ft").contains("LKS cpus_online=2"));
    let last = *counters(&p.primary.serial("ft")).last().unwrap();
    signal(&p.primary, libc::SIGKILL);
    p.primary.stop();
    took_over(&p, last + 5);
    let status = call(&p.secondary, "GET", "/v1/vms/{name}", "/v1/vms/ft", None);
    assert_eq!(
        status["config"]["machine-config"]["vcpu_count"], 2,
        "{status}"
    );
}

/// pywbem against hosts' CIM endpoints. `prepare URL ARBITER`: PrepareIncomingMigration for a
/// secondary (host id b), prints `listen <DestinationHost> <Token>`; `pair URL ARBITER DEST
/// TOKEN`: MigrateVirtualSystemToHost of `ft` with fault-tolerance settings (host id a), prints
/// `pair <rc>`; `list URL`: each LKS_RedundancySet as `set <InstanceID> <RedundancyStatus>
/// <TypeOfSet>`; `failover URL`: Failover on the first set, prints `failover <rc>`.
const PYWBEM_FT: &str = r#"
import sys, pywbem
action, url = sys.argv[1:3]
conn = pywbem.WBEMConnection(url, ("operator", "s3cret-pass"), default_namespace="root/cimv2")
service = conn.EnumerateInstanceNames("LKS_VirtualSystemMigrationService")[0]
if action == "prepare":
    rc, out = conn.InvokeMethod("PrepareIncomingMigration", service, Listen="127.0.0.1:0",
                                SystemName="ft", FTArbiter=sys.argv[3], FTHostID="b",
                                FTHeartbeatTimeout=pywbem.Uint32(500),
                                DriveOverrides=sys.argv[4:])
    print("listen", out["DestinationHost"], out["Token"], rc)
elif action == "pair":
    settings = pywbem.CIMInstance("LKS_VirtualSystemMigrationSettingData", properties={
        "MigrationType": pywbem.Uint16(2), "Token": sys.argv[5], "FTArbiter": sys.argv[3],
        "FTHostID": "a", "FTEpoch": pywbem.Uint64(50), "FTHeartbeatTimeout": pywbem.Uint64(500)})
    vm = pywbem.CIMInstanceName("LKS_VirtualComputerSystem",
                                {"CreationClassName": "LKS_VirtualComputerSystem", "Name": "ft"},
                                namespace="root/cimv2")
    rc, out = conn.InvokeMethod("MigrateVirtualSystemToHost", service, ComputerSystem=vm,
                                DestinationHost=sys.argv[4], MigrationSettingData=settings)
    print("pair", rc)
else:
    sets = conn.EnumerateInstances("LKS_RedundancySet")
    for s in sets:
        print("set", s["InstanceID"], int(s["RedundancyStatus"]), [int(t) for t in s["TypeOfSet"]])
    if action == "failover":
        rc, _ = conn.InvokeMethod("Failover", sets[0].path)
        print("failover", rc)
"#;

fn pywbem_ft(args: &[&str]) -> String {
    let out = lockstep_tests::programs::output(
        lockstep_tests::programs::command("python3")
            .args(["-c", PYWBEM_FT])
            .args(args),
    );
    assert!(
        out.status.success(),
        "pywbem: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A host with a CIM endpoint over HTTP; returns it and the endpoint's URL.
fn cim_host(vms: Vec<Value>) -> (TestHost, String) {
    let port = lockstep_tests::free_port();
    let cim = json!({ "cim": {
        "http": format!("127.0.0.1:{port}"),
        "https": format!("127.0.0.1:{}", lockstep_tests::free_port()),
        "users": [{ "name": "operator",
                    "password_hash": lockstep_tests::host::hash_password("s3cret-pass") }],
    }});
    (
        TestHost::start_with(vms, cim),
        format!("http://127.0.0.1:{port}"),
    )
}

#[test]
fn cim_pairs_the_vm_shows_a_redundancy_set_and_fails_it_over() {
    if !lockstep_cim::testing::have_pywbem() {
        return;
    }
    let Some(etcd) = Etcd::start("ft::cim") else {
        return;
    };
    let arbiter = etcd.endpoint().to_string();
    // The primary's drive, and the secondary's own image for it (same host, another file).
    let dir = tempfile::tempdir().unwrap();
    let (disk_a, disk_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let content = image_content();
    std::fs::write(&disk_a, &content).unwrap();
    // One that exists already, at the primary's size (the unpairing test has the secondary
    // make its own).
    std::fs::write(&disk_b, vec![0u8; content.len()]).unwrap();
    let (primary, url_a) = cim_host(vec![with_drive(vm_config("ft", "counter 20"), &disk_a)]);
    let (secondary, url_b) = cim_host(vec![]);
    primary.wait_serial("ft", "LKS counter=3 ", WAIT);
    // Both sides through CIM: the secondary's listener (on its own image), then the pairing.
    let drive_override = format!("data={}", disk_b.display());
    let prepared = pywbem_ft(&["prepare", &url_b, &arbiter, &drive_override]);
    let words: Vec<&str> = prepared.split_whitespace().collect();
    assert!(words.len() == 4 && words[0] == "listen", "{prepared}");
    let paired = pywbem_ft(&["pair", &url_a, &arbiter, words[1], words[2]]);
    assert!(paired.contains("pair 4096"), "{paired}\n{}", primary.log());
    let all = call(&primary, "GET", "/v1/migrations", "/v1/migrations", None);
    let out_id = all[0]["id"].as_str().unwrap().to_string();
    let info = wait_migration(&primary, &out_id, "protection", |i| {
        i["phase"] == "protecting" && i["ft"]["committed_epoch"].as_u64() >= Some(3)
    });
    assert_eq!(info["ft"]["pair"], "ft", "{info}");
    let back = call(&secondary, "GET", "/v1/migrations", "/v1/migrations", None);
    let in_id = back[0]["id"].as_str().unwrap().to_string();
    wait_migration(&secondary, &in_id, "standby", |i| i["phase"] == "standby");
    assert!(
        std::fs::read(&disk_b).unwrap() == content,
        "the secondary's own image (DriveOverrides) holds the primary's disk"
    );
    let seen = pywbem_ft(&["list", &url_a]);
    assert!(
        seen.lines()
            .any(|l| l.starts_with("set ") && l.contains(" 2 [4]")),
        "a fully redundant sparing set: {seen}"
    );
    let done = pywbem_ft(&["failover", &url_a]);
    assert!(done.contains("failover 0"), "{done}");
    let info = wait_migration(&primary, &out_id, "the failover", |i| {
        i["phase"] != "protecting"
    });
    assert_eq!(info["phase"], "completed", "{info}\n{}", primary.log());
    let back = wait_migration(&secondary, &in_id, "the takeover", |i| {
        i["phase"] != "standby"
    });
    assert_eq!(back["phase"], "completed", "{back}");
    assert_eq!(secondary.state("ft"), "running");
    let running = call(&secondary, "GET", "/v1/vms/{name}", "/v1/vms/ft", None);
    assert_eq!(
        running["config"]["drives"][0]["path_on_host"],
        json!(disk_b),
        "the new primary runs on its own image: {running}"
    );
    let after = pywbem_ft(&["list", &url_a]);
    assert!(
        after
            .lines()
            .any(|l| l.starts_with("set ") && l.contains(" 4 [4]")),
        "the primary's set says its copy is gone: {after}"
    );
    // The roles switched: this host stands by as the secondary of a new, fully redundant pair.
    let deadline = Instant::now() + WAIT;
    loop {
        let now = pywbem_ft(&["list", &url_a]);
        if now
            .lines()
            .any(|l| l.starts_with("set ") && l.contains(" 2 [4]"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new pair on the old primary: {now}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
