//! The endpoint's connections: which are let in (a cap on all connections and one per source
//! address), the deadlines each must meet (TLS handshake and request headers, idle keep-alive,
//! requests in flight; the body's is in `http.rs`), and how they end: when the client may still
//! be sending a body that was answered without being read (413, 401, ...), the response is
//! followed by a lingering close, as Apache and nginx do, so that the client's kernel does not
//! answer our close with a reset that throws the response away before the client reads it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::http::{respond, Reply, Shared};

/// A request in flight (or the reading of its response) that takes longer is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// A connection asked to close gracefully (idle, or the server stopping) gets this long to
/// finish the response it is sending.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// A lingering close reads and discards for at most this long in all...
const LINGER_TIME: Duration = Duration::from_secs(5);
/// ...stops when the client sends nothing for this long...
const LINGER_READ: Duration = Duration::from_secs(2);
/// ...and after this many bytes.
const LINGER_BYTES: usize = 64 << 20;
/// Refused connections are logged at most this often.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);
/// What a plain HTTP client over the caps is told, without reading its request.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// The deadlines of the config's `timeouts`.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// A request's headers (and a TLS handshake).
    pub header: Duration,
    /// A request's body, once its headers are in.
    pub body: Duration,
    /// A keep-alive connection between requests.
    pub idle: Duration,
}

impl Deadlines {
    /// How often each connection looks at its deadlines: often enough to keep them within a
    /// quarter of the shortest, at most once a second.
    fn tick(&self) -> Duration {
        (self.header.min(self.idle) / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// How connections from one source are counted: an IPv4 address, or an IPv6 /64 (one host
/// has a whole /64 to pick addresses from).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !0u128 << 64)),
        v4 => v4,
    }
}

struct Open {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    refused: u64,
    last_logged: Option<Instant>,
}

/// The connection caps.
pub struct Admission {
    max_total: usize,
    max_per_source: usize,
    open: Mutex<Open>,
}

/// A connection let in; dropping it gives its place back.
pub struct Pass {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.per_source.remove(&self.source);
            }
        }
    }
}

impl Admission {
    /// At most `max_total` connections, and `max_per_source` from one source.
    pub fn new(max_total: usize, max_per_source: usize) -> Admission {
        Admission {
            max_total,
            max_per_source,
            open: Mutex::new(Open {
                total: 0,
                per_source: HashMap::new(),
                refused: 0,
                last_logged: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a connection from `ip` in, or refuses it (and says so in the log, now and then).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Pass> {
        let source = source_of(ip);
        let mut open = self.lock();
        let from_source = open.per_source.get(&source).copied().unwrap_or(0);
        if open.total >= self.max_total || from_source >= self.max_per_source {
            open.refused += 1;
            if open
                .last_logged
                .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_PERIOD)
            {
                log::warn!(
                    "cim: refusing connections: {} open, {from_source} from {ip} (caps {} and {} per address); {} refused since the last report",
                    open.total,
                    self.max_total,
                    self.max_per_source,
                    open.refused
                );
                open.refused = 0;
                open.last_logged = Some(Instant::now());
            }
            return None;
        }
        open.total += 1;
        *open.per_source.entry(source).or_insert(0) += 1;
        Some(Pass {
            admission: Arc::clone(self),
            source,
        })
    }
}

/// Milliseconds value meaning "no request being received".
const NOT_READING: u64 = u64::MAX;

/// What a connection is doing, for its deadlines. Everything here is touched from the
/// connection's own task only; atomics make it shareable with the service.
pub struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` at the last request start or end.
    last: AtomicU64,
    /// Milliseconds since `epoch` at the first byte of the request being received (the
    /// connection's start for its first request), or `NOT_READING` between requests.
    reading_since: AtomicU64,
    /// The request was answered without its body having been read to the end.
    body_unread: AtomicBool,
}

/// A request being served; dropping it marks the connection idle.
pub struct InFlight<'a>(&'a Activity);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

enum Overdue {
    Headers,
    Idle,
    Request,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            reading_since: AtomicU64::new(0),
            body_unread: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A request's headers are in: it is served until the guard is dropped. `body_pending`:
    /// whether it has a body still to read.
    pub fn start_request(&self, body_pending: bool) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.reading_since.store(NOT_READING, Ordering::Relaxed);
        self.body_unread.store(body_pending, Ordering::Relaxed);
        self.touch();
        InFlight(self)
    }

    /// Whether the body was read to the end (or the client is to be dropped without lingering).
    pub fn set_body_unread(&self, unread: bool) {
        self.body_unread.store(unread, Ordering::Relaxed);
    }

    fn saw_bytes(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.reading_since.load(Ordering::Relaxed) == NOT_READING
        {
            self.reading_since.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn overdue(&self, deadlines: &Deadlines) -> Option<Overdue> {
        let now = self.now_ms();
        let since = |ms: u64| Duration::from_millis(now.saturating_sub(ms));
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return (since(self.last.load(Ordering::Relaxed)) > REQUEST_TIMEOUT)
                .then_some(Overdue::Request);
        }
        let reading = self.reading_since.load(Ordering::Relaxed);
        if reading != NOT_READING {
            return (since(reading) > deadlines.header).then_some(Overdue::Headers);
        }
        (since(self.last.load(Ordering::Relaxed)) > deadlines.idle).then_some(Overdue::Idle)
    }
}

/// The connection's stream, telling its activity when request bytes arrive.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.saw_bytes();
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection's stream: plain TCP or TLS over it.
trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The TCP stream underneath, for the lingering close's raw reads.
    fn into_tcp(self) -> TcpStream;
}

impl Transport for TcpStream {
    fn into_tcp(self) -> TcpStream {
        self
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn into_tcp(self) -> TcpStream {
        self.into_inner().0
    }
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Reply, Infallible>> + Send>>;

/// Serves HTTP/1.1 on one connection until the client leaves, misses a deadline, idles, or
/// the server stops.
async fn serve_connection<I: Transport>(
    io: I,
    peer: IpAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let deadlines = shared.deadlines;
    let activity = Arc::new(Activity::new());
    let act = Arc::clone(&activity);
    // Boxed so that the connection can be polled without shutting its stream down (below).
    let svc = service_fn(move |req| -> ServiceFuture {
        Box::pin(respond(req, peer, Arc::clone(&shared), Arc::clone(&act)))
    });
    let mut builder = http1::Builder::new();
    // Header deadlines are the watchdog's below: hyper's would also cut idle keep-alive time.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(256 * 1024);
    let tracked = Tracked {
        inner: io,
        activity: Arc::clone(&activity),
    };
    let mut conn = builder.serve_connection(TokioIo::new(tracked), svc);
    let mut watchdog = tokio::time::interval(deadlines.tick());
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing: Option<Instant> = None;
    let finished = loop {
        tokio::select! {
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break result,
            _ = watchdog.tick() => {
                match activity.overdue(&deadlines) {
                    Some(Overdue::Headers) => {
                        log::debug!("cim: {peer} was too slow to send its request headers");
                        return;
                    }
                    Some(Overdue::Request) => {
                        log::info!("cim: dropping a stalled connection from {peer}");
                        return;
                    }
                    Some(Overdue::Idle) if closing.is_none() => {
                        Pin::new(&mut conn).graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    _ => {}
                }
                if closing.is_some_and(|t| t.elapsed() > CLOSE_GRACE) {
                    return;
                }
            }
            _ = stop.changed(), if closing.is_none() => {
                Pin::new(&mut conn).graceful_shutdown();
                closing = Some(Instant::now());
            }
        }
    };
    if let Err(e) = finished {
        log::debug!("cim: connection from {peer}: {e}");
        return;
    }
    let io = conn.into_parts().io.into_inner().inner;
    if activity.body_unread.load(Ordering::Relaxed) {
        linger(io).await;
    } else {
        let _ = tokio::time::timeout(LINGER_READ, shutdown(io)).await;
    }
}

async fn shutdown<I: Transport>(mut io: I) {
    let _ = io.shutdown().await;
}

/// Closes a connection whose client may still be sending: ends our side (after the response,
/// already written), then reads and discards what comes until the client closes too, or for a
/// bounded time and size.
async fn linger<I: Transport>(mut io: I) {
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    if tokio::time::timeout(LINGER_READ, io.shutdown())
        .await
        .is_err()
    {
        return;
    }
    let mut tcp = io.into_tcp();
    let mut sink = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    while total < LINGER_BYTES {
        let read = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + LINGER_READ),
            tcp.read(&mut sink),
        );
        match read.await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => return,
        }
    }
}

/// Accepts connections on one listener until told to stop.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    log::warn!("cim: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let ip = peer_ip(peer);
        let Some(pass) = shared.admission.admit(ip) else {
            if tls.is_none() {
                // A fresh socket's send buffer is empty: this never blocks.
                let _ = stream.try_write(BUSY);
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let tls = tls.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _pass = pass;
            match tls {
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(shared.deadlines.header, handshake).await {
                        Ok(Ok(tls_stream)) => serve_connection(tls_stream, ip, shared, stop).await,
                        Ok(Err(e)) => log::debug!("cim: TLS handshake with {peer} failed: {e}"),
                        Err(_) => log::debug!("cim: TLS handshake with {peer} timed out"),
                    }
                }
                None => serve_connection(stream, ip, shared, stop).await,
            }
        });
    }
}

fn peer_ip(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_source_and_in_all() {
        let adm = Arc::new(Admission::new(3, 2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = adm.admit(a).unwrap();
        let _p2 = adm.admit(a).unwrap();
        assert!(adm.admit(a).is_none(), "a third from one address");
        let _p3 = adm.admit(b).unwrap();
        assert!(adm.admit(b).is_none(), "a fourth in all");
        drop(p1);
        let _p4 = adm.admit(a).unwrap();
        // One IPv6 /64 is one source.
        let adm = Arc::new(Admission::new(10, 1));
        let _v6 = adm.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert!(adm.admit("2001:db8::2".parse().unwrap()).is_none());
        assert!(adm.admit("2001:db8:0:1::2".parse().unwrap()).is_some());
    }
}
