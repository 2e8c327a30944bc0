//! A deliberately plain HTTP/1.1 client for tests: it writes literal request text to a socket and
//! parses the reply by hand, so the tests see exactly the bytes a curl user would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A parsed reply.
#[derive(Debug)]
pub(crate) struct RawReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    /// A header's value (names compare case-insensitively).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("reply body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Parses one complete reply (the connection was closed after it).
pub(crate) fn parse_reply(raw: &[u8]) -> RawReply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    } else if let Some((_, len)) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let len: usize = len.parse().unwrap();
        assert!(body.len() >= len, "short body");
        body.truncate(len);
    }
    RawReply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = std::str::from_utf8(&data[..eol]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Sends `request` (complete HTTP text) on a new connection and reads the reply to the end.
pub(crate) fn exchange_raw(socket: &Path, request: &[u8]) -> RawReply {
    let mut stream = UnixStream::connect(socket).unwrap();
    // The server may answer (413) and close before reading all of a large body.
    let _ = stream.write_all(request);
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A server that refuses a body without reading it all closes with data unread, and
        // the kernel then ends the stream with a reset after the reply.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => {}
        Err(e) => panic!("reading the reply: {e}"),
    }
    parse_reply(&raw)
}

/// Sends one request with an optional body (and its content type) and reads the reply.
pub(crate) fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> RawReply {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some((content_type, bytes)) = body {
        if !content_type.is_empty() {
            request.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n", bytes.len()));
        let mut raw = request.into_bytes();
        raw.extend_from_slice(bytes);
        return exchange_raw(socket, &raw);
    }
    request.push_str("\r\n");
    exchange_raw(socket, request.as_bytes())
}

/// Sends a JSON body.
pub(crate) fn send_json(socket: &Path, method: &str, path: &str, json: &str) -> RawReply {
    send(
        socket,
        method,
        path,
        Some(("application/json", json.as_bytes())),
    )
}

/// Turns a curl command line as Firecracker's documentation writes it (`curl --unix-socket S -i
/// -X PUT 'http://localhost/path' -H '...' -d '{...}'`) into the request curl sends.
pub(crate) fn curl_to_request(command: &str) -> Vec<u8> {
    let words = shell_words(command);
    let mut method = "GET".to_string();
    let mut url = String::new();
    let mut headers = Vec::new();
    let mut data: Option<String> = None;
    let mut i = 1;
    while i < words.len() {
        match words[i].as_str() {
            "-X" | "--request" => {
                method = words[i + 1].clone();
                i += 1;
            }
            "-H" | "--header" => {
                headers.push(words[i + 1].clone());
                i += 1;
            }
            "-d" | "--data" => {
                data = Some(words[i + 1].clone());
                i += 1;
            }
            "--unix-socket" => i += 1,
            "-i" | "-s" | "-f" => {}
            w if w.starts_with("http://") => url = w.to_string(),
            other => panic!("curl option {other:?} is not understood here"),
        }
        i += 1;
    }
    let path = url.trim_start_matches("http://localhost");
    let path = if path.is_empty() { "/" } else { path };
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.5.0\r\nConnection: close\r\n");
    for h in &headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    match data {
        Some(body) => {
            // curl sends literal -d data as given (it strips newlines only from @file data).
            text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        }
        None => text.push_str("\r\n"),
    }
    text.into_bytes()
}

/// Splits a shell command with single quotes and backslash-newline continuations.
pub(crate) fn shell_words(command: &str) -> Vec<String> {
    let command = command.replace("\\\n", " ");
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    current.push(q);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                current.push(c);
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

impl crate::openapi_check::Reply for RawReply {
    fn status(&self) -> u16 {
        self.status
    }

    fn header(&self, name: &str) -> Option<&str> {
        RawReply::header(self, name)
    }

    fn body(&self) -> &[u8] {
        &self.body
    }
}
