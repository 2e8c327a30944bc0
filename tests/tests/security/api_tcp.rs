//! The control API over TCP lets in only who may (issue #11, point 4): a real `lockstep host`
//! with `api_tcp`, driven with curl as a local user or a browser's request would be, no guest.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use lockstep_tests::host::TestHost;
use lockstep_tests::{guest_images, require_kvm, VmConfigBuilder};
use serde_json::{json, Value};

/// What curl got: the status, the headers (lower-case names) and the body.
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// curl against `http://127.0.0.1:PORT{path}` with extra arguments (headers, data).
fn curl(port: u16, method: &str, path: &str, args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args([
            "-s",
            "-i",
            "--max-time",
            "30",
            "-H",
            "Expect:",
            "-X",
            method,
        ])
        .args(args)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl failed: {out:?}");
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a reply");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

fn vm(name: &str) -> Value {
    VmConfigBuilder::new(&guest_images().elf)
        .boot_args("lks.mode=halt")
        .set("name", json!(name))
        .build()
}

fn defined(host: &TestHost) -> Vec<Value> {
    host.call("GET", "/v1/vms", "/v1/vms", None)
        .json()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn tcp_needs_the_token_the_own_host_and_json() {
    if !require_kvm("tcp_needs_the_token_the_own_host_and_json") {
        return;
    }
    let port = lockstep_tests::free_port();
    let host = TestHost::start_with(vec![], json!({ "api_tcp": format!("127.0.0.1:{port}") }));
    let token_file = host.dir().join("state/api.token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let auth = format!("Authorization: Bearer {token}");
    let body = vm("intruder").to_string();
    let json_type = "Content-Type: application/json";

    // Refused, and nothing is defined: no token, a wrong one, another scheme.
    let mut wrong = token.clone().into_bytes();
    wrong[10] = if wrong[10] == b'a' { b'b' } else { b'a' };
    let wrong = format!(
        "Authorization: Bearer {}",
        String::from_utf8(wrong).unwrap()
    );
    for credential in [
        None,
        Some(wrong.as_str()),
        Some("Authorization: Basic YWRtaW46eA=="),
    ] {
        let mut args = vec!["-H", json_type, "--data-binary", &body];
        if let Some(c) = credential {
            args.extend(["-H", c]);
        }
        let reply = curl(port, "POST", "/v1/vms?start=true", &args);
        assert_eq!(reply.status, 401, "{credential:?}: {}", reply.body);
        assert!(
            reply.headers.contains("www-authenticate: bearer"),
            "{}",
            reply.headers
        );
        let error: Value = serde_json::from_str(&reply.body).unwrap();
        assert!(error["error"].is_string(), "{error}");
    }
    let reply = curl(port, "GET", "/v1/vms", &[]);
    assert_eq!(reply.status, 401);

    // A cross-origin form post carries no JSON type, even with the token.
    for args in [
        vec!["-H", &auth, "--data-binary", &body],
        vec![
            "-H",
            &auth,
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            &body,
        ],
        vec!["-H", &auth, "-F", "config=x"],
    ] {
        let reply = curl(port, "POST", "/v1/vms?start=true", &args);
        assert_eq!(reply.status, 415, "{args:?}: {}", reply.body);
    }

    // DNS rebinding: the page's own name in Host, even with the token.
    for bad in [
        "Host: evil.example:8080".to_string(),
        format!("Host: evil.example:{port}"),
    ] {
        let args = [
            "-H",
            &auth,
            "-H",
            &bad,
            "-H",
            json_type,
            "--data-binary",
            &body,
        ];
        let reply = curl(port, "POST", "/v1/vms?start=true", &args);
        assert_eq!(reply.status, 421, "{bad}: {}", reply.body);
    }
    assert!(defined(&host).is_empty(), "{:?}", defined(&host));

    // With the token and JSON, everything works.
    let args = ["-H", &auth, "-H", json_type, "--data-binary", &body];
    let reply = curl(port, "POST", "/v1/vms", &args);
    assert_eq!(reply.status, 201, "{}", reply.body);
    let reply = curl(port, "GET", "/v1/vms/intruder", &["-H", &auth]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let localhost = format!("Host: localhost:{port}");
    let reply = curl(
        port,
        "DELETE",
        "/v1/vms/intruder",
        &["-H", &auth, "-H", &localhost],
    );
    assert_eq!(reply.status, 204, "{}", reply.body);
    assert!(defined(&host).is_empty());
}

#[test]
fn a_configured_token_must_be_private() {
    if !require_kvm("a_configured_token_must_be_private") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "configured-token-0123456789\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(lockstep_tests::lockstep_bin())
        .args(["host", "--config"])
        .arg(write_config(dir.path(), &file, lockstep_tests::free_port()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("chmod 600") && stderr.contains(file.to_str().unwrap()),
        "{stderr}"
    );

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = lockstep_tests::free_port();
    let host = TestHost::start_with(
        vec![],
        json!({ "api_tcp": format!("127.0.0.1:{port}"), "api_tcp_token_path": file }),
    );
    let ok = curl(
        port,
        "GET",
        "/v1/host",
        &["-H", "Authorization: Bearer configured-token-0123456789"],
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(!host.dir().join("state/api.token").exists());
}

fn write_config(dir: &Path, token: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("host.json");
    let config = json!({
        "api_socket": dir.join("api.sock"),
        "state_dir": dir.join("state"),
        "api_tcp": format!("127.0.0.1:{port}"),
        "api_tcp_token_path": token,
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}
