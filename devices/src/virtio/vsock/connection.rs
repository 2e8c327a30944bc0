//! One vsock stream between a guest socket and a host Unix socket: the handshake, credit flow
//! control in both directions, orderly shutdown and reset.
//!
//! Guest to host: data the host socket cannot take at once waits in a buffer no larger than the
//! credit we advertise ([`TX_BUF_SIZE`]); `fwd_cnt` only advances as bytes reach the host, so a
//! guest that honours its credit stops sending while the host is slow, and one that does not is
//! reset. Host to guest: the host socket is only read when the guest has both a free RX buffer
//! and credit for the bytes, so nothing is buffered on that side at all.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::EventSet;

use super::packet::{
    Header, Op, HOST_CID, MAX_PAYLOAD, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::state::{VsockConnPhase, VsockConnState};

/// Receive buffer each connection advertises to the guest (`buf_alloc`), and so the most guest
/// data it ever holds.
pub const TX_BUF_SIZE: u32 = 256 << 10;
/// When the guest's view of our free buffer drops below this and the real free space is at
/// least this, a CREDIT_UPDATE is sent: one max-size packet's worth.
const CREDIT_LOW_WATER: u32 = MAX_PAYLOAD as u32;
/// Longest preamble we queue for the host (`OK <port>\n`).
const CONNECT_REPLY_MAX: usize = 16;
/// What an emptied TX buffer keeps allocated.
const IDLE_BUF_CAPACITY: usize = 4096;
/// How long the guest has to answer a REQUEST.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest has to answer our SHUTDOWN (both directions) with a RST.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection's identity: our (host-side) port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    /// The host-side port: the port the guest connected to, or one we picked for a
    /// host-initiated connection.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

impl ConnKey {
    /// The connection a guest packet belongs to.
    pub fn of(header: &Header) -> ConnKey {
        ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        }
    }
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Host-initiated: our REQUEST is waiting for an RX buffer (`sent` false), or for the
    /// guest's RESPONSE.
    Requesting { sent: bool },
    /// Guest-initiated: the host socket is connected and our RESPONSE waits for an RX buffer.
    Responding,
    /// Data flows.
    Established,
    /// Nothing more can flow; we told the guest SHUTDOWN (both) and wait for its RST.
    Closing,
}

/// What the caller must do after a guest packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The connection goes on.
    Keep,
    /// The connection is over and the guest expects nothing more: forget it.
    Forget,
    /// The connection is broken: send the guest a RST and forget it.
    Reset(&'static str),
}

/// A packet for the guest; its payload, if any, is in the caller's scratch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    /// The header (`len` is the payload length).
    pub header: Header,
    /// After this packet, the connection is gone.
    pub last: bool,
}

/// The credit the guest gave us, and what we told it about ours.
#[derive(Debug, Clone, Copy, Default)]
struct Credit {
    /// The guest's receive buffer for this connection.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed of what we sent.
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we have sent the guest.
    rx_cnt: Wrapping<u32>,
    /// Our `fwd_cnt` as the guest last heard it.
    fwd_cnt_told: Wrapping<u32>,
    /// We asked for a credit update and have not heard back since.
    requested: bool,
    /// The guest should hear our `fwd_cnt` soon (it asked, or it is running low).
    update_wanted: bool,
}

impl Credit {
    /// Bytes the guest can take now.
    fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// Bytes on their way to the host socket: guest data that did not fit at once, possibly after
/// a preamble of our own (the `OK <port>` line) that the guest's credit does not cover.
#[derive(Debug, Default)]
struct TxBuffer {
    data: VecDeque<u8>,
    preamble: usize,
    /// Guest bytes that reached the host (or were discarded with it gone).
    fwd_cnt: Wrapping<u32>,
}

impl TxBuffer {
    fn guest_bytes(&self) -> usize {
        self.data.len() - self.preamble
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn push_preamble(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().rev() {
            self.data.push_front(b);
        }
        self.preamble += bytes.len();
    }

    fn consumed(&mut self, n: usize) {
        let own = n.min(self.preamble);
        self.preamble -= own;
        self.fwd_cnt += Wrapping((n - own) as u32);
    }

    /// Writes as much as the host takes without blocking.
    fn flush(&mut self, fd: RawFd) -> std::io::Result<()> {
        while !self.data.is_empty() {
            let (front, _) = self.data.as_slices();
            match send_nosignal(fd, front) {
                Ok(n) => {
                    self.data.drain(..n);
                    self.consumed(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // A burst is over: an idle connection should not keep its peak allocation.
        self.data.shrink_to(IDLE_BUF_CAPACITY);
        Ok(())
    }

    /// Sends `payload` (straight through when nothing is queued), keeping what the host did
    /// not take.
    fn send(&mut self, fd: RawFd, payload: &[u8]) -> std::io::Result<()> {
        let mut rest = payload;
        if self.data.is_empty() {
            while !rest.is_empty() {
                match send_nosignal(fd, rest) {
                    Ok(n) => {
                        self.fwd_cnt += Wrapping(n as u32);
                        rest = &rest[n..];
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Queued, so that discarding it keeps the count right.
                        self.data.extend(rest);
                        return Err(e);
                    }
                }
            }
        }
        self.data.extend(rest);
        self.flush(fd)
    }

    /// Drops everything queued (the host is gone); guest bytes count as forwarded.
    fn discard(&mut self) {
        let n = self.data.len();
        self.data.clear();
        self.consumed(n);
    }
}

/// One non-blocking `send`, without SIGPIPE when the host has gone.
fn send_nosignal(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of its length; `fd` is a socket the caller owns.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What we know of the host end.
#[derive(Debug, Clone, Copy, Default)]
struct HostEnd {
    /// Reading might return data (the event loop said so and no read has blocked since).
    readable: bool,
    /// A read returned end of file: the host sends nothing more.
    eof: bool,
    /// The host takes nothing more (hung up, or a write failed).
    no_recv: bool,
    /// The socket hung up (or failed): epoll reports it on every wait from now on.
    hup: bool,
    /// Directions we shut down on the host socket (SHUTDOWN_* bits, as seen from the guest).
    shut: u32,
}

/// One vsock stream and its host socket.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    key: ConnKey,
    phase: Phase,
    credit: Credit,
    tx: TxBuffer,
    host: HostEnd,
    /// SHUTDOWN flags the guest sent.
    guest_shut: u32,
    /// SHUTDOWN flags we sent the guest.
    told_guest: u32,
    /// Something broke: the next packet for the guest is a RST.
    reset_wanted: bool,
    deadline: Option<Instant>,
}

impl Connection {
    /// A guest's REQUEST that reached a host listener; the RESPONSE goes out next.
    pub fn guest_initiated(stream: UnixStream, guest_cid: u64, request: &Header) -> Connection {
        let mut c = Connection::new(stream, guest_cid, ConnKey::of(request), Phase::Responding);
        c.take_credit(request);
        c
    }

    /// A host program's `CONNECT <port>`: `key.local_port` is the port we picked for it; the
    /// REQUEST goes out next.
    pub fn host_initiated(stream: UnixStream, guest_cid: u64, key: ConnKey) -> Connection {
        Connection::new(stream, guest_cid, key, Phase::Requesting { sent: false })
    }

    fn new(stream: UnixStream, guest_cid: u64, key: ConnKey, phase: Phase) -> Connection {
        Connection {
            stream,
            guest_cid,
            key,
            phase,
            credit: Credit::default(),
            tx: TxBuffer::default(),
            host: HostEnd::default(),
            guest_shut: 0,
            told_guest: 0,
            reset_wanted: false,
            deadline: None,
        }
    }

    /// The connection as a same-host migration hands it over (its socket goes beside it).
    pub fn save(&self, now: Instant) -> VsockConnState {
        VsockConnState {
            local_port: self.key.local_port,
            peer_port: self.key.peer_port,
            phase: match self.phase {
                Phase::Requesting { sent } => VsockConnPhase::Requesting { sent },
                Phase::Responding => VsockConnPhase::Responding,
                Phase::Established => VsockConnPhase::Established,
                Phase::Closing => VsockConnPhase::Closing,
            },
            peer_buf_alloc: self.credit.peer_buf_alloc,
            peer_fwd_cnt: self.credit.peer_fwd_cnt.0,
            rx_cnt: self.credit.rx_cnt.0,
            fwd_cnt_told: self.credit.fwd_cnt_told.0,
            credit_requested: self.credit.requested,
            update_wanted: self.credit.update_wanted,
            tx_data: self.tx.data.iter().copied().collect(),
            tx_preamble: self.tx.preamble as u32,
            tx_fwd_cnt: self.tx.fwd_cnt.0,
            host_readable: self.host.readable,
            host_eof: self.host.eof,
            host_no_recv: self.host.no_recv,
            host_hup: self.host.hup,
            host_shut: self.host.shut,
            guest_shut: self.guest_shut,
            told_guest: self.told_guest,
            reset_wanted: self.reset_wanted,
            deadline_ms: self
                .deadline
                .map(|d| d.saturating_duration_since(now).as_millis() as u64),
        }
    }

    /// Rebuilds a connection another lockstep process handed over, on its host socket; the
    /// state is untrusted and checked (buffers within the credit we advertise, flags that
    /// exist, deadlines no longer than ours).
    pub fn restore(
        stream: UnixStream,
        guest_cid: u64,
        s: &VsockConnState,
        now: Instant,
    ) -> Result<Connection, String> {
        let preamble = s.tx_preamble as usize;
        if preamble > s.tx_data.len()
            || preamble > CONNECT_REPLY_MAX
            || s.tx_data.len() - preamble > TX_BUF_SIZE as usize
        {
            return Err(format!(
                "{} bytes queued for the host ({preamble} of them ours)",
                s.tx_data.len()
            ));
        }
        if [s.host_shut, s.guest_shut, s.told_guest]
            .iter()
            .any(|f| f & !SHUTDOWN_BOTH != 0)
        {
            return Err("unknown shutdown flags".into());
        }
        let longest = REQUEST_TIMEOUT.max(SHUTDOWN_TIMEOUT);
        let deadline = match s.deadline_ms.map(Duration::from_millis) {
            Some(d) if d > longest => return Err(format!("a deadline {d:?} away")),
            Some(d) => Some(now + d),
            None => None,
        };
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let key = ConnKey {
            local_port: s.local_port,
            peer_port: s.peer_port,
        };
        let phase = match s.phase {
            VsockConnPhase::Requesting { sent } => Phase::Requesting { sent },
            VsockConnPhase::Responding => Phase::Responding,
            VsockConnPhase::Established => Phase::Established,
            VsockConnPhase::Closing => Phase::Closing,
        };
        let mut c = Connection::new(stream, guest_cid, key, phase);
        c.credit = Credit {
            peer_buf_alloc: s.peer_buf_alloc,
            peer_fwd_cnt: Wrapping(s.peer_fwd_cnt),
            rx_cnt: Wrapping(s.rx_cnt),
            fwd_cnt_told: Wrapping(s.fwd_cnt_told),
            requested: s.credit_requested,
            update_wanted: s.update_wanted,
        };
        c.tx = TxBuffer {
            data: s.tx_data.iter().copied().collect(),
            preamble,
            fwd_cnt: Wrapping(s.tx_fwd_cnt),
        };
        c.host = HostEnd {
            readable: s.host_readable,
            eof: s.host_eof,
            no_recv: s.host_no_recv,
            hup: s.host_hup,
            shut: s.host_shut,
        };
        c.guest_shut = s.guest_shut;
        c.told_guest = s.told_guest;
        c.reset_wanted = s.reset_wanted;
        c.deadline = deadline;
        Ok(c)
    }

    /// Another descriptor on the host socket, for a same-host migration to hand over.
    pub fn dup_stream(&self) -> std::io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// The connection's key.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The host socket's descriptor, for the event loop.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Gives up the host socket (for closing once the event loop has forgotten it).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Guest bytes waiting for the host socket.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.tx.guest_bytes()
    }

    /// Bytes the guest may still send us before its credit runs out, as it knows it.
    pub fn credit_granted(&self) -> u32 {
        let told_in_flight =
            (self.tx.fwd_cnt - self.credit.fwd_cnt_told).0 as usize + self.tx.guest_bytes();
        TX_BUF_SIZE.saturating_sub(told_in_flight.min(u32::MAX as usize) as u32)
    }

    /// Bytes we may still send the guest.
    #[cfg(test)]
    pub fn peer_free(&self) -> u32 {
        self.credit.peer_free()
    }

    /// When the connection gives up waiting for the guest, if it waits.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn take_credit(&mut self, h: &Header) {
        let before = self.credit.peer_free();
        self.credit.peer_buf_alloc = h.buf_alloc;
        self.credit.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if self.credit.peer_free() > before {
            self.credit.requested = false;
        }
    }

    fn header(&self, op: Op) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.tx.fwd_cnt.0,
        }
    }

    /// A RST for this connection.
    pub fn rst(&self) -> Header {
        self.header(Op::Rst)
    }

    /// Handles a packet the guest sent on this connection (its payload only for RW).
    pub fn on_guest_packet(&mut self, h: &Header, payload: &[u8]) -> Verdict {
        self.take_credit(h);
        let Some(op) = h.op() else {
            return Verdict::Reset("unknown operation");
        };
        let verdict = match (op, self.phase) {
            (Op::Rst, _) => return Verdict::Forget,
            (_, Phase::Closing) => Verdict::Keep,
            (Op::Response, Phase::Requesting { sent: true }) => {
                self.phase = Phase::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.key.local_port);
                self.tx.push_preamble(line.as_bytes());
                self.flush_host();
                Verdict::Keep
            }
            (Op::Request | Op::Response, _) => Verdict::Reset("unexpected handshake packet"),
            (_, Phase::Requesting { .. } | Phase::Responding) => {
                Verdict::Reset("packet before the connection was established")
            }
            (Op::Rw, Phase::Established) => self.on_guest_data(payload),
            (Op::Shutdown, Phase::Established) => {
                self.guest_shut |= h.flags & SHUTDOWN_BOTH;
                Verdict::Keep
            }
            (Op::CreditRequest, Phase::Established) => {
                self.credit.update_wanted = true;
                Verdict::Keep
            }
            (Op::CreditUpdate, Phase::Established) => Verdict::Keep,
        };
        if verdict == Verdict::Keep {
            self.settle();
        }
        verdict
    }

    fn on_guest_data(&mut self, payload: &[u8]) -> Verdict {
        if self.guest_shut & SHUTDOWN_SEND != 0 {
            return Verdict::Reset("data after the guest's SHUTDOWN");
        }
        if self.host.no_recv {
            // The guest has been (or is being) told; what is still in flight has nowhere to go.
            self.tx.fwd_cnt += Wrapping(payload.len() as u32);
            return Verdict::Keep;
        }
        if self.tx.guest_bytes() + payload.len() > TX_BUF_SIZE as usize {
            return Verdict::Reset("the guest sent more than its credit");
        }
        if let Err(e) = self.tx.send(self.stream.as_raw_fd(), payload) {
            log::debug!("vsock {:?}: host write: {e}", self.key);
            self.host_stopped_receiving();
        }
        self.credit_after_forwarding();
        Verdict::Keep
    }

    fn host_stopped_receiving(&mut self) {
        self.host.no_recv = true;
        self.tx.discard();
    }

    /// Bytes reached the host: tell the guest if its view of our buffer is running low and
    /// the real one is not.
    fn credit_after_forwarding(&mut self) {
        let real_free = TX_BUF_SIZE - self.tx.guest_bytes() as u32;
        if self.credit_granted() < CREDIT_LOW_WATER && real_free >= CREDIT_LOW_WATER {
            self.credit.update_wanted = true;
        }
    }

    /// The host socket can take more: writes what is queued.
    fn flush_host(&mut self) {
        if self.tx.is_empty() {
            return;
        }
        if let Err(e) = self.tx.flush(self.stream.as_raw_fd()) {
            log::debug!("vsock {:?}: host write: {e}", self.key);
            self.host_stopped_receiving();
        }
        self.credit_after_forwarding();
        self.settle();
    }

    /// The event loop reported the host socket: `readable`, `writable`, hung up, or in error.
    pub fn on_host_event(&mut self, events: EventSet) {
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            self.host.readable = true;
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Nothing more can be written; what is left to read is still read to the end,
            // without the event loop's help (reads no longer block).
            self.host_stopped_receiving();
            self.host.hup = true;
            self.host.readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush_host();
        }
        self.settle();
    }

    /// Deadline handling: a guest that does not answer in time gets a RST.
    pub fn on_timer(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            log::debug!("vsock {:?}: the guest did not answer in time", self.key);
            self.deadline = None;
            self.reset_wanted = true;
        }
    }

    /// Applies the shutdowns both sides asked for, and decides whether the connection is over.
    fn settle(&mut self) {
        if self.phase != Phase::Established {
            return;
        }
        if self.guest_shut & SHUTDOWN_RCV != 0 && self.host.shut & SHUTDOWN_RCV == 0 {
            // The host's further writes fail instead of piling up unread.
            let _ = self.stream.shutdown(Shutdown::Read);
            self.host.shut |= SHUTDOWN_RCV;
        }
        let to_host_done =
            self.host.no_recv || (self.guest_shut & SHUTDOWN_SEND != 0 && self.tx.is_empty());
        if self.guest_shut & SHUTDOWN_SEND != 0
            && self.tx.is_empty()
            && self.host.shut & SHUTDOWN_SEND == 0
        {
            // The host reads end of file once every byte the guest sent has reached it.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host.shut |= SHUTDOWN_SEND;
        }
        let to_guest_done = self.host.eof || self.guest_shut & SHUTDOWN_RCV != 0;
        if to_host_done && to_guest_done {
            if self.guest_shut == SHUTDOWN_BOTH {
                // The guest closed and waits for our RST.
                self.reset_wanted = true;
            } else {
                self.phase = Phase::Closing;
            }
        }
    }

    fn can_read_host(&self) -> bool {
        self.phase == Phase::Established
            && self.host.readable
            && !self.host.eof
            && self.guest_shut & SHUTDOWN_RCV == 0
    }

    /// SHUTDOWN flags the guest should hear that it has not yet.
    fn shutdown_to_tell(&self) -> u32 {
        let mut flags = 0;
        if self.phase == Phase::Closing {
            flags = SHUTDOWN_BOTH;
        } else if self.phase == Phase::Established {
            if self.host.eof {
                flags |= SHUTDOWN_SEND;
            }
            if self.host.no_recv {
                flags |= SHUTDOWN_RCV;
            }
        }
        flags & !self.told_guest
    }

    /// True when the connection has a packet for the guest (or will find out by reading).
    pub fn wants_rx(&self) -> bool {
        matches!(
            self.phase,
            Phase::Requesting { sent: false } | Phase::Responding
        ) || self.reset_wanted
            || (self.can_read_host() && (self.credit.peer_free() > 0 || !self.credit.requested))
            || self.shutdown_to_tell() != 0
            || (self.credit.update_wanted && self.phase == Phase::Established)
    }

    /// The next packet for the guest, given `room` payload bytes in the RX buffer. Data read
    /// from the host goes into `scratch` (at least `room` long).
    pub fn next_packet(
        &mut self,
        room: usize,
        scratch: &mut [u8],
        now: Instant,
    ) -> Option<Outgoing> {
        let packet = self.next_packet_inner(room, scratch, now)?;
        // Every header carries our buf_alloc and fwd_cnt: any packet is a credit update.
        self.credit.fwd_cnt_told = self.tx.fwd_cnt;
        self.credit.update_wanted = false;
        Some(packet)
    }

    fn next_packet_inner(
        &mut self,
        room: usize,
        scratch: &mut [u8],
        now: Instant,
    ) -> Option<Outgoing> {
        let out = |header: Header| {
            Some(Outgoing {
                header,
                last: false,
            })
        };
        if self.reset_wanted {
            return Some(Outgoing {
                header: self.rst(),
                last: true,
            });
        }
        match self.phase {
            Phase::Requesting { sent: false } => {
                self.phase = Phase::Requesting { sent: true };
                self.deadline = Some(now + REQUEST_TIMEOUT);
                return out(self.header(Op::Request));
            }
            Phase::Requesting { sent: true } => return None,
            Phase::Responding => {
                self.phase = Phase::Established;
                return out(self.header(Op::Response));
            }
            Phase::Established | Phase::Closing => {}
        }
        if self.can_read_host() {
            let want = room
                .min(scratch.len())
                .min(MAX_PAYLOAD)
                .min(self.credit.peer_free() as usize);
            if want > 0 {
                match (&self.stream).read(&mut scratch[..want]) {
                    Ok(0) => {
                        self.host.eof = true;
                        self.settle();
                    }
                    Ok(n) => {
                        self.credit.rx_cnt += Wrapping(n as u32);
                        let mut h = self.header(Op::Rw);
                        h.len = n as u32;
                        return out(h);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.host.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!("vsock {:?}: host read: {e}", self.key);
                        return Some(Outgoing {
                            header: self.rst(),
                            last: true,
                        });
                    }
                }
            } else if self.credit.peer_free() == 0 && !self.credit.requested {
                self.credit.requested = true;
                return out(self.header(Op::CreditRequest));
            }
        }
        if self.reset_wanted {
            return Some(Outgoing {
                header: self.rst(),
                last: true,
            });
        }
        let flags = self.shutdown_to_tell();
        if flags != 0 {
            self.told_guest |= flags;
            if self.phase == Phase::Closing {
                self.deadline = Some(now + SHUTDOWN_TIMEOUT);
            }
            let mut h = self.header(Op::Shutdown);
            h.flags = self.told_guest;
            return out(h);
        }
        if self.credit.update_wanted && self.phase == Phase::Established {
            return out(self.header(Op::CreditUpdate));
        }
        None
    }

    /// Events the host socket should be watched for.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        let reading = self.phase == Phase::Established
            && !self.host.eof
            && self.guest_shut & SHUTDOWN_RCV == 0;
        if reading && !self.host.readable {
            set |= EventSet::IN;
        }
        if !self.tx.is_empty() && !self.host.no_recv {
            set |= EventSet::OUT;
        }
        set
    }

    /// True once the event loop should stop watching the socket altogether: it hung up, so
    /// epoll would report it on every wait.
    pub fn hung_up(&self) -> bool {
        self.host.hup
    }

    /// True when the host gave up before the guest heard of the connection: it can be
    /// forgotten without telling the guest.
    pub fn abandoned(&self) -> bool {
        self.host.hup && self.phase == (Phase::Requesting { sent: false })
    }
}

#[cfg(test)]
mod tests;
