//! Raw HTTP clients for the endpoint's abuse tests: sockets bound to a chosen loopback source
//! address (every 127.x.y.z is local on Linux, so one machine plays many clients), CIM requests
//! by hand, and the availability scenario shared by the crate's tests and the real-host tests:
//! hundreds of idle and slow connections from one address and a flood of bad logins, while
//! valid clients time their answers.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;

/// A TCP connection to `to` from the local address `from`.
pub fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(to);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(stream)
}

/// `127.a.b.c`.
pub fn loopback(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// An `Authorization: Basic` value.
pub fn basic(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

/// The body of an EnumerateInstanceNames of CIM_ComputerSystem in root/cimv2.
pub fn enumerate_body() -> String {
    "<?xml version=\"1.0\" encoding=\"utf-8\" ?><CIM CIMVERSION=\"2.0\" DTDVERSION=\"2.0\"><MESSAGE ID=\"7\" PROTOCOLVERSION=\"1.0\"><SIMPLEREQ><IMETHODCALL NAME=\"EnumerateInstanceNames\"><LOCALNAMESPACEPATH><NAMESPACE NAME=\"root\"/><NAMESPACE NAME=\"cimv2\"/></LOCALNAMESPACEPATH><IPARAMVALUE NAME=\"ClassName\"><CLASSNAME NAME=\"CIM_ComputerSystem\"/></IPARAMVALUE></IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>".into()
}

/// The head of a CIM POST (keep-alive) with a body of `length` bytes.
pub fn request_head(authorization: Option<&str>, length: usize) -> String {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /cimom HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/xml; charset=\"utf-8\"\r\nCIMOperation: MethodCall\r\nCIMMethod: EnumerateInstanceNames\r\nCIMObject: root%2Fcimv2\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// A whole EnumerateInstanceNames request.
pub fn enumerate_request(authorization: Option<&str>) -> Vec<u8> {
    let body = enumerate_body();
    let mut r = request_head(authorization, body.len()).into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

/// An HTTP reply.
#[derive(Debug)]
pub struct RawReply {
    /// Status code.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl RawReply {
    /// A header's value, by name in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one reply framed by its Content-Length (over TCP, or TLS over it).
pub fn read_reply(stream: &mut impl Read) -> std::io::Result<RawReply> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut reply = RawReply {
        status,
        headers,
        body: Vec::new(),
    };
    let length: usize = reply
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    reply.body = vec![0u8; length];
    stream.read_exact(&mut reply.body)?;
    Ok(reply)
}

/// Sends `request` on a new connection from `from` and reads the reply; with the time from
/// connecting to the end of the reply.
pub fn exchange(
    from: IpAddr,
    to: SocketAddr,
    request: &[u8],
) -> std::io::Result<(RawReply, Duration)> {
    let start = Instant::now();
    let mut stream = connect_from(from, to)?;
    stream.write_all(request)?;
    let reply = read_reply(&mut stream)?;
    Ok((reply, start.elapsed()))
}

/// Waits up to `within` for the server to close `stream` (end of file or reset), discarding
/// what it sends; `false` if it is still open then.
pub fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Whether the server still holds `stream` open (nothing to read, no end of file).
pub fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let open =
        matches!(stream.peek(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    let _ = stream.set_nonblocking(false);
    open
}

/// The abuse: its sizes.
#[derive(Debug, Clone)]
pub struct Abuse {
    /// Connections opened from `127.0.0.2` that send nothing...
    pub idle: usize,
    /// ...and that trickle their request headers a byte a second.
    pub slow: usize,
    /// Bad-password requests (each with another password) kept in flight, one per thread,
    /// from `127.0.1.2` to `127.0.1.51`.
    pub bad_logins: usize,
    /// Answers each valid client times.
    pub valid_requests: usize,
}

impl Abuse {
    /// Issue #11's figure: hundreds of idle or slow connections from one address and a flood
    /// of bad logins.
    pub const ISSUE_FIGURE: Abuse = Abuse {
        idle: 150,
        slow: 150,
        bad_logins: 200,
        valid_requests: 5,
    };
}

/// What the abuse scenario measured.
#[derive(Debug, Default)]
pub struct Figures {
    /// Idle and slow connections the server still held open during the flood.
    pub abusive_held: usize,
    /// Idle and slow connections refused (503 or closed) at once.
    pub abusive_refused: usize,
    /// Bad logins answered during the valid requests, by status: 401, 503, other.
    pub flood_401: usize,
    /// See `flood_401`.
    pub flood_503: usize,
    /// See `flood_401`.
    pub flood_other: usize,
    /// Statuses and times of a valid client at `127.0.0.1` logging in afresh during the flood
    /// (the first request checks the password; the rest, on new connections, are cached).
    pub fresh: Vec<(u16, Duration)>,
    /// The same for a valid client inside the flood's own subnet (`127.0.1.250`) that logged
    /// in once before the flood.
    pub neighbour: Vec<(u16, Duration)>,
}

impl Figures {
    /// The slowest valid answer.
    pub fn slowest(&self) -> Duration {
        self.fresh
            .iter()
            .chain(&self.neighbour)
            .map(|(_, t)| *t)
            .max()
            .unwrap_or_default()
    }

    /// Whether every valid request was answered 200.
    pub fn all_valid_ok(&self) -> bool {
        let n = self.fresh.len() + self.neighbour.len();
        n > 0
            && self
                .fresh
                .iter()
                .chain(&self.neighbour)
                .all(|(s, _)| *s == 200)
    }
}

/// Runs the availability scenario against the endpoint at `to`: valid clients send
/// `authorization`; the flood logs in as `admin` with a wrong password.
pub fn availability_under_abuse(to: SocketAddr, authorization: &str, abuse: &Abuse) -> Figures {
    let mut figures = Figures::default();
    let valid = enumerate_request(Some(authorization));
    // The neighbour logs in before anything starts: its credentials are then cached.
    let neighbour = loopback(0, 1, 250);
    let _ = exchange(neighbour, to, &valid);

    // Idle and slow connections from one address.
    let mut abusive = Vec::new();
    for i in 0..abuse.idle + abuse.slow {
        let Ok(mut c) = connect_from(loopback(0, 0, 2), to) else {
            continue;
        };
        if i >= abuse.idle {
            let _ = c.write_all(b"POST /cimom HTTP/1.1\r\nHost: x\r\n");
        }
        abusive.push(c);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<TcpStream> = abusive[abuse.idle.min(abusive.len())..]
        .iter()
        .filter_map(|c| c.try_clone().ok())
        .collect();
    let trickle = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut slow = slow;
            while !stop.load(Ordering::Relaxed) {
                for c in &mut slow {
                    let _ = c.write_all(b"X");
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    // The flood: bad passwords, each thread keeping one request in flight.
    let counts: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let counting = Arc::new(AtomicBool::new(false));
    let flood: Vec<_> = (0..abuse.bad_logins)
        .map(|i| {
            let (stop, counts, counting) = (
                Arc::clone(&stop),
                Arc::clone(&counts),
                Arc::clone(&counting),
            );
            let from = loopback(0, 1, 2 + (i % 50) as u8);
            std::thread::spawn(move || {
                let mut conn: Option<TcpStream> = None;
                let mut guess = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // A new password each time, as a guesser would.
                    guess += 1;
                    let bad =
                        enumerate_request(Some(&basic("admin", &format!("guess-{i}-{guess}"))));
                    let c = match conn.take() {
                        Some(c) => c,
                        None => match connect_from(from, to) {
                            Ok(c) => {
                                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                                c
                            }
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                        },
                    };
                    let mut c = c;
                    if c.write_all(&bad).is_err() {
                        continue;
                    }
                    let Ok(reply) = read_reply(&mut c) else {
                        continue;
                    };
                    if counting.load(Ordering::Relaxed) {
                        let slot = match reply.status {
                            401 => 0,
                            503 => 1,
                            _ => 2,
                        };
                        counts[slot].fetch_add(1, Ordering::Relaxed);
                    }
                    if reply.header("Connection") != Some("close") {
                        conn = Some(c);
                    }
                }
            })
        })
        .collect();
    // Let the flood get going, then time the valid clients.
    std::thread::sleep(Duration::from_millis(500));
    counting.store(true, Ordering::Relaxed);
    for _ in 0..abuse.valid_requests {
        let timed = |from: IpAddr| match exchange(from, to, &valid) {
            Ok((reply, took)) => (reply.status, took),
            Err(_) => (0, Duration::MAX),
        };
        figures.fresh.push(timed(loopback(0, 0, 1)));
        figures.neighbour.push(timed(neighbour));
    }
    counting.store(false, Ordering::Relaxed);
    figures.flood_401 = counts[0].load(Ordering::Relaxed);
    figures.flood_503 = counts[1].load(Ordering::Relaxed);
    figures.flood_other = counts[2].load(Ordering::Relaxed);
    figures.abusive_held = abusive.iter().filter(|c| still_open(c)).count();
    figures.abusive_refused = abuse.idle + abuse.slow - figures.abusive_held;
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        let _ = t.join();
    }
    let _ = trickle.join();
    figures
}
