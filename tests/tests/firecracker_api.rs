//! Firecracker's API on a lockstep VM (`lockstep run --api-sock`), driven with the curl calls of
//! Firecracker's getting-started and snapshotting guides: configure, start, pause, snapshot,
//! and load that snapshot into a new process where the guest carries on.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep_tests::host::curl_unix;
use lockstep_tests::{guest_images, lockstep_bin, require_kvm};

const WAIT: Duration = Duration::from_secs(60);

/// A `lockstep run --api-sock` process with its serial console (stdout) captured.
struct FcProcess {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl FcProcess {
    fn start(socket: &Path) -> FcProcess {
        let mut child = Command::new(lockstep_bin())
            .args(["run", "--api-sock"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start lockstep");
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let deadline = Instant::now() + WAIT;
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the API socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        FcProcess { child, out }
    }

    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.out.lock().unwrap().clone();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "lockstep did not exit");
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

impl Drop for FcProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl --unix-socket S -i -X M http://localhost/P -d BODY`, as Firecracker's guides write it;
/// returns the status.
fn fc(socket: &Path, method: &str, path: &str, body: Option<&str>) -> u16 {
    let reply = curl_unix(socket, method, path, body);
    assert!(
        reply.status < 300,
        "{method} {path}: {} {}",
        reply.status,
        reply.text()
    );
    reply.status
}

#[test]
fn firecracker_guide_calls_then_snapshot_and_load_in_a_new_process() {
    if !require_kvm("firecracker_guide_calls_then_snapshot_and_load_in_a_new_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("firecracker.socket");
    let rootfs = dir.path().join("rootfs.ext4");
    std::fs::File::create(&rootfs)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let kernel = guest_images().elf.display().to_string();
    let first = FcProcess::start(&socket);

    // Getting started: boot source, root drive, machine config, start.
    let boot = format!(
        r#"{{"kernel_image_path": "{kernel}", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off lks.mode=run lks.run=\"counter 100 60\""}}"#
    );
    assert_eq!(fc(&socket, "PUT", "/boot-source", Some(&boot)), 204);
    let drive = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
        rootfs.display()
    );
    assert_eq!(fc(&socket, "PUT", "/drives/rootfs", Some(&drive)), 204);
    assert_eq!(
        fc(
            &socket,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 128}"#)
        ),
        204
    );
    assert_eq!(
        fc(
            &socket,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        ),
        204
    );
    first.wait_for("LKS counter=5 ");
    let config = curl_unix(&socket, "GET", "/vm/config", None).json();
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["drives"][0]["drive_id"], "rootfs");
    let late = curl_unix(
        &socket,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#),
    );
    assert_eq!(
        late.status, 400,
        "pre-boot settings are refused after start"
    );
    assert!(late.json()["fault_message"].as_str().is_some());

    // Snapshotting: pause, create, and the snapshot is written while paused.
    assert_eq!(
        fc(&socket, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        204
    );
    let state = dir.path().join("snapshot_file");
    let memory = dir.path().join("mem_file");
    let create = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        memory.display()
    );
    assert_eq!(fc(&socket, "PUT", "/snapshot/create", Some(&create)), 204);
    let last_before = first.out.lock().unwrap().matches("LKS counter=").count();
    drop(first);

    let second_socket = dir.path().join("second.socket");
    let mut second = FcProcess::start(&second_socket);
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_path": "{}", "backend_type": "File"}}, "enable_diff_snapshots": false, "resume_vm": true}}"#,
        state.display(),
        memory.display()
    );
    assert_eq!(
        fc(&second_socket, "PUT", "/snapshot/load", Some(&load)),
        204
    );
    let out = second.wait_for("LKS counter-end");
    let first_after: u64 = out
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("LKS counter="))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("the restored guest counts");
    assert!(
        first_after as usize >= last_before,
        "carries on from {last_before}, got {first_after}"
    );
    assert_eq!(
        second.wait_exit(),
        Some(0),
        "the guest's reset ends the process with 0"
    );
}
