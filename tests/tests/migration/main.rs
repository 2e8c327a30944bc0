//! Live migration between two `lockstep host` processes on KVM, over loopback TCP and a Unix
//! socket. This file holds what the modules share (starting a listener, migrating, waiting);
//! each module is one area of issue #12.

mod basic;
mod cim;
mod devices;
mod dirty;
mod failures;
mod linux;
mod local;

use std::time::{Duration, Instant};

use lockstep_tests::host::TestHost;
use lockstep_tests::{guest_images, GuestReport, VmConfigBuilder};
use serde_json::{json, Value};

pub(crate) const WAIT: Duration = Duration::from_secs(90);

pub(crate) fn vm_config(name: &str, script: &str, vcpus: u32, mem_mib: u64) -> Value {
    VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&format!("lks.mode=run lks.run=\"{script}\""))
        .vcpus(vcpus)
        .mem_mib(mem_mib)
        .set("name", json!(name))
        .build()
}

/// The counter values of a serial transcript.
pub(crate) fn counters(serial: &str) -> Vec<u64> {
    GuestReport::parse(serial)
        .all("counter")
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Opens a listener on `host` for a VM called `name`; returns (id, listen, token).
pub(crate) fn incoming(host: &TestHost, listen: &str, name: &str) -> (String, String, String) {
    incoming_with(host, &json!({ "listen": listen, "name": name }))
}

/// [`incoming`] with the whole request body; returns (id, listen, token).
pub(crate) fn incoming_with(host: &TestHost, body: &Value) -> (String, String, String) {
    let reply = host.call(
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(body),
    );
    assert_eq!(reply.status, 201, "{}", reply.text());
    let v = reply.json();
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    (s("id"), s("listen"), s("token"))
}

pub(crate) fn migrate(host: &TestHost, vm: &str, body: Value) -> String {
    let reply = host.call(
        "POST",
        "/v1/vms/{name}/migrate",
        &format!("/v1/vms/{vm}/migrate"),
        Some(&body),
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
    reply.json()["id"].as_str().unwrap().to_string()
}

pub(crate) fn migration(host: &TestHost, id: &str) -> Value {
    let reply = host.call(
        "GET",
        "/v1/migrations/{id}",
        &format!("/v1/migrations/{id}"),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// Waits until a migration has ended; returns its last progress.
pub(crate) fn wait_ended(host: &TestHost, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = migration(host, id);
        if ["completed", "failed", "cancelled"].contains(&info["phase"].as_str().unwrap()) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "migration {id} did not end within {timeout:?}: {info}\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn vm_status(host: &TestHost, vm: &str) -> u16 {
    host.call("GET", "/v1/vms/{name}", &format!("/v1/vms/{vm}"), None)
        .status
}

/// Checks that the host still serves and holds no trace of `vm`.
pub(crate) fn nothing_left(host: &TestHost, vm: &str) {
    assert_eq!(host.call("GET", "/v1/host", "/v1/host", None).status, 200);
    assert_eq!(vm_status(host, vm), 404, "no VM {vm} on the destination");
    assert!(
        !host.dir().join("state").join(vm).exists(),
        "no folder left for {vm}"
    );
}

/// Waits until the counter in `serial()` has gone past `after`.
pub(crate) fn counter_moves(serial: impl Fn() -> String, after: u64) {
    let deadline = Instant::now() + WAIT;
    while counters(&serial()).last().copied().unwrap_or(0) <= after {
        assert!(Instant::now() < deadline, "the counter is stuck at {after}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Migrates a counting guest with a filled memory block from one host to another over `listen`,
/// and checks that it carries on there exactly where it was.
pub(crate) fn migrate_and_check(listen: &str, vcpus: u32, mem_mib: u64) -> Value {
    migrate_and_check_with(listen, vcpus, mem_mib, json!({}))
}

/// [`migrate_and_check`] with more fields in the migrate request.
pub(crate) fn migrate_and_check_with(
    listen: &str,
    vcpus: u32,
    mem_mib: u64,
    extra: Value,
) -> Value {
    let script = "memfill 16 7;counter 100 60;memcheck";
    let source = TestHost::start(vec![vm_config("mover", script, vcpus, mem_mib)]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("mover", "LKS counter=5 ", WAIT);
    let (in_id, listen, token) = incoming(&destination, listen, "mover");
    let mut request = json!({ "destination": listen, "token": token });
    for (key, value) in extra.as_object().into_iter().flatten() {
        request[key] = value.clone();
    }
    let id = migrate(&source, "mover", request);
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    let arrived = wait_ended(&destination, &in_id, WAIT);
    assert_eq!(arrived["phase"], "completed", "{arrived}");
    eprintln!("migration over {listen}: source {info}\ndestination {arrived}");
    assert_eq!(
        vm_status(&source, "mover"),
        404,
        "the source gave the VM up"
    );
    assert_eq!(destination.state("mover"), "running");

    let after = destination.wait_serial("mover", "LKS run done", WAIT);
    let before = source.serial("mover");
    // A line may be cut at the switch: the two transcripts joined are the guest's whole output.
    let all = counters(&format!("{before}{after}"));
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1) && all.first() == Some(&1),
        "the counter goes on with nothing lost or repeated: {all:?}\nsource:\n{}\ndestination:\n{}",
        &before[before.len().saturating_sub(400)..],
        &after[..after.len().min(400)]
    );
    assert!(
        !counters(&after).is_empty() && all.len() == 60,
        "the destination went on counting: {all:?}"
    );
    assert!(
        GuestReport::parse(&after)
            .require("memcheck")
            .contains("status=match"),
        "guest memory intact: {after}"
    );
    info
}
