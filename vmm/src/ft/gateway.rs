//! A minimal HTTP/1.1 client for etcd's JSON gateway: one `POST` of a JSON body per connection,
//! on a std `TcpStream`. The server's answer is untrusted input: the whole exchange has one
//! deadline, the status line and headers and the body each have a size limit checked before
//! anything is kept, and the body must be JSON.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The most header bytes (status line included) accepted from the gateway.
pub const MAX_HEAD: usize = 16 * 1024;

/// What went wrong talking to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No endpoint accepted a connection.
    #[error("cannot connect to etcd at {endpoint}: {source}")]
    Connect {
        /// The last endpoint tried.
        endpoint: SocketAddr,
        /// Why the connection failed.
        #[source]
        source: std::io::Error,
    },
    /// The arbiter was given no endpoint at all.
    #[error("no etcd endpoint configured")]
    NoEndpoint,
    /// Sending the request or reading the answer failed.
    #[error("etcd at {endpoint}: {source}")]
    Io {
        /// The endpoint spoken to.
        endpoint: SocketAddr,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The answer did not come whole within the request's timeout.
    #[error("etcd at {endpoint} did not answer within {timeout:?}")]
    Timeout {
        /// The endpoint spoken to.
        endpoint: SocketAddr,
        /// The request's timeout.
        timeout: Duration,
    },
    /// The answer's headers or body were larger than allowed.
    #[error("etcd at {endpoint} sent more than {limit} bytes of {what}")]
    TooLarge {
        /// The endpoint spoken to.
        endpoint: SocketAddr,
        /// "headers" or "body".
        what: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// The answer is not well-formed HTTP/1.1.
    #[error("etcd at {endpoint} sent a malformed HTTP answer: {why}")]
    Malformed {
        /// The endpoint spoken to.
        endpoint: SocketAddr,
        /// What was wrong.
        why: String,
    },
    /// The gateway answered with a status other than 200.
    #[error("etcd at {endpoint} answered {status} to {path}: {message}")]
    Status {
        /// The endpoint spoken to.
        endpoint: SocketAddr,
        /// The request's path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body (at most 200 characters), for the operator.
        message: String,
    },
    /// The body is not JSON.
    #[error("etcd at {endpoint} sent a body that is not JSON: {source}")]
    Json {
        /// The endpoint spoken to.
        endpoint: SocketAddr,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// Where the gateway is and how long and large its answers may be.
#[derive(Clone, Debug)]
pub struct Gateway {
    endpoints: Vec<SocketAddr>,
    timeout: Duration,
    max_body: usize,
}

impl Gateway {
    /// A gateway on `endpoints` (tried in order until one accepts the connection); each request
    /// must be answered whole within `timeout`, with a body of at most `max_body` bytes.
    pub fn new(endpoints: Vec<SocketAddr>, timeout: Duration, max_body: usize) -> Self {
        Self {
            endpoints,
            timeout,
            max_body,
        }
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POSTs `body` to `path` and returns the answer's JSON. Only a failed connection moves on
    /// to the next endpoint: once a request is sent it is never sent again, so a write is never
    /// applied twice by this client.
    pub fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, GatewayError> {
        let deadline = Instant::now() + self.timeout;
        let mut last = GatewayError::NoEndpoint;
        for &endpoint in &self.endpoints {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GatewayError::Timeout {
                    endpoint,
                    timeout: self.timeout,
                });
            }
            match TcpStream::connect_timeout(&endpoint, left) {
                Ok(stream) => return self.exchange(stream, endpoint, path, body, deadline),
                Err(source) => last = GatewayError::Connect { endpoint, source },
            }
        }
        Err(last)
    }

    fn exchange(
        &self,
        mut stream: TcpStream,
        endpoint: SocketAddr,
        path: &str,
        body: &serde_json::Value,
        deadline: Instant,
    ) -> Result<serde_json::Value, GatewayError> {
        let io = |source| GatewayError::Io { endpoint, source };
        let payload = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
            payload.len()
        );
        stream
            .set_write_timeout(Some(self.left(deadline, endpoint)?))
            .map_err(io)?;
        stream.write_all(request.as_bytes()).map_err(|e| {
            if is_timeout(&e) {
                self.timed_out(endpoint)
            } else {
                io(e)
            }
        })?;
        let mut reader = Reader {
            stream,
            endpoint,
            deadline,
            gateway: self,
            buf: Vec::new(),
            eof: false,
        };
        let head = reader.head()?;
        let (status, length, chunked) = parse_head(&head, endpoint)?;
        let raw = if chunked {
            reader.chunked_body(self.max_body)?
        } else if let Some(length) = length {
            if length > self.max_body {
                return Err(GatewayError::TooLarge {
                    endpoint,
                    what: "body",
                    limit: self.max_body,
                });
            }
            reader.exact(length)?
        } else {
            reader.until_closed(self.max_body)?
        };
        if status != 200 {
            let text = String::from_utf8_lossy(&raw);
            return Err(GatewayError::Status {
                endpoint,
                path: path.to_string(),
                status,
                message: text.chars().take(200).collect(),
            });
        }
        serde_json::from_slice(&raw).map_err(|source| GatewayError::Json { endpoint, source })
    }

    fn left(&self, deadline: Instant, endpoint: SocketAddr) -> Result<Duration, GatewayError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.timed_out(endpoint))
        } else {
            Ok(left)
        }
    }

    fn timed_out(&self, endpoint: SocketAddr) -> GatewayError {
        GatewayError::Timeout {
            endpoint,
            timeout: self.timeout,
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The answer's bytes as they arrive, each read bounded by what is left of the deadline.
struct Reader<'a> {
    stream: TcpStream,
    endpoint: SocketAddr,
    deadline: Instant,
    gateway: &'a Gateway,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
    eof: bool,
}

impl Reader<'_> {
    /// Reads more bytes into `buf`, at most `room` of them; false at the end of the stream.
    fn fill(&mut self, room: usize) -> Result<bool, GatewayError> {
        if self.eof {
            return Ok(false);
        }
        let left = self.gateway.left(self.deadline, self.endpoint)?;
        let endpoint = self.endpoint;
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|source| GatewayError::Io { endpoint, source })?;
        let mut chunk = [0u8; 4096];
        let want = room.clamp(1, chunk.len());
        match self.stream.read(&mut chunk[..want]) {
            Ok(0) => {
                self.eof = true;
                Ok(false)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(true),
            Err(e) if is_timeout(&e) => Err(self.gateway.timed_out(endpoint)),
            Err(source) => Err(GatewayError::Io { endpoint, source }),
        }
    }

    fn too_large(&self, what: &'static str, limit: usize) -> GatewayError {
        GatewayError::TooLarge {
            endpoint: self.endpoint,
            what,
            limit,
        }
    }

    fn malformed(&self, why: impl Into<String>) -> GatewayError {
        GatewayError::Malformed {
            endpoint: self.endpoint,
            why: why.into(),
        }
    }

    /// The status line and headers, up to the blank line (which is consumed).
    fn head(&mut self) -> Result<String, GatewayError> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return String::from_utf8(head).map_err(|_| self.malformed("headers not UTF-8"));
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(self.too_large("headers", MAX_HEAD));
            }
            if !self.fill(MAX_HEAD - self.buf.len())? {
                return Err(self.malformed("connection closed before the headers ended"));
            }
        }
    }

    /// Exactly `n` more bytes (the caller has checked `n` against the limit).
    fn exact(&mut self, n: usize) -> Result<Vec<u8>, GatewayError> {
        while self.buf.len() < n {
            if !self.fill(n - self.buf.len())? {
                return Err(self.malformed("connection closed before the body ended"));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Everything up to the end of the stream, at most `limit` bytes.
    fn until_closed(&mut self, limit: usize) -> Result<Vec<u8>, GatewayError> {
        while self.fill(limit + 1 - self.buf.len().min(limit))? {
            if self.buf.len() > limit {
                return Err(self.too_large("body", limit));
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }

    /// One CRLF-terminated line (without the CRLF), at most 1 KiB.
    fn line(&mut self) -> Result<String, GatewayError> {
        const MAX_LINE: usize = 1024;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).take(end).collect();
                return String::from_utf8(line).map_err(|_| self.malformed("chunk line not UTF-8"));
            }
            if self.buf.len() > MAX_LINE {
                return Err(self.malformed("chunk line too long"));
            }
            if !self.fill(MAX_LINE + 2 - self.buf.len().min(MAX_LINE))? {
                return Err(self.malformed("connection closed inside a chunk line"));
            }
        }
    }

    /// A `Transfer-Encoding: chunked` body, at most `limit` bytes once put together. A stream
    /// of several JSON messages (lease keep-alive) keeps only the first chunk's message: the
    /// gateway writes each message as one chunk.
    fn chunked_body(&mut self, limit: usize) -> Result<Vec<u8>, GatewayError> {
        let mut body = Vec::new();
        loop {
            let line = self.line()?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| self.malformed(format!("bad chunk size {size:?}")))?;
            if size == 0 {
                return Ok(body);
            }
            if size > limit - body.len() {
                return Err(self.too_large("body", limit));
            }
            let chunk = self.exact(size)?;
            body.extend_from_slice(&chunk);
            if self.exact(2)? != b"\r\n" {
                return Err(self.malformed("chunk not followed by CRLF"));
            }
            if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
                return Ok(body);
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The status, the Content-Length if any and whether the body is chunked.
fn parse_head(
    head: &str,
    endpoint: SocketAddr,
) -> Result<(u16, Option<usize>, bool), GatewayError> {
    let malformed = |why: String| GatewayError::Malformed { endpoint, why };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(malformed(format!("bad status line {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| malformed(format!("bad status line {status_line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(malformed(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| malformed(format!("bad Content-Length {value:?}")))?;
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
            if !chunked {
                return Err(malformed(format!(
                    "unsupported Transfer-Encoding {value:?}"
                )));
            }
        }
    }
    Ok((status, length, chunked))
}
