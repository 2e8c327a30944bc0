//! The control API on its loopback TCP listener: only requests with the token, the listener's
//! own `Host` and JSON bodies get through; every other one is refused before the host is asked
//! anything.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use vmm_sys_util::tempdir::TempDir;

use super::config;
use crate::control::HostControl;
use crate::http::fake_host::FakeHost;
use crate::http::test_client::{parse_reply, RawReply};
use crate::http::{spawn, ApiToken, Listeners, ServerHandle};

pub(super) struct TcpServer {
    host: Arc<FakeHost>,
    server: ServerHandle,
    pub(super) addr: SocketAddr,
    pub(super) token: String,
    _dir: TempDir,
}

/// A server on a loopback port with a fresh token, in front of a fresh fake host.
pub(super) fn start() -> TcpServer {
    let dir = TempDir::new().unwrap();
    let token = ApiToken::load_or_generate(&dir.as_path().join("api.token")).unwrap();
    let secret = token.secret().to_string();
    let host = Arc::new(FakeHost::default());
    let listeners = Listeners::new()
        .bind_tcp("127.0.0.1:0".parse().unwrap(), token)
        .unwrap();
    let server = spawn(host.clone(), listeners).unwrap();
    let addr = server.tcp_addr().unwrap();
    TcpServer {
        host,
        server,
        addr,
        token: secret,
        _dir: dir,
    }
}

/// Sends `head` (request line and headers, without the blank line) and `body` over TCP.
pub(super) fn exchange(addr: SocketAddr, head: &str, body: &[u8]) -> RawReply {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut request = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let _ = stream.write_all(&request);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_reply(&raw)
}

fn assert_nothing_defined(host: &FakeHost) {
    assert!(host.list_vms().is_empty(), "{:?}", host.list_vms());
}

#[test]
fn with_the_token_and_json_everything_works() {
    let s = start();
    let auth = format!("Authorization: Bearer {}", s.token);
    let host = format!("Host: {}", s.addr);
    let reply = exchange(
        s.addr,
        &format!("GET /v1/host HTTP/1.1\r\n{host}\r\n{auth}"),
        b"",
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["kvm_backend"], "vmx");
    let reply = exchange(
        s.addr,
        &format!(
            "POST /v1/vms HTTP/1.1\r\nHost: localhost:{}\r\n{auth}\r\nContent-Type: application/json",
            s.addr.port()
        ),
        config("web").as_bytes(),
    );
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(s.host.list_vms().len(), 1);
    // A POST without a body needs no Content-Type.
    let reply = exchange(
        s.addr,
        &format!("POST /v1/vms/web/start HTTP/1.1\r\n{host}\r\n{auth}"),
        b"",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    s.server.stop().unwrap();
}

#[test]
fn without_the_right_token_nothing_is_done() {
    let s = start();
    let host = format!("Host: {}", s.addr);
    let define = |auth: &str| {
        exchange(
            s.addr,
            &format!("POST /v1/vms HTTP/1.1\r\n{host}{auth}\r\nContent-Type: application/json"),
            config("web").as_bytes(),
        )
    };
    let mut wrong = s.token.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    for auth in [
        String::new(),
        format!("\r\nAuthorization: Bearer {wrong}"),
        format!("\r\nAuthorization: Bearer {}x", s.token),
        format!("\r\nAuthorization: Basic {}", s.token),
        "\r\nAuthorization: Bearer".to_string(),
    ] {
        let reply = define(&auth);
        assert_eq!(reply.status, 401, "{auth:?}: {}", reply.text());
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"lockstep\"")
        );
        assert!(reply.json()["error"].as_str().unwrap().contains("Bearer"));
    }
    let reply = exchange(s.addr, &format!("GET /v1/vms HTTP/1.1\r\n{host}"), b"");
    assert_eq!(reply.status, 401);
    assert_nothing_defined(&s.host);
}

#[test]
fn cross_origin_form_posts_are_refused() {
    let s = start();
    let auth = format!("Authorization: Bearer {}", s.token);
    let host = format!("Host: {}", s.addr);
    for content_type in [
        "\r\nContent-Type: application/x-www-form-urlencoded",
        "\r\nContent-Type: text/plain",
        "\r\nContent-Type: multipart/form-data; boundary=x",
        "",
    ] {
        let reply = exchange(
            s.addr,
            &format!("POST /v1/vms HTTP/1.1\r\n{host}\r\n{auth}{content_type}"),
            config("web").as_bytes(),
        );
        assert_eq!(reply.status, 415, "{content_type:?}: {}", reply.text());
        assert!(reply.json()["error"].as_str().unwrap().contains("JSON"));
    }
    // An empty form post to an action is refused too.
    s.host
        .create_vm(serde_json::from_str(&config("db")).unwrap(), false)
        .unwrap();
    let reply = exchange(
        s.addr,
        &format!("POST /v1/vms/db/start HTTP/1.1\r\n{host}\r\n{auth}\r\nContent-Type: text/plain"),
        b"",
    );
    assert_eq!(reply.status, 415);
    let vms = s.host.list_vms();
    assert_eq!(vms.len(), 1);
    assert_eq!(json!(vms[0].state), json!("created"));
}

#[test]
fn a_foreign_host_header_is_refused() {
    let s = start();
    let auth = format!("Authorization: Bearer {}", s.token);
    let port = s.addr.port();
    for host in [
        format!("\r\nHost: evil.example:{port}"),
        "\r\nHost: evil.example:8080".to_string(),
        format!("\r\nHost: 127.0.0.1:{}", port.wrapping_add(1)),
        "\r\nHost: localhost".to_string(),
        String::new(),
    ] {
        let reply = exchange(
            s.addr,
            &format!("POST /v1/vms HTTP/1.1{host}\r\n{auth}\r\nContent-Type: application/json"),
            config("web").as_bytes(),
        );
        assert!(
            reply.status == 421 || reply.status == 400,
            "{host:?}: {} {}",
            reply.status,
            reply.text()
        );
    }
    // An absolute-form target naming another host is refused as well.
    let reply = exchange(
        s.addr,
        &format!(
            "POST http://evil.example:{port}/v1/vms HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\nContent-Type: application/json"
        ),
        config("web").as_bytes(),
    );
    assert_eq!(reply.status, 421, "{}", reply.text());
    assert_nothing_defined(&s.host);
}

#[test]
fn the_unix_socket_needs_no_token() {
    let dir = TempDir::new().unwrap();
    let socket = dir.as_path().join("api.sock");
    let host = Arc::new(FakeHost::default());
    let server = spawn(host, Listeners::new().bind_unix(&socket).unwrap()).unwrap();
    let reply = super::send(Path::new(&socket), "GET", "/v1/host", None);
    assert_eq!(reply.status, 200);
    server.stop().unwrap();
}
