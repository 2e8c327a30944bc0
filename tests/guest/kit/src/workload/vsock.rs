//! vsock stream connections (virtio 1.2 section 5.10.6) and the `vsock ...` commands: connect to a
//! host port and print what comes back, or listen on a port and echo. Credit accounting: every
//! packet carries our receive buffer (`buf_alloc`) and the bytes we consumed (`fwd_cnt`); data is
//! sent only while the peer's advertised space, `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`, allows,
//! asking with CREDIT_REQUEST when it is exhausted; a CREDIT_UPDATE goes out when we consumed half
//! our buffer since the peer last heard, or when asked.

use core::sync::atomic::{AtomicU32, Ordering};

use super::pattern::Fnv;
use super::{error, key_pressed, usage, Args, Machine};
use crate::boot::Printable;
use crate::report;
use crate::time::Deadline;
use crate::virtio::vsock::{
    op, Header, Packet, Vsock, DATA_MAX, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::virtio::Waiter;

/// Our receive buffer per connection (also the echo buffer of `vsock listen`).
const BUF_ALLOC: u32 = 256 * 1024;
const CONNECT_TIMEOUT_MS: u64 = 3000;
/// `vsock connect` stops reading after this long without a packet.
const IDLE_MS: u64 = 2000;
/// How long closing waits for the peer's RST, and sending for credit.
const CLOSE_WAIT_MS: u64 = 2000;
const DEFAULT_LISTEN_SECONDS: u64 = 30;
/// Bytes of received text `vsock connect` prints.
const SHOW_MAX: usize = 512;

static NEXT_PORT: AtomicU32 = AtomicU32::new(49152);

/// One stream connection's state.
struct Conn {
    cid: u64,
    local_port: u32,
    peer_cid: u64,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_sent: u32,
    peer_shutdown: u32,
    reset: bool,
    received: u64,
    sent: u64,
    fnv: Fnv,
}

impl Conn {
    fn new(cid: u64, local_port: u32, peer_cid: u64, peer_port: u32) -> Self {
        Conn {
            cid,
            local_port,
            peer_cid,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            peer_shutdown: 0,
            reset: false,
            received: 0,
            sent: 0,
            fnv: Fnv::new(),
        }
    }

    fn header(&self, operation: u16, flags: u32) -> Header {
        Header {
            src_cid: self.cid,
            dst_cid: self.peer_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op: operation,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn matches(&self, header: &Header) -> bool {
        header.src_cid == self.peer_cid
            && header.src_port == self.peer_port
            && header.dst_port == self.local_port
    }

    /// Bytes the peer can take now.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn send(&mut self, vsock: &mut Vsock, operation: u16, flags: u32, data: &[u8]) -> bool {
        let header = self.header(operation, flags);
        self.last_fwd_sent = self.fwd_cnt;
        vsock.send(&header, data, &Waiter::new(CLOSE_WAIT_MS))
    }

    /// Handles one packet of this connection; RW data goes to `sink`, which returns whether the
    /// bytes count as consumed now (else the caller advances `fwd_cnt` when it consumes them).
    fn handle(&mut self, vsock: &mut Vsock, packet: &Packet, sink: &mut impl FnMut(&[u8]) -> bool) {
        let header = &packet.header;
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
        match header.op {
            op::RW => {
                let data = packet.data();
                self.received += data.len() as u64;
                self.fnv.update(data);
                if sink(data) {
                    self.consumed(vsock, data.len() as u32);
                }
            }
            op::CREDIT_REQUEST => {
                self.send(vsock, op::CREDIT_UPDATE, 0, &[]);
            }
            op::SHUTDOWN => self.peer_shutdown |= header.flags,
            op::RST => self.reset = true,
            _ => {}
        }
    }

    /// Counts `len` bytes as consumed and tells the peer when half our buffer was freed unseen.
    fn consumed(&mut self, vsock: &mut Vsock, len: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(len);
        if self.fwd_cnt.wrapping_sub(self.last_fwd_sent) >= BUF_ALLOC / 2 {
            self.send(vsock, op::CREDIT_UPDATE, 0, &[]);
        }
    }
}

/// Answers a packet that belongs to no connection with RST (unless it is one).
fn refuse(vsock: &mut Vsock, header: &Header) {
    if header.op == op::RST {
        return;
    }
    let reply = Header {
        src_cid: header.dst_cid,
        dst_cid: header.src_cid,
        src_port: header.dst_port,
        dst_port: header.src_port,
        kind: header.kind,
        op: op::RST,
        ..Header::default()
    };
    vsock.send(&reply, &[], &Waiter::new(CLOSE_WAIT_MS));
}

/// Receives and handles packets for `conn` until `done` or the waiter expires; others are refused.
fn pump(
    vsock: &mut Vsock,
    conn: &mut Conn,
    waiter: &Waiter,
    sink: &mut impl FnMut(&[u8]) -> bool,
    done: impl Fn(&Conn) -> bool,
) -> bool {
    loop {
        while let Some(packet) = vsock.recv() {
            if conn.matches(&packet.header) {
                conn.handle(vsock, &packet, sink);
            } else {
                refuse(vsock, &packet.header);
            }
            vsock.recycle(packet);
        }
        if done(conn) {
            return true;
        }
        if !vsock.wait_rx(waiter) {
            return done(conn);
        }
    }
}

/// Sends `data` as RW packets within the peer's credit (asking for more when it runs out).
fn send_stream(
    vsock: &mut Vsock,
    conn: &mut Conn,
    mut data: &[u8],
    sink: &mut impl FnMut(&[u8]) -> bool,
) -> bool {
    while !data.is_empty() {
        if conn.reset || conn.peer_shutdown & SHUTDOWN_RCV != 0 {
            return false;
        }
        let chunk = data.len().min(DATA_MAX).min(conn.credit() as usize);
        if chunk == 0 {
            conn.send(vsock, op::CREDIT_REQUEST, 0, &[]);
            let waiter = Waiter::new(CLOSE_WAIT_MS);
            if !pump(vsock, conn, &waiter, sink, |c| c.credit() > 0 || c.reset) {
                return false;
            }
            continue;
        }
        if !conn.send(vsock, op::RW, 0, &data[..chunk]) {
            return false;
        }
        conn.tx_cnt = conn.tx_cnt.wrapping_add(chunk as u32);
        conn.sent += chunk as u64;
        data = &data[chunk..];
    }
    true
}

/// Ends a connection: RST if the peer already shut down both ways, else SHUTDOWN and a bounded
/// wait for the peer's RST (sending RST if it does not come).
fn close(vsock: &mut Vsock, conn: &mut Conn) {
    if conn.reset {
        return;
    }
    if conn.peer_shutdown & (SHUTDOWN_RCV | SHUTDOWN_SEND) != SHUTDOWN_RCV | SHUTDOWN_SEND {
        conn.send(vsock, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
        let waiter = Waiter::new(CLOSE_WAIT_MS);
        if pump(vsock, conn, &waiter, &mut |_| true, |c| c.reset) {
            return;
        }
    }
    conn.send(vsock, op::RST, 0, &[]);
}

fn closed_by(conn: &Conn, timed_out: bool) -> &'static str {
    if timed_out {
        "timeout"
    } else if conn.reset {
        "peer-rst"
    } else {
        "peer-shutdown"
    }
}

/// `vsock info|connect <port> <text>|listen <port> [seconds]`
pub(super) fn command(machine: &mut Machine, args: &mut Args) {
    let subcommand = args.word();
    let echo = match subcommand {
        Some(b"listen") => machine.frames.alloc(BUF_ALLOC as usize),
        _ => None,
    };
    let Some(vsock) = machine.devices.vsock() else {
        return error("vsock", "no-vsock-device");
    };
    match subcommand {
        Some(b"info") => report::line(format_args!(
            "vsock info cid={} features={:#x} resets={}",
            vsock.guest_cid, vsock.features, vsock.resets
        )),
        Some(b"connect") => match args.number() {
            Some(port) => connect(vsock, port as u32, args.rest()),
            None => usage("vsock connect", "<port> <text>"),
        },
        Some(b"listen") => match (args.number(), echo) {
            (Some(port), Some(mut echo)) => {
                let seconds = args.number().unwrap_or(DEFAULT_LISTEN_SECONDS);
                listen(vsock, port as u32, seconds, echo.bytes_mut());
            }
            (None, _) => usage("vsock listen", "<port> [seconds]"),
            (_, None) => error("vsock listen", "out-of-memory"),
        },
        _ => usage(
            "vsock",
            "info|connect <port> <text>|listen <port> [seconds]",
        ),
    }
}

fn connect(vsock: &mut Vsock, port: u32, text: &[u8]) {
    let local = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn::new(vsock.guest_cid, local, HOST_CID, port);
    conn.send(vsock, op::REQUEST, 0, &[]);
    let mut connected = false;
    let deadline = Deadline::after_ms(CONNECT_TIMEOUT_MS);
    while !connected && !conn.reset && !deadline.passed() {
        while let Some(packet) = vsock.recv() {
            if conn.matches(&packet.header) {
                conn.peer_buf_alloc = packet.header.buf_alloc;
                conn.peer_fwd_cnt = packet.header.fwd_cnt;
                match packet.header.op {
                    op::RESPONSE => connected = true,
                    op::RST => conn.reset = true,
                    _ => {}
                }
            } else {
                refuse(vsock, &packet.header);
            }
            vsock.recycle(packet);
        }
        if !connected && !conn.reset {
            vsock.wait_rx(&Waiter::new(100));
        }
    }
    if !connected {
        let result = if conn.reset { "refused" } else { "timeout" };
        return report::line(format_args!(
            "vsock connect port={port} local_port={local} result={result}"
        ));
    }
    let mut shown = [0u8; SHOW_MAX];
    let mut shown_len = 0;
    let mut sink = |data: &[u8]| {
        let take = data.len().min(SHOW_MAX - shown_len);
        shown[shown_len..shown_len + take].copy_from_slice(&data[..take]);
        shown_len += take;
        true
    };
    send_stream(vsock, &mut conn, text, &mut sink);
    // Read until the peer stops sending, resets, or goes quiet.
    let mut timed_out = false;
    loop {
        let before = conn.received;
        let waiter = Waiter::new(IDLE_MS);
        if pump(vsock, &mut conn, &waiter, &mut sink, |c| {
            c.reset || c.peer_shutdown & SHUTDOWN_SEND != 0
        }) {
            break;
        }
        if conn.received == before {
            timed_out = true;
            break;
        }
    }
    let closed = closed_by(&conn, timed_out);
    close(vsock, &mut conn);
    report::line(format_args!(
        "vsock recv {}",
        Printable(&shown[..shown_len])
    ));
    report::line(format_args!(
        "vsock connect port={port} local_port={local} result=ok sent={} received={} fnv1a64={:016x} closed_by={closed}",
        conn.sent,
        conn.received,
        conn.fnv.value()
    ));
}

/// Echo buffer: a ring of [`BUF_ALLOC`] bytes.
struct Ring<'a> {
    bytes: &'a mut [u8],
    head: usize,
    len: usize,
}

impl Ring<'_> {
    fn push(&mut self, data: &[u8]) {
        for byte in data.iter().take(self.bytes.len() - self.len) {
            let at = (self.head + self.len) % self.bytes.len();
            self.bytes[at] = *byte;
            self.len += 1;
        }
    }

    /// The oldest contiguous bytes, at most `max`.
    fn front(&self, max: usize) -> &[u8] {
        let contiguous = (self.bytes.len() - self.head).min(self.len).min(max);
        &self.bytes[self.head..self.head + contiguous]
    }

    fn pop(&mut self, len: usize) {
        self.head = (self.head + len) % self.bytes.len();
        self.len -= len;
    }
}

fn listen(vsock: &mut Vsock, port: u32, seconds: u64, echo: &mut [u8]) {
    report::line(format_args!(
        "vsock listening port={port} cid={}",
        vsock.guest_cid
    ));
    let deadline = Deadline::after_ms(seconds * 1000);
    let mut conn = None;
    while conn.is_none() {
        if deadline.passed() || key_pressed() {
            return report::line(format_args!("vsock listen port={port} result=timeout"));
        }
        while let Some(packet) = vsock.recv() {
            let header = packet.header;
            if header.op == op::REQUEST
                && header.dst_port == port
                && header.dst_cid == vsock.guest_cid
            {
                let mut accepted =
                    Conn::new(vsock.guest_cid, port, header.src_cid, header.src_port);
                accepted.peer_buf_alloc = header.buf_alloc;
                accepted.peer_fwd_cnt = header.fwd_cnt;
                accepted.send(vsock, op::RESPONSE, 0, &[]);
                conn = Some(accepted);
                // The peer may send at once: what follows belongs to the connection's pump,
                // not to this loop, which would drop it.
                vsock.recycle(packet);
                break;
            }
            refuse(vsock, &header);
            vsock.recycle(packet);
        }
        if conn.is_none() {
            vsock.wait_rx(&Waiter::new(100));
        }
    }
    let mut conn = conn.expect("the loop ends with a connection");
    let mut ring = Ring {
        bytes: echo,
        head: 0,
        len: 0,
    };
    let mut timed_out = false;
    loop {
        let waiter = Waiter::new(if ring.len > 0 { 0 } else { 100 });
        pump(
            vsock,
            &mut conn,
            &waiter,
            &mut |data| {
                ring.push(data);
                false
            },
            |_| false,
        );
        // Echo what the peer has room for; the bytes count as consumed once sent back.
        while ring.len > 0 && conn.credit() > 0 && !conn.reset {
            let chunk = ring.front(DATA_MAX.min(conn.credit() as usize));
            let len = chunk.len();
            if !send_stream(vsock, &mut conn, chunk, &mut |_| true) {
                break;
            }
            ring.pop(len);
            conn.consumed(vsock, len as u32);
        }
        if ring.len > 0 && conn.credit() == 0 && !conn.reset {
            conn.send(vsock, op::CREDIT_REQUEST, 0, &[]);
        }
        let peer_done = conn.peer_shutdown & SHUTDOWN_SEND != 0;
        if conn.reset || (peer_done && (ring.len == 0 || conn.peer_shutdown & SHUTDOWN_RCV != 0)) {
            break;
        }
        if deadline.passed() || key_pressed() {
            timed_out = true;
            break;
        }
    }
    let closed = closed_by(&conn, timed_out);
    close(vsock, &mut conn);
    report::line(format_args!(
        "vsock listen port={port} result=ok peer_cid={} peer_port={} received={} sent={} fnv1a64={:016x} closed_by={closed}",
        conn.peer_cid,
        conn.peer_port,
        conn.received,
        conn.sent,
        conn.fnv.value()
    ));
}
