//! The arbiter against a fake etcd that answers each connection with canned (often hostile)
//! bytes: every bad answer is an error, never a panic and never a win.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::arbiter::{check_id, Arbiter, ArbiterConfig, ArbiterError, FtRecord, Observed};
use super::gateway::GatewayError;

/// A one-connection fake server: reads the request's headers, then writes `answer` (split in
/// pieces so that readers see several reads) and closes, unless `hold` keeps it open silent.
fn fake(answer: Vec<u8>, hold: Option<Duration>) -> (SocketAddr, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        if let Some(hold) = hold {
            std::thread::sleep(hold);
        }
        for piece in answer.chunks(1000) {
            // The client may hang up once it has seen enough: that is what is tested.
            if conn.write_all(piece).is_err() {
                break;
            }
        }
        String::from_utf8_lossy(&request).into_owned()
    });
    (addr, handle)
}

fn arbiter(addr: SocketAddr) -> Arbiter {
    let mut config = ArbiterConfig::new(vec![addr]);
    config.timeout = Duration::from_millis(500);
    config.max_response = 16 * 1024;
    Arbiter::new(config)
}

fn ok_json(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn kv(key: &str, value: &[u8], mod_revision: &str) -> String {
    format!(
        r#"{{"key":"{}","create_revision":"2","mod_revision":"{mod_revision}","version":"1","value":"{}"}}"#,
        BASE64.encode(key),
        BASE64.encode(value)
    )
}

fn seen(live: &str, epoch: u64, mod_revision: i64) -> Observed {
    Observed {
        record: FtRecord {
            live: live.into(),
            epoch,
        },
        mod_revision,
    }
}

#[test]
fn a_record_is_read_from_a_range_answer() {
    let body = format!(
        r#"{{"header":{{"revision":"7"}},"kvs":[{}],"count":"1"}}"#,
        kv("/lockstep/ft/p1", br#"{"live":"hostA","epoch":3}"#, "6")
    );
    let (addr, server) = fake(ok_json(&body), None);
    let got = arbiter(addr).read("p1").unwrap();
    assert_eq!(got, Some(seen("hostA", 3, 6)));
    let request = server.join().unwrap();
    assert!(
        request.starts_with("POST /v3/kv/range HTTP/1.1\r\n"),
        "{request}"
    );
}

#[test]
fn no_kvs_is_no_record() {
    let (addr, _server) = fake(ok_json(r#"{"header":{"revision":"7"}}"#), None);
    assert_eq!(arbiter(addr).read("p1").unwrap(), None);
}

#[test]
fn a_succeeded_txn_is_a_win_at_its_revision() {
    let body = r#"{"header":{"revision":"9"},"succeeded":true,"responses":[{"response_put":{}}]}"#;
    let (addr, _server) = fake(ok_json(body), None);
    let got = arbiter(addr)
        .claim("p1", "hostB", Some(&seen("hostA", 3, 6)))
        .unwrap();
    assert_eq!(got, seen("hostB", 4, 9));
}

#[test]
fn a_failed_txn_names_the_winner() {
    let body = format!(
        r#"{{"header":{{"revision":"9"}},"responses":[{{"response_range":{{"kvs":[{}],"count":"1"}}}}]}}"#,
        kv("/lockstep/ft/p1", br#"{"live":"hostC","epoch":4}"#, "8")
    );
    let (addr, _server) = fake(ok_json(&body), None);
    let err = arbiter(addr)
        .claim("p1", "hostB", Some(&seen("hostA", 3, 6)))
        .unwrap_err();
    assert!(
        matches!(&err, ArbiterError::Lost { winner, epoch: 4, .. } if winner == "hostC"),
        "{err:?}"
    );
    assert!(err.to_string().contains("lost to hostC"), "{err}");
}

/// Each answer a claim might get that is not a clear "succeeded": an error, not a win.
#[test]
fn hostile_txn_answers_are_errors_never_wins() {
    let big = "x".repeat(64 * 1024);
    let answers: Vec<(&str, Vec<u8>)> = vec![
        ("bad JSON", ok_json(r#"{"succeeded":true"#)),
        ("succeeded not a bool", ok_json(r#"{"succeeded":"true"}"#)),
        (
            "no header revision",
            ok_json(r#"{"header":{"revision":"x"},"succeeded":true}"#),
        ),
        (
            "failure without the record",
            ok_json(r#"{"header":{"revision":"3"}}"#),
        ),
        (
            "bad base64",
            ok_json(
                r#"{"responses":[{"response_range":{"kvs":[{"key":"L2xvY2tzdGVwL2Z0L3Ax","value":"@@","mod_revision":"3"}]}}]}"#,
            ),
        ),
        (
            "not a record",
            ok_json(&format!(
                r#"{{"responses":[{{"response_range":{{"kvs":[{}]}}}}]}}"#,
                kv("/lockstep/ft/p1", b"[1,2]", "3")
            )),
        ),
        (
            "another key",
            ok_json(&format!(
                r#"{{"responses":[{{"response_range":{{"kvs":[{}]}}}}]}}"#,
                kv("/lockstep/ft/p2", br#"{"live":"h","epoch":1}"#, "3")
            )),
        ),
        (
            "huge body",
            ok_json(&format!(r#"{{"succeeded":true,"x":"{big}"}}"#)),
        ),
        (
            "huge Content-Length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n{}".to_vec(),
        ),
        (
            "huge body without a length",
            format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{big}").into_bytes(),
        ),
        (
            "huge headers",
            format!("HTTP/1.1 200 OK\r\nX: {big}\r\n\r\n{{}}").into_bytes(),
        ),
        (
            "huge chunk",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffff\r\n".to_vec(),
        ),
        (
            "bad chunk size",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
        ),
        ("not HTTP", b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()),
        (
            "cut short",
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{".to_vec(),
        ),
        (
            "error status",
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        ),
        ("nothing", Vec::new()),
    ];
    for (what, answer) in answers {
        let (addr, _server) = fake(answer, None);
        let got = arbiter(addr).claim("p1", "hostB", Some(&seen("hostA", 3, 6)));
        match got {
            Err(ArbiterError::Lost { .. }) => panic!("{what}: read as a loss, should be refused"),
            Err(e) => eprintln!("{what}: {e}"),
            Ok(won) => panic!("{what}: read as a win: {won:?}"),
        }
    }
}

#[test]
fn size_limits_are_named() {
    let (addr, _server) = fake(
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
        None,
    );
    let err = arbiter(addr).read("p1").unwrap_err();
    assert!(
        matches!(
            err,
            ArbiterError::Gateway(GatewayError::TooLarge { what: "body", .. })
        ),
        "{err:?}"
    );
}

#[test]
fn a_chunked_answer_is_put_together() {
    let body = r#"{"header":{"revision":"9"},"succeeded":true}"#;
    let (a, b) = body.split_at(10);
    let answer = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let (addr, _server) = fake(answer.into_bytes(), None);
    let got = arbiter(addr).claim("p1", "hostB", None).unwrap();
    assert_eq!(got, seen("hostB", 1, 9));
}

#[test]
fn a_silent_server_times_out() {
    let (addr, _server) = fake(ok_json("{}"), Some(Duration::from_secs(3)));
    let start = Instant::now();
    let err = arbiter(addr).claim("p1", "hostB", None).unwrap_err();
    assert!(
        matches!(err, ArbiterError::Gateway(GatewayError::Timeout { .. })),
        "{err:?}"
    );
    // The timeout is 500 ms; generous bound for a loaded machine.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_closed_port_is_a_connect_error() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = arbiter(addr).claim("p1", "hostB", None).unwrap_err();
    assert!(
        matches!(err, ArbiterError::Gateway(GatewayError::Connect { .. })),
        "{err:?}"
    );
}

#[test]
fn ids_that_cannot_name_a_key_are_refused_before_sending() {
    for bad in ["", "a/b", "a b", "ü", &"x".repeat(129), "..\u{0}"] {
        assert!(check_id("pair", bad).is_err(), "{bad:?}");
    }
    for good in ["p1", "host-a.example_1", &"x".repeat(128)] {
        check_id("pair", good).unwrap();
    }
    // No server: an id refused is refused before any connection is tried.
    let a = arbiter("127.0.0.1:9".parse().unwrap());
    assert!(matches!(
        a.claim("p/1", "h", None),
        Err(ArbiterError::BadId { what: "pair", .. })
    ));
    assert!(matches!(
        a.claim("p1", "h 1", None),
        Err(ArbiterError::BadId { what: "host", .. })
    ));
}

#[test]
fn a_zero_ttl_keepalive_is_an_expired_lease() {
    let body = r#"{"result":{"header":{"revision":"2"},"ID":"77"}}"#;
    let (addr, _server) = fake(ok_json(body), None);
    let lease = super::Lease {
        id: 77,
        ttl: Duration::from_secs(5),
    };
    let err = arbiter(addr).keep_alive(&lease).unwrap_err();
    assert!(
        matches!(err, ArbiterError::LeaseExpired { id: 77 }),
        "{err:?}"
    );
}
