//! The HTTP side of DSP0200 and the endpoint's robustness, with raw HTTP over TCP: headers,
//! protocol errors, hostile bodies (DTDs, entities, huge names and queries, oversize bodies),
//! authentication and its brake, stalled and concurrent clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine;
use lockstep_cim::testing::raw_http::{connect_from, loopback};
use lockstep_cim::testing::TestServer;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn auth(s: &TestServer) -> String {
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", s.http.user, s.http.password));
    format!("Basic {token}")
}

fn addr(s: &TestServer) -> SocketAddr {
    s.server.as_ref().unwrap().http_addr().unwrap()
}

/// Sends one request (with `Connection: close`) and reads the whole reply.
fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer before reading all of a refused body.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse(&raw)
}

fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

fn cim_headers<'a>(auth: &'a str, method: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("Authorization", auth),
        ("Content-Type", "application/xml; charset=\"utf-8\""),
        ("CIMOperation", "MethodCall"),
        ("CIMMethod", method),
        ("CIMObject", "root%2Fcimv2"),
    ]
}

fn intrinsic(method: &str, namespace: &str, params: &str) -> String {
    let ns: String = namespace
        .split('/')
        .map(|p| format!("<NAMESPACE NAME=\"{p}\"/>"))
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\" ?><CIM CIMVERSION=\"2.0\" DTDVERSION=\"2.0\"><MESSAGE ID=\"42\" PROTOCOLVERSION=\"1.0\"><SIMPLEREQ><IMETHODCALL NAME=\"{method}\"><LOCALNAMESPACEPATH>{ns}</LOCALNAMESPACEPATH>{params}</IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>"
    )
}

fn class_param(class: &str) -> String {
    format!("<IPARAMVALUE NAME=\"ClassName\"><CLASSNAME NAME=\"{class}\"/></IPARAMVALUE>")
}

/// The request most tests send: EnumerateInstanceNames of CIM_ComputerSystem in root/cimv2.
fn computer_system_names() -> String {
    intrinsic(
        "EnumerateInstanceNames",
        "root/cimv2",
        &class_param("CIM_ComputerSystem"),
    )
}

fn post(s: &TestServer, method: &str, body: &str) -> Reply {
    let a = auth(s);
    send(
        addr(s),
        "POST",
        "/cimom",
        &cim_headers(&a, method),
        body.as_bytes(),
    )
}

#[test]
fn a_plain_request_and_its_headers() {
    let s = TestServer::fake(3);
    let r = post(&s, "EnumerateInstanceNames", &computer_system_names());
    assert_eq!(r.status, 200);
    assert!(r
        .header("Content-Type")
        .unwrap()
        .starts_with("application/xml"));
    assert_eq!(r.header("CIMOperation"), Some("MethodResponse"));
    assert_eq!(r.body.matches("<INSTANCENAME ").count(), 4);
    assert!(r.body.contains("<MESSAGE ID=\"42\""));
    // CIMObject not percent-encoded, and no CIMProtocolVersion: both accepted.
    let a = auth(&s);
    let mut h = cim_headers(&a, "EnumerateInstanceNames");
    h[4] = ("CIMObject", "root/cimv2");
    let r = send(
        addr(&s),
        "POST",
        "/cimom",
        &h,
        computer_system_names().as_bytes(),
    );
    assert_eq!(r.status, 200);
    // CIMObject naming another namespace than the body.
    h[4] = ("CIMObject", "root%2Finterop");
    let r = send(
        addr(&s),
        "POST",
        "/cimom",
        &h,
        computer_system_names().as_bytes(),
    );
    assert_eq!(
        (r.status, r.header("CIMError")),
        (400, Some("header-mismatch"))
    );
}

#[test]
fn m_post_with_a_man_header() {
    let s = TestServer::fake(1);
    let a = auth(&s);
    let headers = [
        ("Authorization", a.as_str()),
        ("Content-Type", "application/xml"),
        ("Man", "http://www.dmtf.org/cim/mapping/http/v1.0 ; ns=73"),
        ("73-CIMOperation", "MethodCall"),
        ("73-CIMMethod", "EnumerateInstanceNames"),
        ("73-CIMObject", "root%2Fcimv2"),
    ];
    let r = send(
        addr(&s),
        "M-POST",
        "/cimom",
        &headers,
        computer_system_names().as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert!(r.header("Ext").is_some());
    assert_eq!(r.header("73-CIMOperation"), Some("MethodResponse"));
}

#[test]
fn protocol_errors_get_http_status_and_cim_error_header() {
    let s = TestServer::fake(1);
    let a = auth(&s);
    let body = computer_system_names();
    let r = send(addr(&s), "GET", "/cimom", &[("Authorization", &a)], b"");
    assert_eq!(r.status, 405);
    let r = send(
        addr(&s),
        "POST",
        "/elsewhere",
        &cim_headers(&a, "EnumerateInstanceNames"),
        body.as_bytes(),
    );
    assert_eq!(r.status, 404);
    let mut h = cim_headers(&a, "EnumerateInstanceNames");
    h[2] = ("CIMOperation", "MethodRequest");
    let r = send(addr(&s), "POST", "/cimom", &h, body.as_bytes());
    assert_eq!(
        (r.status, r.header("CIMError")),
        (400, Some("unsupported-operation"))
    );
    let r = send(
        addr(&s),
        "POST",
        "/cimom",
        &cim_headers(&a, "GetClass"),
        body.as_bytes(),
    );
    assert_eq!(
        (r.status, r.header("CIMError")),
        (400, Some("header-mismatch"))
    );
    let mut h = cim_headers(&a, "EnumerateInstanceNames");
    h.push(("CIMProtocolVersion", "2.0"));
    let r = send(addr(&s), "POST", "/cimom", &h, body.as_bytes());
    assert_eq!(
        (r.status, r.header("CIMError")),
        (501, Some("unsupported-protocol-version"))
    );
    for bad in ["<CIM><MESSAGE>", "not xml at all", "<CIM></MESSAGE>", ""] {
        let r = post(&s, "EnumerateInstanceNames", bad);
        assert_eq!(
            (r.status, r.header("CIMError")),
            (400, Some("request-not-well-formed")),
            "{bad:?}"
        );
    }
    let r = post(&s, "EnumerateInstanceNames", "<NOTCIM/>");
    assert_eq!(
        (r.status, r.header("CIMError")),
        (400, Some("request-not-valid"))
    );
    // The server still answers.
    assert_eq!(post(&s, "EnumerateInstanceNames", &body).status, 200);
}

#[test]
fn dtds_and_entities_are_never_processed() {
    let s = TestServer::fake(1);
    let xxe = "<?xml version=\"1.0\"?><!DOCTYPE CIM [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><CIM CIMVERSION=\"2.0\" DTDVERSION=\"2.0\"><MESSAGE ID=\"1\" PROTOCOLVERSION=\"1.0\"><SIMPLEREQ><IMETHODCALL NAME=\"GetClass\"><LOCALNAMESPACEPATH><NAMESPACE NAME=\"root\"/></LOCALNAMESPACEPATH><IPARAMVALUE NAME=\"ClassName\"><CLASSNAME NAME=\"&x;\"/></IPARAMVALUE></IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>";
    let r = post(&s, "GetClass", xxe);
    assert_eq!(
        (r.status, r.header("CIMError")),
        (400, Some("request-not-well-formed"))
    );
    assert!(!r.body.contains("root:"), "no file content leaks");
    let laughs = format!(
        "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\">{}]><CIM>&lol9;</CIM>",
        (1..10)
            .map(|i| format!(
                "<!ENTITY lol{i} \"{}\">",
                format!("&lol{};", i - 1).repeat(10)
            ))
            .collect::<String>()
    );
    let r = post(&s, "GetClass", &laughs);
    assert_eq!(
        (r.status, r.header("CIMError")),
        (400, Some("request-not-well-formed"))
    );
    // An undeclared entity reference without a DTD.
    let r = post(
        &s,
        "GetClass",
        &intrinsic("GetClass", "root/cimv2", &class_param("&undeclared;")),
    );
    assert_eq!(
        (r.status, r.header("CIMError")),
        (400, Some("request-not-well-formed"))
    );
}

#[test]
fn oversize_bodies_are_refused_before_they_are_read() {
    let s = TestServer::fake(1);
    let big = vec![b'x'; 5 << 20];
    let r = post(&s, "GetClass", std::str::from_utf8(&big).unwrap());
    assert_eq!(r.status, 413);
    // Without a Content-Length (chunked), the limit still holds.
    let mut stream = TcpStream::connect(addr(&s)).unwrap();
    let a = auth(&s);
    let head = format!("POST /cimom HTTP/1.1\r\nHost: x\r\nAuthorization: {a}\r\nCIMOperation: MethodCall\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b'y'; 1 << 20];
    for _ in 0..6 {
        if stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .is_err()
            || stream.write_all(&chunk).is_err()
            || stream.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    assert_eq!(parse(&raw).status, 413);
}

#[test]
fn huge_names_and_queries_inside_an_allowed_body() {
    let s = TestServer::fake(2);
    let name = "C".repeat(3 << 20);
    let r = post(
        &s,
        "EnumerateInstances",
        &intrinsic("EnumerateInstances", "root/cimv2", &class_param(&name)),
    );
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("ERROR CODE=\"4\""),
        "a 3 MB class name is an invalid parameter"
    );
    let ns_body = intrinsic(
        "EnumerateInstances",
        &"n".repeat(2 << 20),
        &class_param("CIM_ComputerSystem"),
    );
    let r = post(&s, "EnumerateInstances", &ns_body);
    assert!(r.status == 400 || r.body.contains("ERROR CODE=\"4\""));
    let exec = |query: &str| {
        let params = format!(
            "<IPARAMVALUE NAME=\"QueryLanguage\"><VALUE>WQL</VALUE></IPARAMVALUE><IPARAMVALUE NAME=\"Query\"><VALUE>{query}</VALUE></IPARAMVALUE>"
        );
        post(
            &s,
            "ExecQuery",
            &intrinsic("ExecQuery", "root/cimv2", &params),
        )
    };
    let long_string = format!(
        "SELECT * FROM CIM_ComputerSystem WHERE Name = '{}'",
        "a".repeat(3 << 20)
    );
    let r = exec(&long_string);
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("<IRETURNVALUE>"),
        "a 3 MB literal is just a value that matches nothing"
    );
    let long_like = format!(
        "SELECT * FROM CIM_ComputerSystem WHERE Name LIKE '{}'",
        "%a".repeat(1 << 20)
    );
    assert_eq!(exec(&long_like).status, 200);
    let parens = format!(
        "SELECT * FROM CIM_ComputerSystem WHERE {}Name = 'x'{}",
        "(".repeat(1 << 20),
        ")".repeat(1 << 20)
    );
    assert!(exec(&parens).body.contains("ERROR CODE=\"15\""));
    let many = format!(
        "SELECT * FROM CIM_ComputerSystem WHERE {}",
        vec!["Name = 'x'"; 100_000].join(" OR ")
    );
    assert!(exec(&many).body.contains("ERROR CODE=\"15\""));
    let deep_xml = format!("{}{}", "<A>".repeat(100_000), "</A>".repeat(100_000));
    let r = post(&s, "GetClass", &deep_xml);
    assert_eq!(r.status, 400);
    assert_eq!(
        post(&s, "EnumerateInstanceNames", &computer_system_names()).status,
        200
    );
}

#[test]
fn cim_errors_in_the_body() {
    let s = TestServer::fake(1);
    let a = auth(&s);
    let mut h = cim_headers(&a, "EnumerateInstances");
    h[4] = ("CIMObject", "root%2Fnowhere");
    let body = intrinsic(
        "EnumerateInstances",
        "root/nowhere",
        &class_param("CIM_ComputerSystem"),
    );
    let r = send(addr(&s), "POST", "/cimom", &h, body.as_bytes());
    assert!(r.body.contains("ERROR CODE=\"3\""), "{}", r.body);
    let r = post(
        &s,
        "EnumerateInstances",
        &intrinsic(
            "EnumerateInstances",
            "root/cimv2",
            &class_param("CIM_Nothing"),
        ),
    );
    assert!(r.body.contains("ERROR CODE=\"5\""));
    assert!(r
        .body
        .contains("DESCRIPTION=\"no class named CIM_Nothing\""));
    let r = post(
        &s,
        "FrobnicateInstances",
        &intrinsic("FrobnicateInstances", "root/cimv2", ""),
    );
    assert!(r.body.contains("ERROR CODE=\"7\""));
    let call = "<?xml version=\"1.0\"?><CIM CIMVERSION=\"2.0\" DTDVERSION=\"2.0\"><MESSAGE ID=\"9\" PROTOCOLVERSION=\"1.0\"><SIMPLEREQ><METHODCALL NAME=\"Explode\"><LOCALINSTANCEPATH><LOCALNAMESPACEPATH><NAMESPACE NAME=\"root\"/><NAMESPACE NAME=\"cimv2\"/></LOCALNAMESPACEPATH><INSTANCENAME CLASSNAME=\"LKS_VirtualComputerSystem\"><KEYBINDING NAME=\"CreationClassName\"><KEYVALUE>LKS_VirtualComputerSystem</KEYVALUE></KEYBINDING><KEYBINDING NAME=\"Name\"><KEYVALUE>vm000</KEYVALUE></KEYBINDING></INSTANCENAME></LOCALINSTANCEPATH></METHODCALL></SIMPLEREQ></MESSAGE></CIM>";
    let mut h = cim_headers(&a, "Explode");
    h.pop();
    let r = send(addr(&s), "POST", "/cimom", &h, call.as_bytes());
    assert!(
        r.body
            .contains("<METHODRESPONSE NAME=\"Explode\"><ERROR CODE=\"17\""),
        "{}",
        r.body
    );
}

#[test]
fn authentication_is_required_and_failures_are_slowed() {
    let s = TestServer::fake(1);
    let body = computer_system_names();
    let mut h = cim_headers("", "EnumerateInstanceNames");
    h.remove(0);
    let r = send(addr(&s), "POST", "/cimom", &h, body.as_bytes());
    assert_eq!(r.status, 401);
    assert!(r.header("WWW-Authenticate").unwrap().starts_with("Basic"));
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:guess")
    );
    let start = Instant::now();
    for _ in 0..6 {
        let r = send(
            addr(&s),
            "POST",
            "/cimom",
            &cim_headers(&wrong, "EnumerateInstanceNames"),
            body.as_bytes(),
        );
        assert_eq!(r.status, 401);
    }
    // Six failures in a row are spaced 0.25, 0.5, 0.75, 1 and 1.25 s apart at least.
    assert!(
        start.elapsed() >= Duration::from_millis(3500),
        "failed logins were not slowed: {:?}",
        start.elapsed()
    );
    // The right password still works (after its wait).
    assert_eq!(post(&s, "EnumerateInstanceNames", &body).status, 200);
}

#[test]
fn stalled_clients_do_not_hold_up_the_others() {
    let s = TestServer::fake(2);
    let mut stalled = Vec::new();
    // From another address than the client below (each address may hold 32 connections).
    for _ in 0..31 {
        let mut c = connect_from(loopback(0, 0, 2), addr(&s)).unwrap();
        c.write_all(b"POST /cimom HTTP/1.1\r\nHost: x\r\nContent-Le")
            .unwrap();
        stalled.push(c);
    }
    let a = auth(&s);
    let mut slow_body = TcpStream::connect(addr(&s)).unwrap();
    slow_body
        .write_all(format!("POST /cimom HTTP/1.1\r\nHost: x\r\nAuthorization: {a}\r\nCIMOperation: MethodCall\r\nContent-Length: 1000\r\n\r\n<CIM>").as_bytes())
        .unwrap();
    let body = computer_system_names();
    for _ in 0..5 {
        assert_eq!(post(&s, "EnumerateInstanceNames", &body).status, 200);
    }
    drop(stalled);
}

#[test]
fn many_concurrent_clients_with_keep_alive() {
    // 48 connections from one address: more than the default cap allows.
    let s = TestServer::over(
        std::sync::Arc::new(lockstep_cim::fake_host::FakeHost::with_vms(10)),
        lockstep_cim::CimConfig {
            max_connections_per_address: 64,
            ..lockstep_cim::CimConfig::default()
        },
    );
    let a = auth(&s);
    let body = intrinsic(
        "EnumerateInstances",
        "root/cimv2",
        &class_param("CIM_ComputerSystem"),
    );
    let target = addr(&s);
    let threads: Vec<_> = (0..48)
        .map(|_| {
            let (a, body) = (a.clone(), body.clone());
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(target).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut ok = 0;
                for _ in 0..20 {
                    let req = format!(
                        "POST /cimom HTTP/1.1\r\nHost: x\r\nAuthorization: {a}\r\nCIMOperation: MethodCall\r\nCIMMethod: EnumerateInstances\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(req.as_bytes()).unwrap();
                    if read_one_reply(&mut stream) == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 48 * 20);
}

/// Reads one HTTP reply with a Content-Length from a keep-alive connection; returns its status.
fn read_one_reply(stream: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            return 0;
        }
        buf.push(byte[0]);
    }
    let head = parse(&buf);
    let len: usize = head
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if stream.read_exact(&mut body).is_err() {
        return 0;
    }
    head.status
}

#[test]
fn the_https_port_survives_garbage() {
    let s = TestServer::fake(1);
    let https = s.server.as_ref().unwrap().https_addr().unwrap();
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
        &[0u8; 4096][..],
    ] {
        let mut c = TcpStream::connect(https).unwrap();
        let _ = c.write_all(junk);
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    }
    // A real TLS client still gets through (curl, when installed).
    let curl = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(s.https.ca_cert.as_ref().unwrap())
        .args(["-u", &format!("{}:{}", s.https.user, s.https.password)])
        .args([
            "-H",
            "CIMOperation: MethodCall",
            "-H",
            "CIMMethod: EnumerateInstanceNames",
            "--data-binary",
        ])
        .arg(computer_system_names())
        .arg(format!("https://localhost:{}/cimom", https.port()))
        .output();
    if let Ok(out) = curl {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    }
}
