//! A whole host on KVM, driven with curl through its control API (every reply checked against
//! api/openapi.yaml): the VM life cycle, errors, metrics, and one failing VM beside a healthy one.

use std::time::Duration;

use lockstep_tests::host::TestHost;
use lockstep_tests::{guest_images, require_kvm, VmConfigBuilder};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn guest(name: &str, args: &str) -> Value {
    VmConfigBuilder::new(&guest_images().elf)
        .boot_args(args)
        .vcpus(2)
        .set("name", json!(name))
        .build()
}

fn post(host: &TestHost, template: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let reply = host.call("POST", template, path, body);
    let body = if reply.body.is_empty() {
        Value::Null
    } else {
        reply.json()
    };
    (reply.status, body)
}

#[test]
fn life_cycle_with_curl() {
    if !require_kvm("life_cycle_with_curl") {
        return;
    }
    let mut host = TestHost::start(vec![]);
    let (status, info) = post(
        &host,
        "/v1/vms",
        "/v1/vms",
        Some(&guest("life", "lks.mode=run lks.run=\"counter 200\"")),
    );
    assert_eq!(
        (status, info["state"].as_str()),
        (201, Some("created")),
        "{info}"
    );

    let list = host.call("GET", "/v1/vms", "/v1/vms", None).json();
    assert_eq!(list[0]["name"], "life");
    let details = host
        .call("GET", "/v1/vms/{name}", "/v1/vms/life", None)
        .json();
    assert_eq!(details["config"]["machine-config"]["vcpu_count"], 2);

    let (status, info) = post(&host, "/v1/vms/{name}/start", "/v1/vms/life/start", None);
    assert_eq!((status, info["state"].as_str()), (200, Some("running")));
    host.wait_serial("life", "LKS counter=3", WAIT);

    // Pause: the counter stops; resume: it carries on from where it was.
    let (_, info) = post(&host, "/v1/vms/{name}/pause", "/v1/vms/life/pause", None);
    assert_eq!(info["state"], "paused");
    let frozen = host.serial("life");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(host.serial("life"), frozen, "a paused guest must not run");
    let (_, info) = post(&host, "/v1/vms/{name}/resume", "/v1/vms/life/resume", None);
    assert_eq!(info["state"], "running");
    let last = frozen
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("LKS counter="))
        .unwrap();
    let last: u64 = last.split_whitespace().next().unwrap().parse().unwrap();
    host.wait_serial("life", &format!("LKS counter={} ", last + 2), WAIT);

    let metrics = host
        .call(
            "GET",
            "/v1/vms/{name}/metrics",
            "/v1/vms/life/metrics",
            None,
        )
        .json();
    assert!(metrics["vcpu"]["exits"].as_u64().unwrap() > 0, "{metrics}");
    let serial = metrics["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "serial")
        .unwrap();
    assert!(serial["counters"]["bytes_out"].as_u64().unwrap() > 100);
    let prometheus = host.call("GET", "/metrics", "/metrics", None).text();
    assert!(
        prometheus.contains(r#"lockstep_vm_state{vm="life",state="running"} 1"#),
        "{prometheus}"
    );
    assert!(
        prometheus.contains("lockstep_vcpu_exits_total{vm=\"life\"}"),
        "{prometheus}"
    );

    // Reset boots it again from its config; a forced shutdown stops it.
    let (_, info) = post(&host, "/v1/vms/{name}/reset", "/v1/vms/life/reset", None);
    assert_eq!(
        (info["state"].as_str(), info["boot_count"].as_u64()),
        (Some("running"), Some(2))
    );
    let (_, info) = post(
        &host,
        "/v1/vms/{name}/shutdown",
        "/v1/vms/life/shutdown",
        Some(&json!({ "force": true })),
    );
    assert_eq!(info["state"], "stopped", "{info}");
    let (status, _) = post(&host, "/v1/vms/{name}/pause", "/v1/vms/life/pause", None);
    assert_eq!(status, 409, "pausing a stopped VM");

    let reply = host.call("DELETE", "/v1/vms/{name}", "/v1/vms/life", None);
    assert_eq!(reply.status, 204);
    assert_eq!(
        host.call("GET", "/v1/vms/{name}", "/v1/vms/life", None)
            .status,
        404
    );
    assert_eq!(host.stop(), Some(0));
}

#[test]
fn bad_requests_get_json_errors_naming_the_problem() {
    if !require_kvm("bad_requests_get_json_errors_naming_the_problem") {
        return;
    }
    let host = TestHost::start(vec![guest("one", "lks.mode=halt")]);
    let socket = host.api_socket().to_owned();
    let raw = lockstep_tests::host::curl_unix(
        &socket,
        "POST",
        "/v1/vms",
        Some("{\n  \"name\": \"x\",\n  \"boot-source\": {,}\n}"),
    );
    assert_eq!(raw.status, 400);
    let message = raw.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.contains("line 3") && message.contains("column"),
        "{message}"
    );

    let (status, body) = post(&host, "/v1/vms", "/v1/vms", Some(&guest("one", "x")));
    assert_eq!(status, 409, "a second VM named one: {body}");
    let mut bad = guest("two", "x");
    bad["machine-config"]["vcpu_count"] = json!(0);
    let (status, body) = post(&host, "/v1/vms", "/v1/vms", Some(&bad));
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("machine-config.vcpu_count"),
        "{body}"
    );
    let (status, body) = post(&host, "/v1/vms/{name}/start", "/v1/vms/nobody/start", None);
    assert_eq!(status, 404, "{body}");
    let (status, _) = post(&host, "/v1/vms/{name}/start", "/v1/vms/one/start", None);
    assert_eq!(status, 409, "starting a running VM");
    let wrong = lockstep_tests::host::curl_unix(&socket, "DELETE", "/v1/host", None);
    assert_eq!(wrong.status, 405);
    assert!(wrong
        .headers
        .iter()
        .any(|(n, v)| n == "allow" && v.contains("GET")));
    assert_eq!(
        lockstep_tests::host::curl_unix(&socket, "GET", "/v2/nothing", None).status,
        404
    );
    // The host still serves after all of that.
    assert_eq!(host.state("one"), "running");
}

#[test]
fn one_failing_vm_leaves_the_host_and_the_others_running() {
    if !require_kvm("one_failing_vm_leaves_the_host_and_the_others_running") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let not_a_kernel = dir.path().join("vmlinux");
    std::fs::write(&not_a_kernel, b"#!/bin/sh\necho this is no kernel\n").unwrap();
    let mut broken = guest("broken", "x");
    broken["boot-source"]["kernel_image_path"] = json!(not_a_kernel);
    let host = TestHost::start(vec![
        guest("healthy", "lks.mode=run lks.run=\"counter 100\""),
        broken,
        guest("crasher", "lks.mode=run lks.run=\"crash\""),
    ]);
    host.wait_serial("healthy", "LKS counter=2", WAIT);
    let broken = host
        .call("GET", "/v1/vms/{name}", "/v1/vms/broken", None)
        .json();
    assert_eq!(broken["state"], "failed");
    assert!(
        broken["exit_reason"]
            .as_str()
            .unwrap()
            .contains("not a kernel"),
        "{broken}"
    );
    host.wait_state("crasher", "stopped", WAIT);
    let crasher = host
        .call("GET", "/v1/vms/{name}", "/v1/vms/crasher", None)
        .json();
    assert_eq!(
        crasher["exit_reason"], "the guest triple-faulted",
        "{crasher}"
    );

    // The healthy VM kept running through both, and the API still answers.
    let before = host.serial("healthy").matches("LKS counter=").count();
    host.wait_serial("healthy", &format!("LKS counter={} ", before + 3), WAIT);
    assert_eq!(host.state("healthy"), "running");
    let list = host.call("GET", "/v1/vms", "/v1/vms", None).json();
    assert_eq!(list.as_array().unwrap().len(), 3);
}

#[test]
fn graceful_shutdown_asks_the_guest_then_forces() {
    if !require_kvm("graceful_shutdown_asks_the_guest_then_forces") {
        return;
    }
    let host = TestHost::start(vec![
        // Impatient: the reset must be taken on the pulse's own exit, not when the event loop
        // is next scheduled (on a loaded machine the guest's triple fault came first).
        guest("polite", "lks.mode=halt lks.reset=impatient"),
        guest("stubborn", "lks.mode=halt lks.cad=ignore"),
    ]);
    host.wait_serial("polite", "LKS halt", WAIT);
    host.wait_serial("stubborn", "LKS halt", WAIT);
    let (status, info) = post(
        &host,
        "/v1/vms/{name}/shutdown",
        "/v1/vms/polite/shutdown",
        Some(&json!({ "timeout_s": 20 })),
    );
    assert_eq!(
        (status, info["state"].as_str()),
        (200, Some("stopped")),
        "{info}"
    );
    assert!(
        host.serial("polite").contains("LKS ctrl-alt-del"),
        "the guest was asked"
    );
    assert_eq!(info["exit_reason"], "the guest reset itself");

    let started = std::time::Instant::now();
    let (_, info) = post(
        &host,
        "/v1/vms/{name}/shutdown",
        "/v1/vms/stubborn/shutdown",
        Some(&json!({ "timeout_s": 2 })),
    );
    assert_eq!(info["state"], "stopped");
    assert_eq!(
        info["exit_reason"], "stopped by request",
        "forced after the timeout"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(host.serial("stubborn").contains("LKS ctrl-alt-del ignored"));
}

#[test]
fn interactive_console_and_firecracker_socket_per_vm() {
    if !require_kvm("interactive_console_and_firecracker_socket_per_vm") {
        return;
    }
    use std::io::{Read, Write};
    let host = TestHost::start_with(
        vec![guest("chat", "lks.mode=monitor")],
        json!({ "console_sockets": true, "firecracker_sockets": true }),
    );
    host.wait_serial("chat", "lks> ", WAIT);
    let info = host
        .call("GET", "/v1/vms/{name}", "/v1/vms/chat", None)
        .json();
    let console = info["console_socket"]
        .as_str()
        .expect("a console socket")
        .to_string();
    let mut stream = std::os::unix::net::UnixStream::connect(&console).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"echo typed-through-the-socket\r")
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while !seen.contains("\ntyped-through-the-socket") {
        let n = stream.read(&mut buf).expect("console output");
        assert!(n > 0, "console closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        host.serial("chat").contains("typed-through-the-socket"),
        "the log keeps everything too"
    );

    // The VM's own Firecracker socket drives it too.
    let fc = std::path::PathBuf::from(
        info["firecracker_socket"]
            .as_str()
            .expect("a Firecracker socket"),
    );
    let reply = lockstep_tests::host::curl_unix(&fc, "GET", "/", None);
    assert_eq!(reply.json()["state"], "Running");
    let reply =
        lockstep_tests::host::curl_unix(&fc, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(reply.status, 204);
    assert_eq!(host.state("chat"), "paused");
}
