//! Firecracker's API against the fake host, driven by the curl commands of Firecracker's
//! documentation sent as the literal requests curl makes (and, where curl is installed, by curl).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vmm_sys_util::tempdir::TempDir;

use super::spawn_firecracker;
use crate::control::HostControl;
use crate::http::fake_host::FakeHost;
use crate::http::test_client::{
    curl_to_request, exchange_raw, send, send_json, shell_words, RawReply,
};
use crate::http::ServerHandle;

const VM: &str = "fc-vm";

/// Firecracker's getting-started guide: the calls that configure and boot a microVM, as
/// written there (the image paths are replaced by files the test makes).
const GETTING_STARTED: [&str; 6] = [
    r#"curl --unix-socket /tmp/firecracker.sock -i \
    -X PUT 'http://localhost/logger' \
    -H 'Accept: application/json' \
    -H 'Content-Type: application/json' \
    -d '{
        "log_path": "./firecracker.log",
        "level": "Debug",
        "show_level": true,
        "show_log_origin": true
    }'"#,
    r#"curl --unix-socket /tmp/firecracker.sock -i \
    -X PUT 'http://localhost/boot-source'   \
    -H 'Accept: application/json'           \
    -H 'Content-Type: application/json'     \
    -d '{
        "kernel_image_path": "./hello-vmlinux.bin",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"
    }'"#,
    r#"curl --unix-socket /tmp/firecracker.sock -i \
    -X PUT 'http://localhost/drives/rootfs' \
    -H 'Accept: application/json'           \
    -H 'Content-Type: application/json'     \
    -d '{
        "drive_id": "rootfs",
        "path_on_host": "./hello-rootfs.ext4",
        "is_root_device": true,
        "is_read_only": false
    }'"#,
    r#"curl --unix-socket /tmp/firecracker.sock -i  \
    -X PUT 'http://localhost/machine-config' \
    -H 'Accept: application/json'            \
    -H 'Content-Type: application/json'      \
    -d '{
        "vcpu_count": 2,
        "mem_size_mib": 1024
    }'"#,
    r#"curl --unix-socket /tmp/firecracker.sock -i \
    -X PUT 'http://localhost/network-interfaces/net1' \
    -H 'Accept: application/json' \
    -H 'Content-Type: application/json' \
    -d '{
        "iface_id": "net1",
        "guest_mac": "06:00:AC:10:00:02",
        "host_dev_name": "tap0"
    }'"#,
    r#"curl --unix-socket /tmp/firecracker.sock -i \
    -X PUT 'http://localhost/actions'       \
    -H  'Accept: application/json'          \
    -H  'Content-Type: application/json'    \
    -d '{
        "action_type": "InstanceStart"
     }'"#,
];

/// Pause, snapshot and resume as Firecracker's snapshot documentation does it.
const SNAPSHOT: [&str; 3] = [
    r#"curl --unix-socket /tmp/firecracker.sock -i \
    -X PATCH 'http://localhost/vm' \
    -H 'Accept: application/json' \
    -H 'Content-Type: application/json' \
    -d '{
            "state": "Paused"
    }'"#,
    r#"curl --unix-socket /tmp/firecracker.sock -i \
    -X PUT 'http://localhost/snapshot/create' \
    -H  'Accept: application/json' \
    -H  'Content-Type: application/json' \
    -d '{
            "snapshot_type": "Full",
            "snapshot_path": "/srv/snap/snapshot_file",
            "mem_file_path": "/srv/snap/mem_file"
    }'"#,
    r#"curl --unix-socket /tmp/firecracker.sock -i \
    -X PATCH 'http://localhost/vm' \
    -H 'Accept: application/json' \
    -H 'Content-Type: application/json' \
    -d '{
            "state": "Resumed"
    }'"#,
];

struct Fixture {
    host: Arc<FakeHost>,
    socket: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    dir: TempDir,
    _server: ServerHandle,
}

impl Fixture {
    fn new(vm: &str) -> Fixture {
        let dir = TempDir::new().unwrap();
        let socket = dir.as_path().join("firecracker.sock");
        let kernel = dir.as_path().join("hello-vmlinux.bin");
        let rootfs = dir.as_path().join("hello-rootfs.ext4");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        std::fs::write(&rootfs, vec![0u8; 4096]).unwrap();
        let host = Arc::new(FakeHost::default());
        let server = spawn_firecracker(host.clone(), vm.to_string(), &socket).unwrap();
        Fixture {
            host,
            socket,
            kernel,
            rootfs,
            dir,
            _server: server,
        }
    }

    /// A documented command with this fixture's socket and images.
    fn localise(&self, command: &str) -> String {
        command
            .replace("/tmp/firecracker.sock", &self.socket.display().to_string())
            .replace("./hello-vmlinux.bin", &self.kernel.display().to_string())
            .replace("./hello-rootfs.ext4", &self.rootfs.display().to_string())
    }

    fn curl(&self, command: &str) -> RawReply {
        exchange_raw(&self.socket, &curl_to_request(&self.localise(command)))
    }

    fn boot(&self) {
        for command in GETTING_STARTED {
            let reply = self.curl(command);
            assert_eq!(reply.status, 204, "{command}: {}", reply.text());
        }
    }
}

fn fault(reply: &RawReply) -> String {
    assert_eq!(reply.status, 400, "{}", reply.text());
    reply.json()["fault_message"].as_str().unwrap().to_string()
}

#[test]
fn getting_started_guide_boots_the_vm() {
    let fc = Fixture::new(VM);
    let info = send(&fc.socket, "GET", "/", None);
    assert_eq!(
        info.json(),
        json!({"id": VM, "state": "Not started", "vmm_version": env!("CARGO_PKG_VERSION"), "app_name": "lockstep"})
    );
    for command in GETTING_STARTED {
        let reply = fc.curl(command);
        assert_eq!(reply.status, 204, "{command}: {}", reply.text());
        assert!(reply.body.is_empty());
    }
    assert_eq!(fc.host.calls(), [format!("create_vm({VM}, start=true)")]);
    let config = fc.host.config(VM).unwrap();
    assert_eq!(config.boot_source.kernel_image_path, fc.kernel);
    assert_eq!(
        config.boot_source.boot_args.as_deref(),
        Some("console=ttyS0 reboot=k panic=1 pci=off")
    );
    assert_eq!(
        (
            config.machine_config.vcpu_count,
            config.machine_config.mem_size_mib
        ),
        (2, 1024)
    );
    assert_eq!(config.drives[0].path_on_host, fc.rootfs);
    assert!(config.drives[0].is_root_device);
    assert_eq!(config.network_interfaces[0].host_dev_name, "tap0");
    assert_eq!(config.name.as_deref(), Some(VM));
    assert_eq!(
        send(&fc.socket, "GET", "/", None).json()["state"],
        "Running"
    );
    let machine = send(&fc.socket, "GET", "/machine-config", None).json();
    assert_eq!(machine["vcpu_count"], 2);
    let full = send(&fc.socket, "GET", "/vm/config", None).json();
    assert_eq!(full["drives"][0]["drive_id"], "rootfs");
    assert_eq!(
        full["boot-source"]["kernel_image_path"],
        fc.kernel.display().to_string()
    );
}

#[test]
fn pre_boot_state_is_visible_and_versioned() {
    let fc = Fixture::new(VM);
    let machine = send(&fc.socket, "GET", "/machine-config", None);
    assert_eq!(machine.status, 200);
    assert_eq!(machine.json()["vcpu_count"], 1);
    assert_eq!(machine.json()["mem_size_mib"], 128);
    let patch = send_json(
        &fc.socket,
        "PATCH",
        "/machine-config",
        r#"{"mem_size_mib": 512}"#,
    );
    assert_eq!(patch.status, 204, "{}", patch.text());
    let config = send(&fc.socket, "GET", "/vm/config", None).json();
    assert_eq!(config["machine-config"]["mem_size_mib"], 512);
    assert_eq!(config["drives"], json!([]));
    assert!(config.get("boot-source").is_none());
    let version = send(&fc.socket, "GET", "/version", None).json();
    assert_eq!(
        version,
        json!({"firecracker_version": super::FIRECRACKER_API_VERSION})
    );
    assert!(fc.host.calls().is_empty());
}

#[test]
fn pre_boot_resources_are_refused_after_start() {
    let fc = Fixture::new(VM);
    fc.boot();
    for command in &GETTING_STARTED[1..5] {
        let message = fault(&fc.curl(command));
        assert_eq!(
            message,
            "The requested operation is not supported after starting the microVM."
        );
    }
    let message = fault(&fc.curl(GETTING_STARTED[5]));
    assert!(
        message.contains("not supported after starting"),
        "{message}"
    );
    let load = send_json(
        &fc.socket,
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#,
    );
    assert!(fault(&load).contains("after starting"));
    assert_eq!(fc.host.calls().len(), 1, "{:?}", fc.host.calls());
}

#[test]
fn post_boot_actions_are_refused_before_start() {
    let fc = Fixture::new(VM);
    let not_yet = "The requested operation is not supported before starting the microVM.";
    assert_eq!(fault(&fc.curl(SNAPSHOT[0])), not_yet);
    assert_eq!(fault(&fc.curl(SNAPSHOT[1])), not_yet);
    let ctrl_alt_del = send_json(
        &fc.socket,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(fault(&ctrl_alt_del), not_yet);
    let start = send_json(
        &fc.socket,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert!(fault(&start).contains("without a boot source"));
    assert!(fc.host.calls().is_empty());
}

#[test]
fn pause_snapshot_resume_map_to_the_host() {
    let fc = Fixture::new(VM);
    fc.boot();
    for command in SNAPSHOT {
        let reply = fc.curl(command);
        assert_eq!(reply.status, 204, "{command}: {}", reply.text());
    }
    assert_eq!(
        fc.host.calls()[1..],
        [
            format!("pause_vm({VM})"),
            format!("snapshot_vm({VM}, Some(\"/srv/snap/snapshot_file\"), Some(\"/srv/snap/mem_file\"))"),
            format!("resume_vm({VM})"),
        ]
    );
    // Asking for the state it is in already succeeds without bothering the host.
    let again = send_json(&fc.socket, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(again.status, 204);
    assert_eq!(fc.host.calls().len(), 4);
    let diff = send_json(
        &fc.socket,
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_type": "Diff", "snapshot_path": "/a", "mem_file_path": "/b"}"#,
    );
    assert!(fault(&diff).contains("full snapshots only"));
}

#[test]
fn ctrl_alt_del_asks_the_host_for_a_graceful_shutdown() {
    let fc = Fixture::new(VM);
    fc.boot();
    let reply = send_json(
        &fc.socket,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(reply.status, 204, "{}", reply.text());
    let expected = format!(
        "shutdown_vm({VM}, timeout_s=Some({}), force=false)",
        super::CTRL_ALT_DEL_GRACE_S
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fc.host.calls().contains(&expected) {
        assert!(Instant::now() < deadline, "{:?}", fc.host.calls());
        std::thread::sleep(Duration::from_millis(10));
    }
    while send(&fc.socket, "GET", "/", None).json()["state"] != "Not started" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    // A stopped VM boots again with InstanceStart.
    let start = send_json(
        &fc.socket,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(start.status, 204, "{}", start.text());
    assert_eq!(fc.host.calls().last().unwrap(), &format!("start_vm({VM})"));
}

#[test]
fn snapshot_load_restores_under_the_vm_name() {
    let fc = Fixture::new(VM);
    let reply = send_json(
        &fc.socket,
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path": "/srv/snap/snapshot_file", "mem_backend": {"backend_type": "File", "backend_path": "/srv/snap/mem_file"}, "resume_vm": true}"#,
    );
    assert_eq!(reply.status, 204, "{}", reply.text());
    assert_eq!(
        fc.host.calls(),
        [format!("restore_vm(\"/srv/snap/snapshot_file\", \"/srv/snap/mem_file\", Some(\"{VM}\"), resume=true)")]
    );
    assert_eq!(
        send(&fc.socket, "GET", "/", None).json()["state"],
        "Running"
    );

    // The older mem_file_path; without resume_vm the VM stays paused.
    let fc = Fixture::new(VM);
    let reply = send_json(
        &fc.socket,
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#,
    );
    assert_eq!(reply.status, 204, "{}", reply.text());
    assert_eq!(send(&fc.socket, "GET", "/", None).json()["state"], "Paused");
}

#[test]
fn snapshot_load_refusals_name_the_problem() {
    let fc = Fixture::new(VM);
    let load = |body: &str| fault(&send_json(&fc.socket, "PUT", "/snapshot/load", body));
    assert!(load(r#"{"snapshot_path": "/s"}"#).contains("Either mem_backend or mem_file_path"));
    assert!(load(r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u.sock"}}"#)
        .contains("from a file only"));
    assert!(load(r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#)
        .contains("Only one of"));
    assert!(load(r#"{"snapshot_path": "/s", "mem_file_path": "/m", "network_overrides": [{"iface_id": "a", "host_dev_name": "t"}]}"#)
        .contains("network_overrides"));
    let reply = send_json(
        &fc.socket,
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path": "relative", "mem_file_path": "/m"}"#,
    );
    assert!(
        fault(&reply).contains("No such file"),
        "the host's refusal is passed on"
    );
    let reply = fc.curl(GETTING_STARTED[3]);
    assert_eq!(reply.status, 204);
    assert!(load(r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#).contains("after configuring"));
}

#[test]
fn bad_requests_get_firecracker_faults() {
    let fc = Fixture::new(VM);
    assert_eq!(
        fault(&send(&fc.socket, "GET", "/nothing", None)),
        "Invalid request method and/or path: GET nothing."
    );
    assert_eq!(
        fault(&send(&fc.socket, "PUT", "/vm", None)),
        "Invalid request method and/or path: PUT vm."
    );
    let mismatch =
        json!({"drive_id": "data", "path_on_host": fc.rootfs, "is_root_device": false}).to_string();
    assert_eq!(
        fault(&send_json(&fc.socket, "PUT", "/drives/rootfs", &mismatch)),
        "The id from the path does not match the id from the body!"
    );
    let unknown = send_json(
        &fc.socket,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "mem_mib": 1}"#,
    );
    assert!(fault(&unknown).contains("unknown field `mem_mib`"));
    let missing = send_json(
        &fc.socket,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/no/such/vmlinux"}"#,
    );
    let message = fault(&missing);
    assert!(
        message.starts_with("boot-source.kernel_image_path: cannot open /no/such/vmlinux"),
        "{message}"
    );
    let too_many = send_json(
        &fc.socket,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 64, "mem_size_mib": 256}"#,
    );
    assert!(fault(&too_many).contains("machine-config.vcpu_count"));
    assert!(fault(&send(&fc.socket, "PUT", "/boot-source", None)).contains("needs a JSON body"));
    let big = vec![b' '; crate::http::MAX_BODY_BYTES + 1];
    let reply = send(
        &fc.socket,
        "PUT",
        "/boot-source",
        Some(("application/json", &big)),
    );
    assert!(fault(&reply).contains("larger than the limit"));
    assert!(fc.host.calls().is_empty());
}

#[test]
fn body_without_json_content_type_is_read_as_json() {
    let fc = Fixture::new(VM);
    // `curl -d` alone sends a form content type; scripts written for Firecracker rely on it.
    let body = br#"{"vcpu_count": 2, "mem_size_mib": 256}"#;
    let reply = send(
        &fc.socket,
        "PUT",
        "/machine-config",
        Some(("application/x-www-form-urlencoded", body)),
    );
    assert_eq!(reply.status, 204, "{}", reply.text());
}

#[test]
fn host_failures_are_500() {
    let fc = Fixture::new("broken");
    let reply = send(&fc.socket, "GET", "/", None);
    assert_eq!(reply.status, 500);
    assert!(reply.json()["fault_message"]
        .as_str()
        .unwrap()
        .contains("KVM said no"));
}

#[test]
fn flush_metrics_appends_a_json_line_once_configured() {
    let fc = Fixture::new(VM);
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(
        send_json(&fc.socket, "PUT", "/actions", flush).status,
        204,
        "a no-op before"
    );
    let path = fc.dir.as_path().join("metrics.json");
    let body = json!({"metrics_path": path}).to_string();
    assert_eq!(send_json(&fc.socket, "PUT", "/metrics", &body).status, 204);
    assert!(fault(&send_json(&fc.socket, "PUT", "/metrics", &body)).contains("Reinitialization"));
    fc.boot();
    assert_eq!(send_json(&fc.socket, "PUT", "/actions", flush).status, 204);
    assert_eq!(send_json(&fc.socket, "PUT", "/actions", flush).status, 204);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["lockstep"]["name"], VM);
    assert_eq!(lines[0]["lockstep"]["devices"][0]["id"], "rootfs");
}

#[test]
fn real_curl_follows_the_getting_started_guide() {
    let Some(curl) = ["/usr/bin/curl", "/bin/curl", "/usr/local/bin/curl"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        let why = "curl is not installed (Debian package curl: run scripts/setup-host.sh)";
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{why}");
        eprintln!("SKIPPED real_curl_follows_the_getting_started_guide: {why}");
        return;
    };
    let fc = Fixture::new(VM);
    for command in GETTING_STARTED {
        let words = shell_words(&fc.localise(command));
        let output = std::process::Command::new(curl)
            .args(&words[1..])
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "204",
            "{command}: {output:?}"
        );
    }
    assert_eq!(fc.host.calls(), [format!("create_vm({VM}, start=true)")]);
    assert!(fc.host.get_vm(VM).is_ok());
}

#[test]
fn a_vm_defined_on_the_host_is_configured_with_update_vm() {
    let fc = Fixture::new(VM);
    let config = json!({
        "boot-source": {"kernel_image_path": fc.kernel, "boot_protocol": "pvh"},
        "name": VM,
        "logger": {"level": "Info"}
    });
    let config = crate::VmConfig::from_json(&config.to_string()).unwrap();
    fc.host.create_vm(config, false).unwrap();
    assert_eq!(
        send(&fc.socket, "GET", "/", None).json()["state"],
        "Not started"
    );
    let reply = fc.curl(GETTING_STARTED[3]);
    assert_eq!(reply.status, 204, "{}", reply.text());
    let reply = fc.curl(GETTING_STARTED[2]);
    assert_eq!(reply.status, 204, "{}", reply.text());
    let stored = fc.host.config(VM).unwrap();
    assert_eq!(stored.machine_config.mem_size_mib, 1024);
    assert_eq!(stored.drives[0].drive_id, "rootfs");
    assert_eq!(
        stored.boot_source.boot_protocol,
        crate::BootProtocol::Pvh,
        "other settings kept"
    );
    assert!(
        stored.firecracker.logger.is_some(),
        "Firecracker sections kept"
    );
    let load = send_json(
        &fc.socket,
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#,
    );
    assert!(fault(&load).contains("after configuring"));
    let reply = fc.curl(GETTING_STARTED[5]);
    assert_eq!(reply.status, 204, "{}", reply.text());
    let calls = fc.host.calls();
    assert_eq!(
        calls[1..],
        [
            format!("update_vm({VM})"),
            format!("update_vm({VM})"),
            format!("start_vm({VM})")
        ]
    );
    let message = fault(&fc.curl(GETTING_STARTED[3]));
    assert!(message.contains("after starting"), "{message}");
}
