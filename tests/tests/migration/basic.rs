//! The stream between two hosts: the guest's counter goes on with nothing lost or repeated and
//! its memory intact, the source gives the VM up; a wrong token, a destination killed
//! mid-stream, a garbage or truncated stream all leave the source running (and the destination
//! serving, with nothing left behind).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use lockstep_tests::host::TestHost;
use lockstep_tests::{require_kvm, GuestReport};
use lockstep_vmm::migration::protocol::{self, Handshake, Kind};
use serde_json::{json, Value};

use super::*;

#[test]
fn a_running_vm_migrates_over_tcp() {
    if !require_kvm("a_running_vm_migrates_over_tcp") {
        return;
    }
    let info = migrate_and_check("127.0.0.1:0", 1, 512);
    // An idle 512 MiB guest costs its touched pages, not its RAM.
    let bytes = info["bytes"].as_u64().unwrap();
    assert!(bytes < 128 << 20, "{bytes} bytes on the wire");
}

#[test]
fn a_running_two_vcpu_vm_migrates_over_a_unix_socket() {
    if !require_kvm("a_running_two_vcpu_vm_migrates_over_a_unix_socket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("incoming.sock");
    // Memory copied as over TCP (a same-host destination would otherwise be handed it).
    let info = migrate_and_check_with(
        &format!("unix:{}", path.display()),
        2,
        256,
        json!({ "share_memory": false }),
    );
    assert!(
        info["pages"].as_u64().unwrap() > 4096,
        "the 16 MiB block was copied: {info}"
    );
    assert!(!path.exists(), "the one-shot listener's socket is gone");
}

#[test]
fn a_wrong_token_is_refused_and_the_source_runs_on() {
    if !require_kvm("a_wrong_token_is_refused_and_the_source_runs_on") {
        return;
    }
    let source = TestHost::start(vec![vm_config("stay", "counter 100", 1, 128)]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("stay", "LKS counter=3 ", WAIT);
    let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", "stay");
    let wrong: String = token.chars().rev().collect();
    let id = migrate(
        &source,
        "stay",
        json!({ "destination": listen, "token": wrong }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "failed");
    assert!(
        info["error"].as_str().unwrap().contains("authentication"),
        "{info}"
    );
    let refused = wait_ended(&destination, &in_id, WAIT);
    assert_eq!(refused["phase"], "failed");
    assert_eq!(source.state("stay"), "running");
    let now = counters(&source.serial("stay")).last().copied().unwrap();
    counter_moves(|| source.serial("stay"), now);
    nothing_left(&destination, "stay");
}

#[test]
fn a_destination_killed_mid_stream_leaves_the_source_running_and_a_retry_succeeds() {
    if !require_kvm(
        "a_destination_killed_mid_stream_leaves_the_source_running_and_a_retry_succeeds",
    ) {
        return;
    }
    // 160 MiB of data: round 0 takes a while, and the destination dies during it.
    let source = TestHost::start(vec![vm_config(
        "tough",
        "memfill 160 3;counter 100",
        1,
        256,
    )]);
    source.wait_serial("tough", "LKS counter=1 ", WAIT);
    let mut doomed = TestHost::start(vec![]);
    let (_, listen, token) = incoming(&doomed, "127.0.0.1:0", "tough");
    let id = migrate(
        &source,
        "tough",
        json!({ "destination": listen, "token": token }),
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let info = migration(&source, &id);
        if info["bytes"].as_u64().unwrap() > 8 << 20 {
            assert_eq!(info["phase"], "precopy", "{info}");
            break;
        }
        assert!(Instant::now() < deadline, "no pages flow: {info}");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kills our own child.
    unsafe { libc::kill(doomed.pid() as i32, libc::SIGKILL) };
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "failed", "{info}");
    assert!(
        info["error"].as_str().unwrap().contains("runs on here"),
        "{info}"
    );
    assert_eq!(source.state("tough"), "running");
    let _ = doomed.stop();

    source.wait_serial("tough", "LKS counter=2 ", WAIT);
    let second = TestHost::start(vec![]);
    let (_, listen, token) = incoming(&second, "127.0.0.1:0", "tough");
    let id = migrate(
        &source,
        "tough",
        json!({ "destination": listen, "token": token }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    let last = counters(&source.serial("tough"))
        .last()
        .copied()
        .unwrap_or(0);
    counter_moves(|| second.serial("tough"), last);
}

/// A source that holds the token but sends `after_accept` once the destination has accepted
/// the handshake, then closes.
fn hostile_source(listen: &str, token: &str, config: &Value, mem_mib: u64, after_accept: &[u8]) {
    let mut conn = TcpStream::connect(listen).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let nonce = protocol::expect_frame(&mut conn, Kind::Hello, "Hello").unwrap();
    let config = lockstep_api::VmConfig::from_json(&config.to_string()).unwrap();
    let handshake = serde_json::to_vec(&Handshake {
        format: protocol::FORMAT_VERSION,
        lockstep_version: env!("CARGO_PKG_VERSION").to_string(),
        config: serde_json::to_string(&config).unwrap(),
        regions: lockstep_vmm::memory::ram_ranges(mem_mib << 20)
            .into_iter()
            .map(|(a, l)| (a.0, l))
            .collect(),
        cpuid: vec![],
        same_host: false,
        connections: false,
        ft: None,
    })
    .unwrap();
    let mut auth = protocol::mac(token, &nonce, &handshake).unwrap().to_vec();
    auth.extend_from_slice(&handshake);
    protocol::write_frame(&mut conn, Kind::Auth, &auth).unwrap();
    protocol::expect_frame(&mut conn, Kind::Accept, "Accept").unwrap();
    conn.write_all(after_accept).unwrap();
    drop(conn);
}

#[test]
fn garbage_and_truncated_streams_leave_the_destination_serving_with_nothing_behind() {
    if !require_kvm(
        "garbage_and_truncated_streams_leave_the_destination_serving_with_nothing_behind",
    ) {
        return;
    }
    let destination = TestHost::start(vec![]);
    let config = vm_config("victim", "counter 100", 1, 64);

    // Garbage instead of a handshake.
    let (id, listen, _) = incoming(&destination, "127.0.0.1:0", "victim");
    // The name is taken while the VM is expected.
    let taken = destination.call("POST", "/v1/vms", "/v1/vms", Some(&config));
    assert_eq!(taken.status, 409, "{}", taken.text());
    let again = destination.call(
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(&json!({ "listen": "127.0.0.1:0", "name": "victim" })),
    );
    assert_eq!(again.status, 409, "{}", again.text());
    let mut conn = TcpStream::connect(&listen).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hello = [0u8; 37];
    conn.read_exact(&mut hello).unwrap();
    conn.write_all(&[0xff; 4096]).unwrap();
    drop(conn);
    assert_eq!(wait_ended(&destination, &id, WAIT)["phase"], "failed");
    nothing_left(&destination, "victim");

    // A handshake claiming a huge frame, cut short.
    let (id, listen, _) = incoming(&destination, "127.0.0.1:0", "victim");
    let mut conn = TcpStream::connect(&listen).unwrap();
    conn.read_exact(&mut hello).unwrap();
    conn.write_all(&[Kind::Auth as u8, 0, 0, 1, 0, 1, 2, 3])
        .unwrap();
    drop(conn);
    assert_eq!(wait_ended(&destination, &id, WAIT)["phase"], "failed");
    nothing_left(&destination, "victim");

    // Past the handshake (the VM is being built): garbage, a page out of range, a frame cut
    // short, a state that is not one.
    let mut page_frame = vec![Kind::Pages as u8];
    page_frame.extend_from_slice(&(8u32 + 4096).to_le_bytes());
    page_frame.extend_from_slice(&(1u64 << 40).to_le_bytes());
    page_frame.extend_from_slice(&[1; 4096]);
    let mut cut = vec![Kind::Pages as u8];
    cut.extend_from_slice(&(8u32 + 4096 * 4).to_le_bytes());
    cut.extend_from_slice(&0u64.to_le_bytes());
    cut.extend_from_slice(&[7; 5000]);
    let mut bad_state = vec![Kind::State as u8];
    bad_state.extend_from_slice(&8u32.to_le_bytes());
    bad_state.extend_from_slice(b"LKSSNAP\0");
    for tail in [vec![0xee; 64], page_frame, cut, bad_state] {
        let (id, listen, token) = incoming(&destination, "127.0.0.1:0", "victim");
        hostile_source(&listen, &token, &config, 64, &tail);
        let info = wait_ended(&destination, &id, WAIT);
        assert_eq!(info["phase"], "failed", "{info}");
        nothing_left(&destination, "victim");
    }
    assert!(
        destination.log().contains("incoming migration failed"),
        "{}",
        destination.log()
    );
}

#[test]
fn a_cancelled_migration_leaves_the_source_running_and_a_paused_vm_arrives_paused() {
    if !require_kvm(
        "a_cancelled_migration_leaves_the_source_running_and_a_paused_vm_arrives_paused",
    ) {
        return;
    }
    let source = TestHost::start(vec![vm_config("calm", "memfill 160 5;counter 100", 1, 256)]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("calm", "LKS counter=1 ", WAIT);
    let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", "calm");
    let id = migrate(
        &source,
        "calm",
        json!({ "destination": listen, "token": token }),
    );
    let deadline = Instant::now() + WAIT;
    while migration(&source, &id)["bytes"].as_u64().unwrap() < 8 << 20 {
        assert!(Instant::now() < deadline, "no pages flow");
        std::thread::sleep(Duration::from_millis(2));
    }
    let path = format!("/v1/migrations/{id}");
    let reply = source.call("DELETE", "/v1/migrations/{id}", &path, None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "cancelled", "{info}");
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "failed");
    assert_eq!(source.state("calm"), "running");
    let now = counters(&source.serial("calm")).last().copied().unwrap();
    counter_moves(|| source.serial("calm"), now);
    nothing_left(&destination, "calm");
    // Cancelling what has ended is refused.
    assert_eq!(
        source
            .call("DELETE", "/v1/migrations/{id}", &path, None)
            .status,
        409
    );

    // A paused VM arrives paused, and carries on when resumed there.
    let pause = source.call("POST", "/v1/vms/{name}/pause", "/v1/vms/calm/pause", None);
    assert_eq!(pause.status, 200);
    let (_, listen, token) = incoming(&destination, "127.0.0.1:0", "calm");
    let id = migrate(
        &source,
        "calm",
        json!({ "destination": listen, "token": token }),
    );
    assert_eq!(wait_ended(&source, &id, WAIT)["phase"], "completed");
    assert_eq!(destination.state("calm"), "paused");
    let before = source.serial("calm");
    let last = counters(&before).last().copied().unwrap();
    let resume = destination.call("POST", "/v1/vms/{name}/resume", "/v1/vms/calm/resume", None);
    assert_eq!(resume.status, 200);
    counter_moves(
        || format!("{before}{}", destination.serial("calm")),
        last + 2,
    );
    let all = counters(&format!("{before}{}", destination.serial("calm")));
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "nothing lost or repeated: {all:?}"
    );
}

#[test]
fn a_migration_that_cannot_finish_in_time_gives_up_and_the_source_runs_on() {
    if !require_kvm("a_migration_that_cannot_finish_in_time_gives_up_and_the_source_runs_on") {
        return;
    }
    // 160 MiB of data through an 8 MiB/s limit cannot go in 2 s.
    let source = TestHost::start(vec![vm_config("slow", "memfill 160 9;counter 100", 1, 256)]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("slow", "LKS counter=1 ", WAIT);
    let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", "slow");
    let started = Instant::now();
    let id = migrate(
        &source,
        "slow",
        json!({ "destination": listen, "token": token, "timeout_s": 2, "max_bandwidth_mib_s": 8 }),
    );
    let info = wait_ended(&source, &id, WAIT);
    let took = started.elapsed();
    assert_eq!(info["phase"], "failed", "{info}");
    let error = info["error"].as_str().unwrap();
    assert!(
        error.contains("gave up after 2s") && error.contains("runs on here"),
        "{info}"
    );
    // The limit held: about 8 MiB/s for about 2 s.
    let bytes = info["bytes"].as_u64().unwrap();
    assert!(bytes < 40 << 20, "{bytes} bytes in {took:?}");
    assert!(took < Duration::from_secs(20), "gave up after {took:?}");
    assert_eq!(source.state("slow"), "running");
    let now = counters(&source.serial("slow")).last().copied().unwrap();
    counter_moves(|| source.serial("slow"), now);
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "failed");
    nothing_left(&destination, "slow");
}

#[test]
fn a_guest_dirtying_faster_than_the_link_is_slowed_down_and_arrives_intact() {
    if !require_kvm("a_guest_dirtying_faster_than_the_link_is_slowed_down_and_arrives_intact") {
        return;
    }
    // Some 400 MiB/s of rewritten memory for seconds, through a 64 MiB/s limit.
    let fills: Vec<String> = (1..=40).map(|i| format!("memfill 32 {i}")).collect();
    let script = format!("{};memcheck;counter 100 10", fills.join(";"));
    let source = TestHost::start(vec![vm_config("busy", &script, 1, 256)]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("busy", "LKS memfill mib=32 seed=2 ", WAIT);
    let (_, listen, token) = incoming(&destination, "127.0.0.1:0", "busy");
    let id = migrate(
        &source,
        "busy",
        json!({ "destination": listen, "token": token, "max_bandwidth_mib_s": 64, "auto_converge": true }),
    );
    // Past round 0 the progress says what is left: the set dirtied during the last round.
    let deadline = Instant::now() + WAIT;
    let during = loop {
        let info = migration(&source, &id);
        if info["phase"] == "precopy" && info["round"].as_u64().unwrap() >= 1 {
            break info;
        }
        assert!(
            info["phase"] == "handshake" || info["phase"] == "precopy",
            "still copying after round 0: {info}"
        );
        assert!(Instant::now() < deadline, "no round 1: {info}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        during["remaining_bytes"].as_u64().unwrap() >= 4096,
        "a guest rewriting memory leaves pages to send: {during}"
    );
    let info = wait_ended(&source, &id, WAIT);
    eprintln!("auto-converge: {info}");
    assert_eq!(
        info["remaining_bytes"], 0,
        "nothing left once it ran there: {info}"
    );
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    assert!(info["throttle_percent"].as_u64().unwrap() > 0, "{info}");
    let after = destination.wait_serial("busy", "LKS run done", WAIT);
    let all = format!("{}{after}", source.serial("busy"));
    let report = GuestReport::parse(&all);
    let fills = report.all("memfill").count();
    assert!(fills >= 39, "every fill ran: {fills}\n{all}");
    assert!(
        report.require("memcheck").contains("status=match"),
        "the last fill's memory arrived intact: {all}"
    );
    let counted = counters(&all);
    assert_eq!(counted.len(), 10, "{counted:?}");
}

#[test]
fn a_config_the_destination_cannot_run_is_refused_before_a_page_moves() {
    if !require_kvm("a_config_the_destination_cannot_run_is_refused_before_a_page_moves") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut config = vm_config("rooted", "counter 100", 1, 128);
    config["drives"] =
        json!([{ "drive_id": "data", "path_on_host": disk, "is_root_device": false }]);
    let source = TestHost::start(vec![config]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("rooted", "LKS counter=2 ", WAIT);
    // The disk is not where the config says any more (the source keeps its open file).
    std::fs::rename(&disk, dir.path().join("moved.img")).unwrap();
    let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", "rooted");
    let id = migrate(
        &source,
        "rooted",
        json!({ "destination": listen, "token": token }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "failed", "{info}");
    let error = info["error"].as_str().unwrap();
    assert!(
        error.contains("refused") && error.contains("disk.img"),
        "the reason names the problem: {error}"
    );
    assert_eq!(info["pages"], 0, "no page moved: {info}");
    assert_eq!(source.state("rooted"), "running");
    let now = counters(&source.serial("rooted")).last().copied().unwrap();
    counter_moves(|| source.serial("rooted"), now);
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "failed");
    nothing_left(&destination, "rooted");
}

/// Forwards one connection from `listener` to `to` until the destination answers Ready, which
/// it holds back (the source never sends Go); says so on `ready`, then cuts both sides once
/// `cut` says to.
fn relay_holding_ready(
    listener: std::net::TcpListener,
    to: String,
    ready: std::sync::mpsc::Sender<()>,
    cut: std::sync::mpsc::Receiver<()>,
) {
    let (from_source, _) = listener.accept().unwrap();
    let to_dest = TcpStream::connect(&to).unwrap();
    let forward = {
        let mut reader = from_source.try_clone().unwrap();
        let mut writer = to_dest.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut writer);
        })
    };
    let (mut reader, mut writer) = (
        to_dest.try_clone().unwrap(),
        from_source.try_clone().unwrap(),
    );
    loop {
        let mut header = [0u8; 5];
        if reader.read_exact(&mut header).is_err() {
            break;
        }
        if header[0] == Kind::Ready as u8 {
            ready.send(()).unwrap();
            let _ = cut.recv();
            break;
        }
        let len = u32::from_le_bytes(header[1..].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        if reader.read_exact(&mut payload).is_err() {
            break;
        }
        if writer.write_all(&header).is_err() || writer.write_all(&payload).is_err() {
            break;
        }
    }
    let _ = to_dest.shutdown(std::net::Shutdown::Both);
    let _ = from_source.shutdown(std::net::Shutdown::Both);
    let _ = forward.join();
}

#[test]
/// A VM whose state has loaded but whose Go never comes: out of sight on the destination (no API
/// call reaches it, the guest does not run), and once the connection closes nothing of it is left
/// there (its new serial log and folder included), the source runs on, and a retry succeeds.
fn an_arriving_vm_is_out_of_sight_and_stopped_until_go() {
    if !require_kvm("an_arriving_vm_is_out_of_sight_and_stopped_until_go") {
        return;
    }
    let source = TestHost::start(vec![vm_config("unseen", "counter 100", 1, 64)]);
    source.wait_serial("unseen", "LKS counter=2 ", WAIT);
    let destination = TestHost::start(vec![]);
    let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", "unseen");
    let relay_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let via = relay_listener.local_addr().unwrap().to_string();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (cut, cut_rx) = std::sync::mpsc::channel();
    let relay =
        std::thread::spawn(move || relay_holding_ready(relay_listener, listen, ready_tx, cut_rx));
    let id = migrate(
        &source,
        "unseen",
        json!({ "destination": via, "token": token }),
    );
    ready
        .recv_timeout(WAIT)
        .expect("the destination answers Ready");

    // The VM is built and its threads launched, paused: no API reaches it, no list shows it.
    assert_eq!(migration(&destination, &in_id)["phase"], "switching");
    assert_eq!(vm_status(&destination, "unseen"), 404);
    let list = destination.call("GET", "/v1/vms", "/v1/vms", None);
    assert_eq!(list.status, 200);
    assert!(!list.text().contains("unseen"), "{}", list.text());
    for (method, path) in [("POST", "resume"), ("POST", "pause")] {
        let reply = destination.call(
            method,
            &format!("/v1/vms/{{name}}/{path}"),
            &format!("/v1/vms/unseen/{path}"),
            None,
        );
        assert_eq!(reply.status, 404, "{path}: {}", reply.text());
    }
    // Not one guest instruction before Go: its counter (every 100 ms) prints nothing here.
    let held = Instant::now() + Duration::from_millis(600);
    while Instant::now() < held {
        assert!(
            counters(&destination.serial("unseen")).is_empty(),
            "the guest ran on the destination before Go: {}",
            destination.serial("unseen")
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // No Go ever comes: the connection closes, the source runs on, nothing is left here.
    cut.send(()).unwrap();
    relay.join().unwrap();
    let arrived = wait_ended(&destination, &in_id, WAIT);
    assert_eq!(arrived["phase"], "failed", "{arrived}");
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "failed", "{info}");
    assert_eq!(source.state("unseen"), "running");
    nothing_left(&destination, "unseen");

    // The destination serves on: the VM arrives there on a second try and counts on.
    let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", "unseen");
    let id = migrate(
        &source,
        "unseen",
        json!({ "destination": listen, "token": token }),
    );
    assert_eq!(wait_ended(&source, &id, WAIT)["phase"], "completed");
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "completed");
    assert_eq!(destination.state("unseen"), "running");
    let last = counters(&source.serial("unseen"))
        .last()
        .copied()
        .unwrap_or(0);
    counter_moves(|| destination.serial("unseen"), last);
}
