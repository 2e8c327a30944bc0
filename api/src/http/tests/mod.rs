//! The control API over a real Unix socket against [`FakeHost`], and its OpenAPI document.

mod openapi;
mod tcp;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use vmm_sys_util::tempdir::TempDir;

use self::openapi::{check_reply, document, documented_responses, route_mismatches};
use super::fake_host::FakeHost;
use super::test_client::{exchange_raw, send, send_json, RawReply};
use super::{spawn, Listeners, ServerHandle, MAX_BODY_BYTES};

/// A server on a temporary socket in front of a fresh fake host.
pub(crate) struct TestServer {
    pub host: Arc<FakeHost>,
    pub socket: PathBuf,
    pub server: Option<ServerHandle>,
    _dir: TempDir,
}

impl TestServer {
    fn start() -> TestServer {
        let dir = TempDir::new().unwrap();
        let socket = dir.as_path().join("api.sock");
        let host = Arc::new(FakeHost::default());
        let listeners = Listeners::new().bind_unix(&socket).unwrap();
        let server = spawn(host.clone(), listeners).unwrap();
        TestServer {
            host,
            socket,
            server: Some(server),
            _dir: dir,
        }
    }
}

fn config(name: &str) -> String {
    json!({
        "boot-source": {"kernel_image_path": "/boot/vmlinux", "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "drives": [{"drive_id": "rootfs", "path_on_host": "/img/rootfs.ext4", "is_root_device": true}],
        "name": name
    })
    .to_string()
}

#[test]
fn every_route_is_documented_and_every_documented_route_is_served() {
    let problems = route_mismatches(&document());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn route_check_notices_a_route_missing_from_the_document() {
    let mut doc = document();
    doc["paths"].as_object_mut().unwrap().remove("/v1/restore");
    let problems = route_mismatches(&doc);
    assert_eq!(problems, ["POST /v1/restore is served but not documented"]);
    let mut doc = document();
    doc["paths"]["/v1/host"]["put"] = json!({"responses": {"204": {"description": "x"}}});
    assert_eq!(
        route_mismatches(&doc),
        ["PUT /v1/host is documented but not served"]
    );
}

#[test]
fn document_references_resolve_and_schemas_compile() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut refs = Vec::new();
    openapi::references(&doc, "", &mut refs);
    assert!(refs.len() > 50, "{}", refs.len());
    for (at, reference) in refs {
        let pointer = reference.strip_prefix('#').unwrap();
        assert!(
            doc.pointer(pointer).is_some(),
            "{at}: {reference} does not resolve"
        );
    }
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        // Validating compiles the schema first; whether null fits does not matter here.
        if let Err(e) = openapi::validate(&doc, schema, &serde_json::Value::Null) {
            assert!(!e.starts_with("bad schema"), "{name}: {e}");
        }
    }
}

/// One request of the conformance run and the status it must get.
struct Case {
    method: &'static str,
    template: &'static str,
    path: String,
    body: Option<(&'static str, Vec<u8>)>,
    status: u16,
}

fn case(method: &'static str, template: &'static str, name: &str, status: u16) -> Case {
    Case {
        method,
        template,
        path: template.replace("{name}", name).replace("{id}", "1"),
        body: None,
        status,
    }
}

fn migration(method: &'static str, id: &str, status: u16) -> Case {
    Case {
        method,
        template: "/v1/migrations/{id}",
        path: format!("/v1/migrations/{id}"),
        body: None,
        status,
    }
}

fn failover(id: &str, status: u16) -> Case {
    Case {
        method: "POST",
        template: "/v1/migrations/{id}/failover",
        path: format!("/v1/migrations/{id}/failover"),
        body: None,
        status,
    }
}

impl Case {
    fn json(mut self, body: &str) -> Case {
        self.body = Some(("application/json", body.as_bytes().to_vec()));
        self
    }

    fn query(mut self, query: &str) -> Case {
        self.path.push_str(query);
        self
    }
}

/// Requests that reach every documented reply of every route, in an order that builds the
/// states they need: `web` is created and driven through its life, `db` runs, `idle` stays
/// created, `broken` makes the host fail and `nope` does not exist.
fn conformance_cases() -> Vec<Case> {
    const VM: &str = "/v1/vms/{name}";
    let mut cases = vec![
        case("GET", "/v1/host", "", 200),
        case("POST", "/v1/vms", "", 201).json(&config("web")),
        case("POST", "/v1/vms", "", 201)
            .query("?start=true")
            .json(&config("db")),
        case("POST", "/v1/vms", "", 201)
            .query("?start=false")
            .json(&config("idle")),
        case("POST", "/v1/vms", "", 409).json(&config("web")),
        case("POST", "/v1/vms", "", 400).json(r#"{"boot-source": {"kernel_image_path": 7}}"#),
        case("POST", "/v1/vms", "", 500)
            .query("?start")
            .json(&config("broken")),
        case("GET", "/v1/vms", "", 200),
        case("GET", VM, "web", 200),
        case("GET", VM, "nope", 404),
        case("GET", VM, "broken", 500),
        case("GET", "/v1/vms/{name}/metrics", "db", 200),
        case("GET", "/v1/vms/{name}/metrics", "nope", 404),
        case("GET", "/v1/vms/{name}/metrics", "broken", 500),
        case("GET", "/metrics", "", 200),
        case("POST", "/v1/vms/{name}/snapshot", "idle", 409),
        case("POST", "/v1/vms/{name}/snapshot", "web", 400).json(r#"{"state_path": 1}"#),
        case("POST", "/v1/vms/{name}/shutdown", "web", 400).json(r#"{"timeout_s": "soon"}"#),
        case("POST", "/v1/vms/{name}/shutdown", "idle", 409),
        case("POST", "/v1/vms/{name}/reset", "idle", 409),
        case("POST", "/v1/restore", "", 201)
            .json(r#"{"state_path": "/snap/state", "memory_path": "/snap/mem", "name": "copy"}"#),
        case("POST", "/v1/restore", "", 409)
            .json(r#"{"state_path": "/snap/state", "memory_path": "/snap/mem", "name": "copy"}"#),
        case("POST", "/v1/restore", "", 400).json(r#"{"state_path": "/snap/state"}"#),
        case("POST", "/v1/restore", "", 500)
            .json(r#"{"state_path": "/s", "memory_path": "/m", "name": "broken"}"#),
    ];
    // The life of `web`: every transition, then the same one again (409).
    for template in [
        "/v1/vms/{name}/start",
        "/v1/vms/{name}/pause",
        "/v1/vms/{name}/resume",
    ] {
        cases.push(case("POST", template, "web", 200));
        cases.push(case("POST", template, "web", 409));
        cases.push(case("POST", template, "nope", 404));
        cases.push(case("POST", template, "broken", 500));
    }
    cases.extend([
        case("POST", "/v1/vms/{name}/snapshot", "web", 200),
        case("POST", "/v1/vms/{name}/snapshot", "web", 200)
            .json(r#"{"state_path": "/snap/web.state", "memory_path": "/snap/web.mem"}"#),
        case("POST", "/v1/vms/{name}/snapshot", "nope", 404),
        case("POST", "/v1/vms/{name}/snapshot", "broken", 500),
        case("POST", "/v1/vms/{name}/reset", "web", 200),
        case("POST", "/v1/vms/{name}/reset", "nope", 404),
        case("POST", "/v1/vms/{name}/reset", "broken", 500),
        case("POST", "/v1/vms/{name}/shutdown", "web", 200).json(r#"{"timeout_s": 5}"#),
        case("POST", "/v1/vms/{name}/shutdown", "nope", 404),
        case("POST", "/v1/vms/{name}/shutdown", "broken", 500),
        case("PUT", VM, "idle", 200).json(&config("idle")),
        case("PUT", VM, "idle", 400).json(&config("other")),
        case("PUT", VM, "db", 409).json(&config("db")),
        case("PUT", VM, "nope", 404).json(&config("nope")),
        case("PUT", VM, "broken", 500).json(&config("broken")),
        case("POST", "/v1/vms/{name}/migrate", "db", 202)
            .json(r#"{"destination": "127.0.0.1:7000", "token": "ab", "downtime_ms": 5}"#),
        case("POST", "/v1/vms/{name}/migrate", "idle", 409)
            .json(r#"{"destination": "127.0.0.1:7000", "token": "ab"}"#),
        case("POST", "/v1/vms/{name}/migrate", "nope", 404)
            .json(r#"{"destination": "127.0.0.1:7000", "token": "ab"}"#),
        case("POST", "/v1/vms/{name}/migrate", "broken", 500)
            .json(r#"{"destination": "127.0.0.1:7000", "token": "ab"}"#),
        case("POST", "/v1/vms/{name}/migrate", "db", 400).json(r#"{"destination": 1}"#),
        case("POST", "/v1/migrations/incoming", "", 201)
            .json(r#"{"listen": "127.0.0.1:0", "name": "new"}"#),
        case("POST", "/v1/migrations/incoming", "", 409)
            .json(r#"{"listen": "127.0.0.1:0", "name": "db"}"#),
        case("POST", "/v1/migrations/incoming", "", 500)
            .json(r#"{"listen": "127.0.0.1:0", "name": "broken"}"#),
        case("POST", "/v1/migrations/incoming", "", 400).json(r#"{"listen": "x"}"#),
        migration("GET", "1", 200),
        migration("GET", "nope", 404),
        migration("GET", "broken", 500),
        migration("DELETE", "1", 200),
        migration("DELETE", "done", 409),
        migration("DELETE", "nope", 404),
        migration("DELETE", "broken", 500),
        case("GET", "/v1/migrations", "", 200),
        failover("1", 202),
        failover("done", 409),
        failover("nope", 404),
        failover("broken", 500),
        case("DELETE", VM, "idle", 204),
        case("DELETE", VM, "idle", 404),
        case("DELETE", VM, "broken", 500),
    ]);
    // Refusals every route can give: an unknown query parameter (400), a body over the limit
    // (413) and a body that is not JSON (415).
    let too_big = vec![b' '; MAX_BODY_BYTES + 1];
    for route in super::control_api::ROUTES {
        let method = route.method.as_str();
        let method: &'static str = ["GET", "POST", "PUT", "DELETE"]
            .into_iter()
            .find(|m| *m == method)
            .unwrap();
        cases.push(case(method, route.template, "web", 400).query("?verbose=1"));
        let mut big = case(method, route.template, "web", 413);
        big.body = Some(("application/json", too_big.clone()));
        cases.push(big);
        let mut form = case(method, route.template, "web", 415);
        form.body = Some(("application/x-www-form-urlencoded", b"a=b".to_vec()));
        cases.push(form);
    }
    cases
}

fn run_case(socket: &Path, c: &Case) -> RawReply {
    match &c.body {
        Some((content_type, body)) => send(socket, c.method, &c.path, Some((content_type, body))),
        None => send(socket, c.method, &c.path, None),
    }
}

#[test]
fn every_documented_reply_is_given_and_fits_its_schema() {
    let doc = document();
    let server = TestServer::start();
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    for c in conformance_cases() {
        let reply = run_case(&server.socket, &c);
        if reply.status != c.status {
            problems.push(format!(
                "{} {}: expected {}, got {} {}",
                c.method,
                c.path,
                c.status,
                reply.status,
                reply.text()
            ));
            continue;
        }
        if let Err(e) = check_reply(&doc, c.method, c.template, &reply) {
            problems.push(e);
        }
        seen.insert((c.method.to_string(), c.template.to_string(), reply.status));
    }
    // The TCP listener's own refusals, on every route: no token (401), a foreign Host (421).
    let tcp = tcp::start();
    for route in super::control_api::ROUTES {
        let (method, template) = (route.method.as_str(), route.template);
        let path = template.replace("{name}", "web").replace("{id}", "1");
        let host = format!("Host: {}", tcp.addr);
        let auth = format!("Authorization: Bearer {}", tcp.token);
        for (status, head) in [
            (401, format!("{method} {path} HTTP/1.1\r\n{host}")),
            (
                421,
                format!("{method} {path} HTTP/1.1\r\nHost: evil.example\r\n{auth}"),
            ),
        ] {
            let reply = tcp::exchange(tcp.addr, &head, b"");
            if reply.status != status {
                problems.push(format!(
                    "TCP {method} {path}: expected {status}, got {}",
                    reply.status
                ));
                continue;
            }
            if let Err(e) = check_reply(&doc, method, template, &reply) {
                problems.push(e);
            }
            seen.insert((method.to_string(), template.to_string(), status));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    let documented = documented_responses(&doc);
    let never_given: Vec<_> = documented.difference(&seen).collect();
    assert!(
        never_given.is_empty(),
        "documented but never exercised: {never_given:#?}"
    );
    let undocumented: Vec<_> = seen.difference(&documented).collect();
    assert!(undocumented.is_empty(), "{undocumented:#?}");
}

#[test]
fn the_reply_check_notices_drift() {
    let doc = document();
    let server = TestServer::start();
    let good = send_json(&server.socket, "POST", "/v1/vms", &config("web"));
    check_reply(&doc, "POST", "/v1/vms", &good).unwrap();
    let retyped = |status: u16, body: serde_json::Value, content_type: &str| RawReply {
        status,
        headers: vec![
            ("Content-Type".into(), content_type.into()),
            ("Location".into(), "/v1/vms/web".into()),
        ],
        body: body.to_string().into_bytes(),
    };
    let mut body = good.json();
    body["surprise"] = json!(1);
    let err = check_reply(
        &doc,
        "POST",
        "/v1/vms",
        &retyped(201, body, "application/json"),
    );
    assert!(
        err.unwrap_err().contains("surprise"),
        "a new field is drift"
    );
    let mut body = good.json();
    body.as_object_mut().unwrap().remove("state");
    let err = check_reply(
        &doc,
        "POST",
        "/v1/vms",
        &retyped(201, body, "application/json"),
    );
    assert!(
        err.unwrap_err().contains("state"),
        "a missing field is drift"
    );
    let mut body = good.json();
    body["state"] = json!("Running");
    assert!(check_reply(
        &doc,
        "POST",
        "/v1/vms",
        &retyped(201, body, "application/json")
    )
    .is_err());
    let err = check_reply(
        &doc,
        "POST",
        "/v1/vms",
        &retyped(202, good.json(), "application/json"),
    );
    assert!(err.unwrap_err().contains("202 is not documented"));
    let err = check_reply(
        &doc,
        "POST",
        "/v1/vms",
        &retyped(201, good.json(), "text/plain"),
    );
    assert!(err.unwrap_err().contains("content type"));
    let mut no_location = retyped(201, good.json(), "application/json");
    no_location.headers.pop();
    assert!(check_reply(&doc, "POST", "/v1/vms", &no_location)
        .unwrap_err()
        .contains("Location"));
    let error = retyped(404, json!({"error": "x", "code": 4}), "application/json");
    assert!(check_reply(&doc, "GET", "/v1/vms/{name}", &error).is_err());
}

#[test]
fn unknown_route_is_404_and_wrong_method_is_405_with_allow() {
    let server = TestServer::start();
    let reply = send(&server.socket, "GET", "/v1/nothing", None);
    assert_eq!(reply.status, 404);
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains("GET /v1/nothing"));
    let reply = send(&server.socket, "PUT", "/v1/vms", None);
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, POST"));
    assert!(reply.json()["error"].as_str().unwrap().contains("PUT"));
}

#[test]
fn malformed_config_names_line_column_and_field() {
    let server = TestServer::start();
    let reply = send_json(
        &server.socket,
        "POST",
        "/v1/vms",
        "{\n  \"boot-source\": {,\n}",
    );
    assert_eq!(reply.status, 400);
    let message = reply.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.contains("line 2") && message.contains("column"),
        "{message}"
    );
    let body = r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": "two", "mem_size_mib": 64}}"#;
    let reply = send_json(&server.socket, "POST", "/v1/vms", body);
    let message = reply.json()["error"].as_str().unwrap().to_string();
    assert!(message.contains("machine-config.vcpu_count"), "{message}");
    let reply = send_json(
        &server.socket,
        "POST",
        "/v1/vms/x/shutdown",
        r#"{"timeout": 3}"#,
    );
    let message = reply.json()["error"].as_str().unwrap().to_string();
    assert!(message.contains("unknown field `timeout`"), "{message}");
    assert!(
        server.host.calls().is_empty(),
        "nothing reached the host: {:?}",
        server.host.calls()
    );
}

#[test]
fn create_and_start_reach_the_host_with_the_config() {
    let server = TestServer::start();
    let reply = send_json(&server.socket, "POST", "/v1/vms?start=true", &config("web"));
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.header("location"), Some("/v1/vms/web"));
    assert_eq!(reply.json()["state"], "running");
    assert_eq!(server.host.calls(), ["create_vm(web, start=true)"]);
    let stored = server.host.config("web").unwrap();
    assert_eq!(stored.machine_config.vcpu_count, 2);
    assert_eq!(stored.drives[0].drive_id, "rootfs");
    let reply = send(&server.socket, "GET", "/v1/vms/web", None);
    assert_eq!(
        reply.json()["config"]["drives"][0]["path_on_host"],
        "/img/rootfs.ext4"
    );
}

#[test]
fn bodies_without_content_type_are_json_and_empty_objects_are_no_body() {
    let server = TestServer::start();
    let reply = send(
        &server.socket,
        "POST",
        "/v1/vms",
        Some(("", config("web").as_bytes())),
    );
    assert_eq!(reply.status, 201, "{}", reply.text());
    let reply = send_json(&server.socket, "POST", "/v1/vms/web/start", "{}");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = send_json(
        &server.socket,
        "POST",
        "/v1/vms/web/pause",
        r#"{"now": true}"#,
    );
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("takes no request body"));
}

#[test]
fn shutdown_body_reaches_the_host() {
    let server = TestServer::start();
    send_json(&server.socket, "POST", "/v1/vms?start=true", &config("web"));
    let reply = send_json(
        &server.socket,
        "POST",
        "/v1/vms/web/shutdown",
        r#"{"force": true}"#,
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["state"], "stopped");
    assert_eq!(
        server.host.calls().last().unwrap(),
        "shutdown_vm(web, timeout_s=None, force=true)"
    );
}

#[test]
fn oversized_streamed_body_is_413() {
    let server = TestServer::start();
    // Chunked, so the size is only known while reading.
    let mut request = b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..(MAX_BODY_BYTES / chunk.len() + 2) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let socket = server.socket.clone();
    let reply = std::thread::spawn(move || exchange_raw(&socket, &request))
        .join()
        .unwrap();
    assert_eq!(reply.status, 413);
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains("larger than"));
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    use std::io::{Read, Write};
    let server = TestServer::start();
    let mut stream = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    stream
        .write_all(b"GET /v1/host HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    assert_eq!(raw.matches("HTTP/1.1 200 OK").count(), 2, "{raw}");
}

#[test]
fn prometheus_endpoint_has_its_content_type_and_vm_series() {
    let server = TestServer::start();
    send_json(&server.socket, "POST", "/v1/vms?start=true", &config("web"));
    let reply = send(&server.socket, "GET", "/metrics", None);
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = reply.text();
    assert!(
        text.contains("lockstep_vm_state{vm=\"web\",state=\"running\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "lockstep_device_read_bytes_total{vm=\"web\",kind=\"block\",id=\"rootfs\"} 4096"
        ),
        "{text}"
    );
    assert!(
        text.contains("lockstep_vcpu_exits_total{vm=\"web\"} 100"),
        "{text}"
    );
}

#[test]
fn stopping_the_server_removes_its_socket() {
    let mut server = TestServer::start();
    assert!(server.socket.exists());
    server.server.take().unwrap().stop().unwrap();
    assert!(!server.socket.exists());
    assert!(std::os::unix::net::UnixStream::connect(&server.socket).is_err());
}

#[test]
fn unknown_config_key_is_refused_by_name() {
    let server = TestServer::start();
    let body = r#"{"boot-source": {"kernel_image_path": "/k"}, "name": "web", "bogus": 1}"#;
    let reply = send_json(&server.socket, "POST", "/v1/vms", body);
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("bogus"), "{}", reply.text());
}

#[test]
fn serve_runs_in_the_callers_runtime_until_shutdown() {
    let dir = TempDir::new().unwrap();
    let socket = dir.as_path().join("api.sock");
    let listeners = Listeners::new().bind_unix(&socket).unwrap();
    let host: Arc<FakeHost> = Arc::new(FakeHost::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let client_socket = socket.clone();
    let client = std::thread::spawn(move || {
        let reply = send(&client_socket, "GET", "/v1/vms", None);
        let _ = stop_tx.send(());
        reply
    });
    runtime
        .block_on(super::serve(host, listeners, async {
            let _ = stop_rx.await;
        }))
        .unwrap();
    let reply = client.join().unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!([]));
    assert!(!socket.exists());
}
