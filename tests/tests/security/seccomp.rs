//! Defense in depth: seccomp filters on every thread, on by default, a forbidden system call
//! ending the process with a clear line; `--no-seccomp` turning them off; `--user` giving up
//! root while VMs still boot and the API still works.
//!
//! The violation is provoked with the documented self-test (`LOCKSTEP_SECCOMP_SELFTEST=<kind>`:
//! the first thread of that kind calls `personality` after installing its filter).

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lockstep_tests::host::curl_unix;
use lockstep_tests::{guest_images, lockstep_bin, require_kvm, VmConfigBuilder};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const VM: &str = "sc";
/// Every kind of thread lockstep filters, by the names the self-test and the message use.
const KINDS: [&str; 7] = [
    "main",
    "api",
    "firecracker-api",
    "cim",
    "indications",
    "vm-owner",
    "vcpu",
];
/// The documented exit code of a seccomp violation (128 + SIGSYS).
const EXIT_SECCOMP: i32 = 159;

/// A `lockstep` process with its folder; killed if the test ends first.
struct Process {
    child: Child,
    dir: tempfile::TempDir,
    stderr: PathBuf,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.state().join(VM).join("serial.log")).unwrap_or_default()
    }

    /// Waits (bounded) for the process to end.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "lockstep still runs after {timeout:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `needle` in the VM's serial log, the process staying alive.
    fn wait_serial(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.serial().contains(needle) {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!(
                    "lockstep ended ({status}) before {needle:?}:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {WAIT:?}:\n{}\n{}",
                self.serial(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> ExitStatus {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(30))
    }

    /// `Seccomp:` of every thread of the process (2: filtered, 0: not).
    fn seccomp_modes(&self) -> Vec<(String, String)> {
        let tasks = PathBuf::from(format!("/proc/{}/task", self.pid()));
        let mut modes = Vec::new();
        for task in std::fs::read_dir(tasks).expect("tasks").flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .unwrap_or("")
                .trim()
                .to_string();
            modes.push((comm.trim().to_string(), mode));
        }
        modes
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn guest(kernel: &Path) -> Value {
    VmConfigBuilder::new(kernel)
        .boot_args("lks.mode=run lks.run=\"counter 100\"")
        .vcpus(2)
        .set("name", json!(VM))
        .build()
}

/// A host with one VM at start, the CIM endpoint (with its indication thread) and per-VM
/// Firecracker sockets: a thread of every kind. `user` runs it as that user (its folder is then
/// opened up for the user, and the kernel copied into it).
fn start_host(args: &[&str], selftest: Option<&str>, user: Option<&str>) -> Process {
    let dir = tempfile::tempdir().expect("temp dir");
    let kernel = match user {
        Some(_) => {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let copy = dir.path().join("guest.elf");
            std::fs::copy(&guest_images().elf, &copy).expect("copy the kernel");
            copy
        }
        None => guest_images().elf.clone(),
    };
    let config = json!({
        "api_socket": dir.path().join("api.sock"),
        "state_dir": dir.path().join("state"),
        "firecracker_sockets": true,
        "console_sockets": true,
        "cim": { "http": "127.0.0.1:0", "https": null, "allow_anonymous": true },
        "vms": [{ "config": guest(&kernel), "autostart": true }],
    });
    let path = dir.path().join("host.json");
    std::fs::write(&path, config.to_string()).expect("host config");
    let stderr = dir.path().join("stderr.log");
    let mut command = Command::new(lockstep_bin());
    command
        .args(["host", "--config"])
        .arg(&path)
        .args(args)
        .env_remove("LOCKSTEP_SECCOMP_SELFTEST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    if let Some(user) = user {
        command.args(["--user", user]);
    }
    if let Some(kind) = selftest {
        command.env("LOCKSTEP_SECCOMP_SELFTEST", kind);
    }
    let child = command.spawn().expect("start lockstep host");
    Process { child, dir, stderr }
}

/// The line the SIGSYS handler writes for the self-test's call on a thread of `kind`.
fn violation_line(kind: &str) -> String {
    format!("({kind} filter) made a forbidden system call: 135 (personality); ending the process with exit code {EXIT_SECCOMP}")
}

#[test]
fn a_forbidden_call_from_any_thread_kind_ends_the_host_with_a_clear_line() {
    if !require_kvm("a_forbidden_call_from_any_thread_kind_ends_the_host_with_a_clear_line") {
        return;
    }
    for kind in KINDS {
        let mut host = start_host(&[], Some(kind), None);
        let status = host.wait_exit(WAIT);
        let stderr = host.stderr();
        assert_eq!(status.code(), Some(EXIT_SECCOMP), "{kind}:\n{stderr}");
        assert!(
            stderr.contains(&violation_line(kind)),
            "{kind}: stderr must name the call and the thread kind:\n{stderr}"
        );
    }
}

#[test]
fn a_forbidden_call_ends_lockstep_run_too() {
    if !require_kvm("a_forbidden_call_ends_lockstep_run_too") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("vm.json");
    std::fs::write(&config, guest(&guest_images().elf).to_string()).expect("config");
    for kind in ["vcpu", "vm-owner"] {
        let stderr = dir.path().join(format!("{kind}.log"));
        let child = Command::new(lockstep_bin())
            .arg("run")
            .arg(&config)
            .env("LOCKSTEP_SECCOMP_SELFTEST", kind)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("lockstep run");
        let mut run = Process {
            child,
            dir: tempfile::tempdir().expect("temp dir"),
            stderr,
        };
        let status = run.wait_exit(WAIT);
        let stderr = run.stderr();
        assert_eq!(status.code(), Some(EXIT_SECCOMP), "{kind}:\n{stderr}");
        assert!(stderr.contains(&violation_line(kind)), "{kind}:\n{stderr}");
    }
}

#[test]
fn filters_are_on_by_default_and_the_host_works_under_them() {
    if !require_kvm("filters_are_on_by_default_and_the_host_works_under_them") {
        return;
    }
    let mut host = start_host(&[], None, None);
    host.wait_serial("LKS counter=3");
    let modes = host.seccomp_modes();
    assert!(
        modes.len() >= 6 && modes.iter().all(|(_, mode)| mode == "2"),
        "every thread must be filtered: {modes:?}"
    );
    for (name, want) in [("vcpu0", "2"), ("vcpu1", "2"), ("lockstep-api", "2")] {
        assert!(
            modes.iter().any(|(n, m)| n == name && m == want),
            "{name}: {modes:?}"
        );
    }
    // Serial output reaches a console client: the vCPU thread sends it, under its filter.
    let mut console =
        UnixStream::connect(host.state().join(VM).join("console.sock")).expect("console socket");
    console
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("LKS counter=") {
        assert!(
            Instant::now() < deadline,
            "nothing on the console:\n{}",
            host.stderr()
        );
        let mut buf = [0u8; 512];
        match console.read(&mut buf) {
            Ok(0) => panic!("the console closed:\n{}", host.stderr()),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    // The VM's life goes on under the filters: pause, resume, a snapshot.
    let api = host.api();
    for action in ["pause", "resume"] {
        let reply = curl_unix(&api, "POST", &format!("/v1/vms/{VM}/{action}"), None);
        assert_eq!(
            reply.status,
            200,
            "{action}: {}\n{}",
            reply.text(),
            host.stderr()
        );
    }
    let reply = curl_unix(&api, "POST", &format!("/v1/vms/{VM}/snapshot"), Some("{}"));
    assert!(
        reply.status < 300,
        "snapshot: {} {}\n{}",
        reply.status,
        reply.text(),
        host.stderr()
    );
    let counted = host.serial().matches("LKS counter=").count();
    host.wait_serial(&format!("LKS counter={}", counted + 2));
    assert_eq!(host.terminate().code(), Some(0), "{}", host.stderr());
}

#[test]
fn no_seccomp_turns_the_filters_off() {
    if !require_kvm("no_seccomp_turns_the_filters_off") {
        return;
    }
    for flag in ["--no-seccomp", "--seccomp=off"] {
        // The same forbidden call that ends a filtered process is just an answer here.
        let mut host = start_host(&[flag], Some("vcpu"), None);
        host.wait_serial("LKS counter=3");
        let modes = host.seccomp_modes();
        assert!(
            modes.iter().all(|(_, mode)| mode == "0"),
            "{flag}: no thread may be filtered: {modes:?}"
        );
        assert!(
            host.stderr()
                .contains("seccomp self-test: personality returned"),
            "{flag}: {}",
            host.stderr()
        );
        assert_eq!(
            host.terminate().code(),
            Some(0),
            "{flag}: {}",
            host.stderr()
        );
    }
}

/// The user ID and group ID of `name` from /etc/passwd.
fn passwd_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.split(':').next() == Some(name))?;
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

#[test]
fn host_runs_as_nobody_after_opening_what_needs_root() {
    if !require_kvm("host_runs_as_nobody_after_opening_what_needs_root") {
        return;
    }
    let Some((uid, gid)) = passwd_ids("nobody") else {
        eprintln!("skipping: no user nobody on this system");
        return;
    };
    let mut host = start_host(&[], None, Some("nobody"));
    host.wait_serial("LKS counter=3");
    let status = std::fs::read_to_string(format!("/proc/{}/status", host.pid())).expect("status");
    let ids = |key: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    assert_eq!(ids("Uid:"), vec![uid; 4], "{status}");
    assert_eq!(ids("Gid:"), vec![gid; 4], "{status}");
    assert!(
        !ids("Groups:").contains(&0),
        "root's group must be gone: {status}"
    );
    // Files made after the switch belong to the user, and the API still drives the VM.
    let log = std::fs::metadata(host.state().join(VM).join("serial.log")).expect("serial log");
    assert_eq!((log.uid(), log.gid()), (uid, gid));
    let api = host.api();
    for action in ["pause", "resume"] {
        let reply = curl_unix(&api, "POST", &format!("/v1/vms/{VM}/{action}"), None);
        assert_eq!(
            reply.status,
            200,
            "{action}: {}\n{}",
            reply.text(),
            host.stderr()
        );
    }
    let reply = curl_unix(&api, "GET", &format!("/v1/vms/{VM}"), None);
    assert_eq!(reply.json()["state"], "running", "{}", reply.text());
    let counted = host.serial().matches("LKS counter=").count();
    host.wait_serial(&format!("LKS counter={}", counted + 2));
    assert_eq!(host.terminate().code(), Some(0), "{}", host.stderr());
}

#[test]
fn an_unknown_user_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("host.json");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        json!({ "api_socket": dir.path().join("api.sock"), "state_dir": state }).to_string(),
    )
    .expect("config");
    let out = Command::new(lockstep_bin())
        .args(["host", "--user", "no-such-user-for-lockstep", "--config"])
        .arg(&config)
        .output()
        .expect("lockstep host");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no such user"), "{stderr}");
    assert!(!state.exists(), "nothing may be created for a bad --user");
}
