//! Failures at random points: the connection cut after a random number of bytes (a relay in
//! the test), the destination killed with SIGKILL at random points, no listener at the
//! address. Each leaves the source running and the destination serving with nothing left of
//! the VM, and a second try succeeds. The random points come from a printed seed
//! (`LKS_MIGRATION_SEED` replays one); `LKS_MIGRATION_TRIALS` sets how many
//! (`bench/run.sh migrate-faults` runs 100).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lockstep_tests::host::TestHost;
use lockstep_tests::{free_port, require_kvm};
use lockstep_vmm::migration::protocol::Kind;
use serde_json::json;

use super::*;

/// The trials' random points, replayable with `LKS_MIGRATION_SEED`.
struct Rng(lockstep_tests::trials::Rng);

impl Rng {
    fn new(test: &str) -> Rng {
        Rng(lockstep_tests::trials::Rng::new(test, "LKS_MIGRATION_SEED"))
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
}

/// How many trials a failure test runs: `LKS_MIGRATION_TRIALS` (the bench script asks 100),
/// else `default`.
fn trials(default: u32) -> u32 {
    lockstep_tests::trials::count("LKS_MIGRATION_TRIALS", default)
}

/// Checks that a failed migration left the source's VM running (its counter moves) and the
/// destination serving with nothing of the VM.
fn source_runs_on(source: &TestHost, destination: &TestHost, vm: &str, info: &Value) {
    assert_eq!(info["phase"], "failed", "{info}");
    assert!(
        info["error"].as_str().unwrap().contains("runs on here"),
        "{info}"
    );
    assert_eq!(source.state(vm), "running");
    let now = counters(&source.serial(vm)).last().copied().unwrap_or(0);
    counter_moves(|| source.serial(vm), now);
    nothing_left(destination, vm);
}

/// The final, successful try: the VM arrives and counts on with nothing lost or repeated.
fn second_try_succeeds(source: &TestHost, vm: &str) {
    let destination = TestHost::start(vec![]);
    let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", vm);
    let id = migrate(source, vm, json!({ "destination": listen, "token": token }));
    let info = wait_ended(source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "completed");
    let before = source.serial(vm);
    let last = counters(&before).last().copied().unwrap_or(0);
    counter_moves(|| format!("{before}{}", destination.serial(vm)), last + 2);
    let all = counters(&format!("{before}{}", destination.serial(vm)));
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "nothing lost or repeated: {all:?}"
    );
}

/// Forwards one connection from `listener` to `to`, and cuts both sides once `cut_at` bytes
/// went from the source to the destination; never the whole machine state (the destination
/// would answer Ready, and a source that sends Go cannot know whether it arrived: that is the
/// one cut after which neither side may run the VM). Returns the bytes forwarded.
fn relay(listener: TcpListener, to: String, mut cut_at: u64) -> u64 {
    let (mut from_source, _) = listener.accept().unwrap();
    let mut to_dest = TcpStream::connect(&to).unwrap();
    let back = {
        let mut reader = to_dest.try_clone().unwrap();
        let mut writer = from_source.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut writer);
        })
    };
    let mut forwarded = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    'frames: loop {
        let mut header = [0u8; 5];
        if from_source.read_exact(&mut header).is_err() {
            break;
        }
        let len = u32::from_le_bytes(header[1..].try_into().unwrap()) as u64;
        if header[0] == Kind::State as u8 {
            cut_at = cut_at.min(forwarded + 5 + len - 1);
        }
        let mut frame = header.to_vec();
        let mut left = len;
        loop {
            let room = cut_at.saturating_sub(forwarded) as usize;
            if frame.len() >= room {
                let _ = to_dest.write_all(&frame[..room]);
                forwarded += room as u64;
                break 'frames;
            }
            if to_dest.write_all(&frame).is_err() {
                break 'frames;
            }
            forwarded += frame.len() as u64;
            if left == 0 {
                break;
            }
            let n = (left as usize).min(buf.len());
            if from_source.read_exact(&mut buf[..n]).is_err() {
                break 'frames;
            }
            left -= n as u64;
            frame.clear();
            frame.extend_from_slice(&buf[..n]);
        }
    }
    let _ = to_dest.shutdown(Shutdown::Both);
    let _ = from_source.shutdown(Shutdown::Both);
    let _ = back.join();
    forwarded
}

#[test]
fn connections_cut_at_random_points_and_no_listener_leave_the_source_running() {
    if !require_kvm("connections_cut_at_random_points_and_no_listener_leave_the_source_running") {
        return;
    }
    let mut rng = Rng::new("connections_cut_at_random_points");
    // About 16 MiB of memory to send, so that cuts fall in the handshake, in pre-copy and at
    // the state.
    let source = TestHost::start(vec![vm_config("cut", "memfill 16 4;counter 100", 1, 128)]);
    source.wait_serial("cut", "LKS counter=1 ", WAIT);
    let destination = TestHost::start(vec![]);

    // Nothing listens: over TCP and over a Unix socket.
    let dir = tempfile::tempdir().unwrap();
    for nowhere in [
        format!("127.0.0.1:{}", free_port()),
        format!("unix:{}", dir.path().join("nobody.sock").display()),
    ] {
        let id = migrate(
            &source,
            "cut",
            json!({ "destination": nowhere, "token": "0123" }),
        );
        let info = wait_ended(&source, &id, WAIT);
        assert!(
            info["error"].as_str().unwrap().contains("cannot connect"),
            "{info}"
        );
        source_runs_on(&source, &destination, "cut", &info);
    }

    for trial in 0..trials(10) {
        // A few cuts in the first kilobytes (the handshake), the others anywhere.
        let cut_at = match trial {
            0 | 1 => rng.below(600),
            _ => rng.below(24 << 20),
        };
        let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", "cut");
        let relay_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let via = relay_listener.local_addr().unwrap().to_string();
        let relay = std::thread::spawn(move || relay(relay_listener, listen, cut_at));
        let started = Instant::now();
        let id = migrate(
            &source,
            "cut",
            json!({ "destination": via, "token": token }),
        );
        let info = wait_ended(&source, &id, WAIT);
        let forwarded = relay.join().unwrap();
        eprintln!(
            "trial {trial}: cut after {forwarded} bytes (asked {cut_at}) in {:?}: {}",
            started.elapsed(),
            info["error"]
        );
        let arrived = wait_ended(&destination, &in_id, WAIT);
        assert_eq!(arrived["phase"], "failed", "{arrived}");
        source_runs_on(&source, &destination, "cut", &info);
    }
    second_try_succeeds(&source, "cut");
}

#[test]
fn a_destination_killed_at_random_points_leaves_the_source_running() {
    if !require_kvm("a_destination_killed_at_random_points_leaves_the_source_running") {
        return;
    }
    let mut rng = Rng::new("a_destination_killed_at_random_points");
    let source = TestHost::start(vec![vm_config("hardy", "memfill 48 6;counter 100", 1, 128)]);
    source.wait_serial("hardy", "LKS counter=1 ", WAIT);
    for trial in 0..trials(5) {
        // Killed before the source connects, or a random time after the migration started:
        // in the handshake or in pre-copy (48 MiB at 48 MiB/s: about a second of it).
        let kill_after = match trial {
            0 => None,
            1 => Some(Duration::ZERO),
            _ => Some(Duration::from_millis(rng.below(700))),
        };
        let mut doomed = TestHost::start(vec![]);
        let (_, listen, token) = incoming(&doomed, "127.0.0.1:0", "hardy");
        let kill = |doomed: &TestHost| {
            // SAFETY: kills our own child.
            unsafe { libc::kill(doomed.pid() as i32, libc::SIGKILL) };
        };
        if kill_after.is_none() {
            kill(&doomed);
        }
        let id = migrate(
            &source,
            "hardy",
            json!({ "destination": listen, "token": token, "max_bandwidth_mib_s": 48 }),
        );
        if let Some(delay) = kill_after {
            std::thread::sleep(delay);
            let info = migration(&source, &id);
            assert!(
                ["handshake", "precopy"].contains(&info["phase"].as_str().unwrap()),
                "the kill lands before the switch: {info}"
            );
            kill(&doomed);
            eprintln!(
                "trial {trial}: killed after {delay:?}, {} bytes sent",
                info["bytes"]
            );
        }
        let info = wait_ended(&source, &id, WAIT);
        eprintln!("trial {trial}: {}", info["error"]);
        assert_eq!(info["phase"], "failed", "{info}");
        assert!(
            info["error"].as_str().unwrap().contains("runs on here"),
            "{info}"
        );
        let _ = doomed.stop();
        assert_eq!(source.state("hardy"), "running");
        let now = counters(&source.serial("hardy"))
            .last()
            .copied()
            .unwrap_or(0);
        counter_moves(|| source.serial("hardy"), now);
    }
    second_try_succeeds(&source, "hardy");
}
