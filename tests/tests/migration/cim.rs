//! Live migration driven through CIM (DSP1081) with pywbem: two hosts with CIM endpoints, a
//! counting guest sent from one to the other by MigrateVirtualSystemToHost after the refusals
//! (unknown VM, unknown host, wrong token, malformed destination) left it running; the job's
//! PercentComplete polled to 100, the indication of its end, the profile registered; then the
//! guest counting on at the destination and both hosts' migration counters at /metrics.

use lockstep_cim::testing::{have_pywbem, run_pywbem_migration, Target};
use lockstep_tests::host::{hash_password, TestHost};
use lockstep_tests::{free_port, require_kvm};
use serde_json::json;

use super::*;

const USER: &str = "operator";
const PASSWORD: &str = "m1grate-pass";

/// A host with a CIM endpoint on loopback (the test speaks plain HTTP to it), and its target.
fn cim_host(vms: Vec<Value>) -> (TestHost, Target) {
    let port = free_port();
    let host = TestHost::start_with(
        vms,
        json!({ "cim": {
            "http": format!("127.0.0.1:{port}"),
            "https": format!("127.0.0.1:{}", free_port()),
            "users": [{ "name": USER, "password_hash": hash_password(PASSWORD) }],
        }}),
    );
    let target = Target {
        url: format!("http://127.0.0.1:{port}"),
        user: USER.into(),
        password: PASSWORD.into(),
        ca_cert: None,
    };
    (host, target)
}

/// The value of one sample line of `/metrics`.
fn sample(host: &TestHost, line: &str) -> Option<f64> {
    let text = host.call("GET", "/metrics", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_vm_migrates_through_cim_with_a_job_an_indication_and_counters() {
    if !require_kvm("a_vm_migrates_through_cim_with_a_job_an_indication_and_counters")
        || !have_pywbem()
    {
        return;
    }
    let script = "memfill 16 7;counter 100 600";
    let (source, src) = cim_host(vec![vm_config("cimmover", script, 1, 128)]);
    let (destination, dst) = cim_host(vec![]);
    source.wait_serial("cimmover", "LKS counter=3 ", WAIT);

    // 8 MiB/s: the 16 MiB the guest filled take a couple of seconds, so the job is seen moving.
    run_pywbem_migration(
        &src,
        &dst,
        &[
            "--vm",
            "cimmover",
            "--new-name",
            "cimmoved",
            "--bandwidth",
            "8",
            "--timeout",
            "90",
            "--check-arrival",
        ],
    );

    assert_eq!(
        vm_status(&source, "cimmover"),
        404,
        "the source gave the VM up"
    );
    assert_eq!(destination.state("cimmoved"), "running");
    let last = counters(&destination.serial("cimmoved"))
        .last()
        .copied()
        .unwrap_or(0);
    counter_moves(|| destination.serial("cimmoved"), last);

    // The source: one sent, two refused (nothing listening, the wrong token); the destination:
    // one received, one listener spent by the wrong token.
    let out = |what: &str| format!("lockstep_migrations_{what}_total{{direction=\"outgoing\"}}");
    let inc = |what: &str| format!("lockstep_migrations_{what}_total{{direction=\"incoming\"}}");
    assert_eq!(
        sample(&source, &out("started")),
        Some(3.0),
        "{}",
        source.log()
    );
    assert_eq!(sample(&source, &out("completed")), Some(1.0));
    assert_eq!(sample(&source, &out("failed")), Some(2.0));
    assert_eq!(sample(&source, &out("cancelled")), Some(0.0));
    assert!(sample(&source, "lockstep_migration_sent_bytes_total").unwrap_or(0.0) > 16e6);
    assert!(sample(&source, "lockstep_migration_last_downtime_ms").is_some_and(|d| d > 0.0));
    assert_eq!(sample(&destination, &inc("completed")), Some(1.0));
    assert_eq!(sample(&destination, &inc("failed")), Some(1.0));
    assert_eq!(
        sample(
            &destination,
            "lockstep_migrations_running{direction=\"incoming\"}"
        ),
        Some(0.0)
    );
    assert!(sample(&destination, "lockstep_migration_received_bytes_total").unwrap_or(0.0) > 16e6);
}

#[test]
fn a_host_on_a_terminal_shows_migration_progress_and_one_elsewhere_does_not() {
    if !require_kvm("a_host_on_a_terminal_shows_migration_progress_and_one_elsewhere_does_not") {
        return;
    }
    let source = TestHost::start_on_terminal(vec![vm_config(
        "ttymover",
        "memfill 16 7;counter 100 600",
        1,
        128,
    )]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("ttymover", "LKS counter=3 ", WAIT);
    let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", "ttymover");
    // 8 MiB/s: the first round takes a couple of seconds, several redraws.
    let id = migrate(
        &source,
        "ttymover",
        json!({ "destination": listen, "token": token, "max_bandwidth_mib_s": 8, "downtime_ms": 500 }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "completed");
    let done = format!("migration {id} outgoing ttymover: completed in ");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !source.log().contains(&done) {
        assert!(
            Instant::now() < deadline,
            "no final progress line on the terminal:\n{:?}",
            source.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = source.log();
    let live = format!("migration {id} outgoing ttymover: precopy round 0, ");
    assert!(
        log.contains(&live),
        "a live line during the first round:\n{log:?}"
    );
    assert!(log.contains("MiB/s, expected downtime "), "{log:?}");
    // Redrawn in place: the cursor goes back to the first live line and clears below; what it
    // clears is only progress lines, never a log line (log lines clear the progress first).
    assert!(log.contains("\u{1b}[1F\u{1b}[J"), "{log:?}");
    for (at, _) in log.match_indices("\u{1b}[") {
        let Some(n) = log[at + 2..]
            .split('F')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let before: Vec<&str> = log[..at].split("\r\n").collect();
        assert!(before.len() > n && before.last() == Some(&""), "{log:?}");
        for line in &before[before.len() - 1 - n..before.len() - 1] {
            let line = line.rsplit("\u{1b}[J").next().unwrap_or(line);
            assert!(
                line.starts_with("migration "),
                "a log line would be erased: {line:?} in {log:?}"
            );
        }
    }
    // The destination's standard error is a file: not a progress line there.
    let quiet = destination.log();
    assert!(
        !quiet.contains("incoming ttymover") && !quiet.contains('\u{1b}'),
        "{quiet:?}"
    );
}
