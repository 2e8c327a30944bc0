//! Files and sockets are private whatever the umask, sockets in use are never taken over, and
//! a snapshot's paths cannot reach this host's files or another VM's (issue #11, point 3).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_tests::host::{curl_unix, CurlReply};
use lockstep_tests::{guest_images, lockstep_bin, require_kvm, VmConfigBuilder};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// A `lockstep host` started with a given umask, stopped when dropped.
struct UmaskHost {
    child: Child,
    api: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

impl UmaskHost {
    /// Writes `config` (plus `api_socket` and `state_dir` under `dir` unless it names them) and
    /// starts the host with `umask`; returns once its API socket answers.
    fn start(dir: &Path, name: &str, config: Value, umask: u32) -> UmaskHost {
        let mut host = UmaskHost::spawn(dir, name, config, umask);
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&host.api).is_err() {
            if let Some(status) = host.child.try_wait().unwrap() {
                panic!("the host ended ({status}):\n{}", host.log());
            }
            assert!(Instant::now() < deadline, "the host never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        host
    }

    /// Starts a host that is expected to refuse to start; returns its log once it has ended
    /// with an error.
    fn refused(dir: &Path, name: &str, config: Value) -> String {
        let mut host = UmaskHost::spawn(dir, name, config, 0o022);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = host.child.try_wait().unwrap() {
                assert!(!status.success(), "{}", host.log());
                return host.log();
            }
            assert!(
                Instant::now() < deadline,
                "the host kept running:\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(dir: &Path, name: &str, mut config: Value, umask: u32) -> UmaskHost {
        let obj = config.as_object_mut().expect("a JSON object");
        obj.entry("api_socket")
            .or_insert_with(|| json!(dir.join(format!("{name}-run/api.sock"))));
        obj.entry("state_dir")
            .or_insert_with(|| json!(dir.join(format!("{name}-state"))));
        let api = PathBuf::from(config["api_socket"].as_str().unwrap());
        let state = PathBuf::from(config["state_dir"].as_str().unwrap());
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new(lockstep_bin());
        command
            .args(["host", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // SAFETY: umask(2) is async-signal-safe and touches only the child's own mask.
        unsafe {
            command.pre_exec(move || {
                libc::umask(umask as libc::mode_t);
                Ok(())
            });
        }
        let child = command.spawn().expect("start lockstep host");
        UmaskHost {
            child,
            api,
            state,
            log,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> CurlReply {
        let text = body.map(Value::to_string);
        curl_unix(&self.api, method, path, text.as_deref())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn vm_names(&self) -> Vec<String> {
        self.call("GET", "/v1/vms", None)
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits for `path` to exist.
    fn wait_for(&self, path: &Path) {
        let deadline = Instant::now() + WAIT;
        while std::fs::symlink_metadata(path).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared:\n{}",
                path.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for UmaskHost {
    fn drop(&mut self) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn guest(name: &str) -> VmConfigBuilder {
    VmConfigBuilder::new(&guest_images().elf)
        .boot_args("lks.mode=monitor")
        .mem_mib(32)
        .set("name", json!(name))
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Every path under `root`, folders included, the root first.
fn walk(root: &Path, into: &mut Vec<PathBuf>) {
    into.push(root.to_owned());
    if std::fs::symlink_metadata(root).unwrap().is_dir() {
        for entry in std::fs::read_dir(root).unwrap() {
            walk(&entry.unwrap().path(), into);
        }
    }
}

#[test]
fn every_path_the_host_makes_is_private_under_umask_000() {
    if !require_kvm("every_path_the_host_makes_is_private_under_umask_000") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vsock = dir.path().join("quiet.vsock");
    let vm = guest("quiet")
        .set("vsock", json!({ "guest_cid": 3, "uds_path": vsock }))
        .build();
    let config = json!({
        "api_tcp": format!("127.0.0.1:{}", lockstep_tests::free_port()),
        "console_sockets": true,
        "firecracker_sockets": true,
        "vms": [{ "config": vm, "autostart": true }],
        "cim": { "https": format!("127.0.0.1:{}", lockstep_tests::free_port()), "allow_anonymous": true },
    });
    let host = UmaskHost::start(dir.path(), "open", config, 0o000);
    let vm_dir = host.state.join("quiet");
    for path in [
        vm_dir.join("serial.log"),
        vm_dir.join("console.sock"),
        vm_dir.join("firecracker.sock"),
        host.state.join("cim/cert.pem"),
        host.state.join("cim/key.pem"),
        host.state.join("api.token"),
        vsock.clone(),
    ] {
        host.wait_for(&path);
    }
    let reply = host.call("POST", "/v1/vms/quiet/snapshot", Some(&json!({})));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let snapshot = reply.json();
    let state_file = PathBuf::from(snapshot["state_path"].as_str().unwrap());
    assert!(
        state_file.starts_with(vm_dir.join("snapshots")),
        "{snapshot}"
    );

    let mut paths = Vec::new();
    walk(&host.state, &mut paths);
    paths.extend([
        host.api.clone(),
        host.api.parent().unwrap().to_owned(),
        vsock,
    ]);
    let mut wrong = Vec::new();
    let mut kinds = (0, 0, 0);
    for path in &paths {
        let meta = std::fs::symlink_metadata(path).unwrap();
        let kind = meta.file_type();
        let want: &[u32] = if kind.is_dir() {
            kinds.0 += 1;
            &[0o700]
        } else if kind.is_socket() {
            kinds.1 += 1;
            &[0o600]
        } else if path.ends_with("cim/cert.pem") {
            // The certificate is public (clients are given it); README says so.
            kinds.2 += 1;
            &[0o600, 0o644]
        } else {
            kinds.2 += 1;
            &[0o600]
        };
        if !want.contains(&mode(path)) {
            wrong.push(format!("{} is {:o}", path.display(), mode(path)));
        }
    }
    assert!(wrong.is_empty(), "not private under umask 000: {wrong:#?}");
    // The walk saw what it should: the state, VM, snapshots and cim folders and the API's;
    // the console, Firecracker, vsock and API sockets; log, token, key, cert, snapshot files.
    assert!(
        kinds.0 >= 5 && kinds.1 >= 4 && kinds.2 >= 6,
        "{kinds:?}: {paths:#?}"
    );
}

#[test]
fn sockets_and_files_in_the_way_are_never_taken_over() {
    if !require_kvm("sockets_and_files_in_the_way_are_never_taken_over") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.sock");
    let listener = UnixListener::bind(&live).unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a socket").unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&live, &link).unwrap();
    let answers = |path: &Path| {
        let _client = UnixStream::connect(path).expect("the test's socket still answers");
        listener
            .accept()
            .expect("and the test's listener gets the call");
    };

    // The control API's socket.
    for (name, path) in [("live", &live), ("file", &file), ("link", &link)] {
        let failure = UmaskHost::refused(dir.path(), name, json!({ "api_socket": path }));
        assert!(failure.contains(&path.display().to_string()), "{failure}");
    }
    answers(&live);
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());

    // A VM's console socket, named by its config or placed by the host.
    let host = UmaskHost::start(
        dir.path(),
        "good",
        json!({ "console_sockets": true }),
        0o022,
    );
    for (name, path) in [("a", &live), ("b", &file), ("c", &link)] {
        let vm = guest(name)
            .set("serial", json!({ "console_socket": path }))
            .build();
        let reply = host.call("POST", "/v1/vms?start=true", Some(&vm));
        assert!(
            matches!(reply.status, 400 | 409),
            "{name}: {} {}",
            reply.status,
            reply.text()
        );
        assert!(
            reply.text().contains(path.to_str().unwrap()),
            "{}",
            reply.text()
        );
    }
    let placed = host.state.join("d/console.sock");
    std::fs::create_dir_all(placed.parent().unwrap()).unwrap();
    std::fs::write(&placed, b"mine").unwrap();
    let reply = host.call("POST", "/v1/vms?start=true", Some(&guest("d").build()));
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply.text().contains(placed.to_str().unwrap()),
        "{}",
        reply.text()
    );
    assert_eq!(std::fs::read(&placed).unwrap(), b"mine");
    assert!(host.vm_names().is_empty(), "{:?}", host.vm_names());
    answers(&live);
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");

    // Another VM's log or socket, or the host's own files, are not a new VM's to use.
    let reply = host.call("POST", "/v1/vms?start=true", Some(&guest("owner").build()));
    assert_eq!(reply.status, 201, "{}", reply.text());
    host.wait_for(&host.state.join("owner/console.sock"));
    for (name, serial) in [
        (
            "thief1",
            json!({ "output_path": host.state.join("owner/serial.log") }),
        ),
        (
            "thief2",
            json!({ "console_socket": host.state.join("owner/console.sock") }),
        ),
        (
            "thief3",
            json!({ "output_path": host.state.join("api.token") }),
        ),
    ] {
        let vm = guest(name).set("serial", serial.clone()).build();
        let reply = host.call("POST", "/v1/vms", Some(&vm));
        assert!(
            matches!(reply.status, 400 | 409),
            "{serial}: {}",
            reply.text()
        );
    }
    assert_eq!(host.vm_names(), ["owner"]);
    // A snapshot is not written over files in the state folder that are not the VM's own.
    let paths = json!({ "state_path": placed, "memory_path": host.state.join("owner/x.mem") });
    let reply = host.call("POST", "/v1/vms/owner/snapshot", Some(&paths));
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(std::fs::read(&placed).unwrap(), b"mine");
    UnixStream::connect(host.state.join("owner/console.sock")).expect("owner's console");
}

#[test]
fn a_snapshot_from_another_host_does_not_take_over_this_hosts_paths() {
    if !require_kvm("a_snapshot_from_another_host_does_not_take_over_this_hosts_paths") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // This host: a VM `victim` with its log and console in the state folder, and `other` with
    // a log of its own outside it.
    let shared = dir.path().join("other.log");
    let here = UmaskHost::start(
        dir.path(),
        "here",
        json!({ "console_sockets": true }),
        0o022,
    );
    for vm in [
        guest("victim").build(),
        guest("other")
            .set("serial", json!({ "output_path": shared }))
            .build(),
    ] {
        let reply = here.call("POST", "/v1/vms?start=true", Some(&vm));
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let victim_log = here.state.join("victim/serial.log");
    let victim_console = here.state.join("victim/console.sock");
    here.wait_for(&victim_console);

    // Another host whose VMs name this host's files: snapshots of them carry those paths.
    let there = UmaskHost::start(dir.path(), "there", json!({}), 0o022);
    let hostile = [
        (
            "evil1",
            json!({ "output_path": victim_log, "console_socket": here.state.join("victim/evil.sock") }),
        ),
        ("evil2", json!({ "output_path": shared })),
    ];
    let mut snapshots = Vec::new();
    for (name, serial) in &hostile {
        let vm = guest(name).set("serial", serial.clone()).build();
        let reply = there.call("POST", "/v1/vms?start=true", Some(&vm));
        assert_eq!(reply.status, 201, "{name}: {}", reply.text());
        let paths = json!({
            "state_path": dir.path().join(format!("{name}.state")),
            "memory_path": dir.path().join(format!("{name}.mem")),
        });
        let reply = there.call("POST", &format!("/v1/vms/{name}/snapshot"), Some(&paths));
        assert_eq!(reply.status, 200, "{}", reply.text());
        snapshots.push(paths);
    }
    drop(there);

    // Restored here, the host-managed paths are this host's own for the new VM...
    let victim_log_before = std::fs::read(&victim_log).unwrap();
    let reply = here.call("POST", "/v1/restore", Some(&snapshots[0]));
    assert_eq!(reply.status, 201, "{}", reply.text());
    let info = reply.json();
    assert_eq!(
        info["serial_log"].as_str().map(PathBuf::from),
        Some(here.state.join("evil1/serial.log")),
        "{info}"
    );
    assert_eq!(
        info["console_socket"].as_str().map(PathBuf::from),
        Some(here.state.join("evil1/console.sock")),
        "{info}"
    );
    here.wait_for(&here.state.join("evil1/console.sock"));
    assert!(!here.state.join("victim/evil.sock").exists());
    UnixStream::connect(&victim_console).expect("the victim's console is still its own");
    assert!(std::fs::read(&victim_log)
        .unwrap()
        .starts_with(&victim_log_before));

    // ...and a path another VM here uses is refused, as for a new VM.
    let reply = here.call("POST", "/v1/restore", Some(&snapshots[1]));
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply.text().contains(shared.to_str().unwrap()) && reply.text().contains("other"),
        "{}",
        reply.text()
    );
    let mut names = here.vm_names();
    names.sort();
    assert_eq!(names, ["evil1", "other", "victim"]);
}
