//! The host side of vsock, in Firecracker's convention: host programs reach the guest through
//! one listening Unix socket (`uds_path`, then `CONNECT <port>\n`), and a guest connection to
//! the host's port P reaches whoever listens on `<uds_path>_<P>`.
//!
//! [`UnixBackend`] keeps the connection table and turns guest packets into socket operations
//! and socket readiness into packets for the guest. It never blocks: every host socket is
//! non-blocking and the event loop watches it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::ops::Bound;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use event_manager::EventSet;

use super::connection::{ConnKey, Connection, Verdict};
use super::device::VsockMetrics;
use super::packet::{Header, Op, HOST_CID, TYPE_STREAM};
use super::state::VsockConnState;

/// Most host sockets (connections and host programs still sending `CONNECT`) at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Most RSTs for unknown connections waiting for RX buffers; past this the device stops
/// taking TX packets until the guest gives it RX buffers.
pub const MAX_PENDING_RESETS: usize = 64;
/// Longest `CONNECT <port>\n` line accepted.
const CONNECT_LINE_MAX: usize = 32;
/// Host-side ports for host-initiated connections are taken from here up (as Firecracker does),
/// away from ports host services listen on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A host program that connected to `uds_path` and has not finished its `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The connection table and the host sockets behind it.
#[derive(Debug)]
pub struct UnixBackend {
    uds_path: PathBuf,
    /// The socket file's device and inode: only that file is removed on drop.
    uds_inode: (u64, u64),
    /// Set once the listener was handed to another process that now owns the socket file (a
    /// same-host migration): the file then stays on drop.
    handed_over: Arc<AtomicBool>,
    listener: UnixListener,
    guest_cid: u64,
    connections: BTreeMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// RSTs answering packets that belong to no connection (or ended one), oldest first.
    resets: VecDeque<Header>,
    /// Sockets of finished connections, to close once the event loop forgot them.
    retired: Vec<UnixStream>,
    next_local_port: u32,
    rr_cursor: Option<ConnKey>,
    metrics: Arc<VsockMetrics>,
}

impl UnixBackend {
    /// Listens on `uds_path` (which must not exist yet).
    pub fn bind(
        uds_path: &Path,
        guest_cid: u64,
        metrics: Arc<VsockMetrics>,
    ) -> std::io::Result<UnixBackend> {
        let listener = UnixListener::bind(uds_path)?;
        // Only this user may connect, whatever the umask (the host runs as root).
        if let Err(e) = std::fs::set_permissions(uds_path, std::fs::Permissions::from_mode(0o600)) {
            let _ = std::fs::remove_file(uds_path);
            return Err(e);
        }
        Self::on_listener(listener, uds_path, guest_cid, metrics)
    }

    /// Takes the listener of `uds_path` another lockstep process handed over (a same-host
    /// migration), after checking that it is a listening stream socket bound to that path and
    /// that the file there is still a socket. The socket file stays when this backend goes
    /// until [`UnixBackend::own_socket_file`] says the VM is this process's (it is the source's
    /// until the switch).
    pub fn from_passed(
        listener: UnixListener,
        uds_path: &Path,
        guest_cid: u64,
        metrics: Arc<VsockMetrics>,
    ) -> std::io::Result<UnixBackend> {
        let addr = listener.local_addr()?;
        let listening = {
            let mut on: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: SO_ACCEPTCONN writes one int into `on`, which lives on this stack.
            let rc = unsafe {
                libc::getsockopt(
                    listener.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ACCEPTCONN,
                    (&mut on as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            rc == 0 && on == 1
        };
        let is_socket =
            std::fs::symlink_metadata(uds_path).is_ok_and(|m| m.file_type().is_socket());
        if addr.as_pathname() != Some(uds_path) || !listening || !is_socket {
            return Err(std::io::Error::other(format!(
                "the descriptor handed over is not the socket listening on {}",
                uds_path.display()
            )));
        }
        let backend = Self::on_listener(listener, uds_path, guest_cid, metrics)?;
        backend.handed_over.store(true, Ordering::SeqCst);
        Ok(backend)
    }

    /// The VM is this process's now: the socket file goes with this backend.
    pub fn own_socket_file(&self) {
        self.handed_over.store(false, Ordering::SeqCst);
    }

    fn on_listener(
        listener: UnixListener,
        uds_path: &Path,
        guest_cid: u64,
        metrics: Arc<VsockMetrics>,
    ) -> std::io::Result<UnixBackend> {
        listener.set_nonblocking(true)?;
        let meta = std::fs::symlink_metadata(uds_path)?;
        Ok(UnixBackend {
            uds_path: uds_path.to_path_buf(),
            uds_inode: (meta.dev(), meta.ino()),
            handed_over: Arc::default(),
            listener,
            guest_cid,
            connections: BTreeMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            resets: VecDeque::new(),
            retired: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rr_cursor: None,
            metrics,
        })
    }

    /// The guest's context id changed (a restore).
    pub fn set_guest_cid(&mut self, guest_cid: u64) {
        self.guest_cid = guest_cid;
    }

    /// Another descriptor on the listening socket, and the flag to set once another process
    /// owns it (a same-host migration): the socket file then stays when this backend goes.
    pub fn hand_over(&self) -> std::io::Result<(std::fs::File, Arc<AtomicBool>)> {
        let fd = self.listener.try_clone()?;
        Ok((
            std::fs::File::from(std::os::fd::OwnedFd::from(fd)),
            self.handed_over.clone(),
        ))
    }

    /// The listening socket.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Open connections.
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    fn socket_count(&self) -> usize {
        self.connections.len() + self.handshakes.len()
    }

    /// True when no more RSTs should be queued: the device leaves TX packets in the queue.
    pub fn resets_full(&self) -> bool {
        self.resets.len() >= MAX_PENDING_RESETS
    }

    fn reply_rst(&mut self, h: &Header) {
        if h.op != Op::Rst as u16 {
            self.resets.push_back(h.rst_reply());
        }
    }

    fn forget(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.connections.remove(&key)?;
        self.by_fd.remove(&conn.fd());
        self.metrics
            .connections_closed
            .fetch_add(1, Ordering::Relaxed);
        Some(conn)
    }

    fn close(&mut self, key: ConnKey) {
        if let Some(conn) = self.forget(key) {
            self.retired.push(conn.into_stream());
        }
    }

    fn close_with_rst(&mut self, key: ConnKey) {
        if let Some(conn) = self.forget(key) {
            self.resets.push_back(conn.rst());
            self.retired.push(conn.into_stream());
        }
    }

    /// Handles a valid packet from the guest (`payload` only for RW).
    pub fn on_guest_packet(&mut self, h: &Header, payload: &[u8]) {
        if h.src_cid != self.guest_cid {
            // Not from the guest's address: there is nobody to answer.
            log::debug!("vsock: dropped a packet from cid {}", h.src_cid);
            self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let key = ConnKey::of(h);
        if h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            self.on_bad_packet(h, "not a stream packet for the host");
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            match h.op() {
                Some(Op::Request) => self.open_from_guest(h),
                Some(Op::Rst) => {}
                _ => {
                    log::debug!("vsock: packet op {} for unknown connection {key:?}", h.op);
                    self.metrics
                        .unknown_connection
                        .fetch_add(1, Ordering::Relaxed);
                    self.reply_rst(h);
                }
            }
            return;
        };
        match conn.on_guest_packet(h, payload) {
            Verdict::Keep => {}
            Verdict::Forget => self.close(key),
            Verdict::Reset(why) => {
                log::debug!("vsock {key:?}: reset: {why}");
                self.metrics.protocol_errors.fetch_add(1, Ordering::Relaxed);
                self.close_with_rst(key);
            }
        }
    }

    /// Handles a packet whose header was readable but that is not valid: its connection, if
    /// any, is reset, and its sender gets a RST.
    pub fn on_bad_packet(&mut self, h: &Header, why: &str) {
        log::debug!("vsock: invalid packet (op {}): {why}", h.op);
        self.metrics.protocol_errors.fetch_add(1, Ordering::Relaxed);
        let key = ConnKey::of(h);
        if h.src_cid == self.guest_cid && self.connections.contains_key(&key) {
            self.close_with_rst(key);
        } else if h.src_cid == self.guest_cid {
            self.reply_rst(h);
        }
    }

    fn port_path(&self, port: u32) -> PathBuf {
        let mut p = OsString::from(self.uds_path.as_os_str());
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    fn open_from_guest(&mut self, h: &Header) {
        if self.socket_count() >= MAX_CONNECTIONS {
            log::warn!("vsock: refused a guest connection: {MAX_CONNECTIONS} already open");
            self.metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            self.reply_rst(h);
            return;
        }
        let path = self.port_path(h.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::guest_initiated(stream, self.guest_cid, h);
                self.by_fd.insert(conn.fd(), conn.key());
                self.connections.insert(conn.key(), conn);
                self.metrics
                    .connections_opened
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                log::debug!("vsock: guest connection to {}: {e}", path.display());
                self.metrics
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                self.reply_rst(h);
            }
        }
    }

    /// True when some packet is waiting for an RX buffer (or may be, once a socket is read).
    pub fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || self.connections.values().any(Connection::wants_rx)
    }

    /// The next packet for the guest, connections taking turns. `room` is the payload space
    /// in the RX buffer; an RW packet's payload is left in `scratch`.
    pub fn next_packet(&mut self, room: usize, scratch: &mut [u8], now: Instant) -> Option<Header> {
        if let Some(h) = self.resets.pop_front() {
            return Some(h);
        }
        // Connections after the last one served first, then the rest up to and including it.
        let (after, wrap) = match self.rr_cursor {
            Some(c) => ((Bound::Excluded(c), Bound::Unbounded), Some(c)),
            None => ((Bound::Unbounded, Bound::Unbounded), None),
        };
        let mut served = None;
        for (key, conn) in self.connections.range_mut(after) {
            if conn.wants_rx() {
                if let Some(out) = conn.next_packet(room, scratch, now) {
                    served = Some((*key, out));
                    break;
                }
            }
        }
        if let (None, Some(c)) = (&served, wrap) {
            for (key, conn) in self.connections.range_mut(..=c) {
                if conn.wants_rx() {
                    if let Some(out) = conn.next_packet(room, scratch, now) {
                        served = Some((*key, out));
                        break;
                    }
                }
            }
        }
        let (key, out) = served?;
        self.rr_cursor = Some(key);
        if out.last {
            self.close(key);
        }
        Some(out.header)
    }

    /// The listening socket is readable: takes every waiting host program.
    pub fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.socket_count() >= MAX_CONNECTIONS {
                        log::warn!("vsock: closed a host connection: {MAX_CONNECTIONS} open");
                        self.metrics
                            .connections_refused
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("vsock: host connection: {e}");
                        continue;
                    }
                    self.handshakes.insert(
                        stream.as_raw_fd(),
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    /// A host socket is ready; false if `fd` is not one of ours.
    pub fn on_socket_event(&mut self, fd: RawFd, events: EventSet) -> bool {
        if self.handshakes.contains_key(&fd) {
            self.read_connect_line(fd);
            return true;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return false;
        };
        if let Some(conn) = self.connections.get_mut(&key) {
            conn.on_host_event(events);
            if conn.abandoned() {
                self.close(key);
            }
        }
        true
    }

    /// Reads the `CONNECT <port>\n` line byte by byte, so that data the host program sends
    /// after it stays in the socket for the guest.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match (&hs.stream).read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(_) if hs.line.len() >= CONNECT_LINE_MAX => break None,
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let Some(peer_port) = port else {
            log::debug!(
                "vsock: host program sent {:?} instead of CONNECT <port>",
                String::from_utf8_lossy(&hs.line)
            );
            self.metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            self.retired.push(hs.stream);
            return;
        };
        let key = ConnKey {
            local_port: self.free_local_port(),
            peer_port,
        };
        let conn = Connection::host_initiated(hs.stream, self.guest_cid, key);
        self.by_fd.insert(conn.fd(), key);
        self.connections.insert(key, conn);
        self.metrics
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A host-side port no open connection uses.
    fn free_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            let lo = ConnKey {
                local_port: port,
                peer_port: 0,
            };
            let hi = ConnKey {
                local_port: port,
                peer_port: u32::MAX,
            };
            // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
            if self.connections.range(lo..=hi).next().is_none() {
                return port;
            }
        }
    }

    /// Connections whose deadline passed are reset.
    pub fn on_timer(&mut self, now: Instant) {
        for conn in self.connections.values_mut() {
            conn.on_timer(now);
        }
    }

    /// The earliest connection deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.connections
            .values()
            .filter_map(Connection::deadline)
            .min()
    }

    /// Closes every host socket without telling the guest (a device reset or restore: the
    /// guest's side is gone, or is told by a transport reset event).
    pub fn close_all(&mut self) {
        let keys: Vec<ConnKey> = self.connections.keys().copied().collect();
        for key in keys {
            self.close(key);
        }
        for (_, hs) in self.handshakes.drain() {
            self.retired.push(hs.stream);
        }
        self.resets.clear();
        self.rr_cursor = None;
    }

    /// Every open connection's state with another descriptor on its host socket, for a
    /// same-host migration (the VM is paused: nothing changes them meanwhile). Host programs
    /// still sending their `CONNECT` line are not included: they close with this VM.
    pub fn hand_over_connections(
        &self,
        now: Instant,
    ) -> std::io::Result<Vec<(VsockConnState, UnixStream)>> {
        self.connections
            .values()
            .map(|c| Ok((c.save(now), c.dup_stream()?)))
            .collect()
    }

    /// Takes the connections another lockstep process handed over in place of any open here;
    /// each must be a new key, at most [`MAX_CONNECTIONS`] in all.
    pub fn adopt_connections(
        &mut self,
        handed: Vec<(VsockConnState, UnixStream)>,
        now: Instant,
    ) -> Result<(), String> {
        self.close_all();
        if handed.len() > MAX_CONNECTIONS {
            return Err(format!(
                "{} connections handed over, at most {MAX_CONNECTIONS}",
                handed.len()
            ));
        }
        for (state, stream) in handed {
            let conn = Connection::restore(stream, self.guest_cid, &state, now).map_err(|why| {
                format!("connection {}:{}: {why}", state.local_port, state.peer_port)
            })?;
            let key = conn.key();
            if self.connections.contains_key(&key) {
                return Err(format!("connection {key:?} handed over twice"));
            }
            self.by_fd.insert(conn.fd(), key);
            self.connections.insert(key, conn);
        }
        // New host-initiated connections take ports after the ones handed over.
        if let Some(last) = self
            .connections
            .keys()
            .map(|k| k.local_port)
            .filter(|&p| p >= FIRST_LOCAL_PORT)
            .max()
        {
            self.next_local_port = last.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
        }
        Ok(())
    }

    /// Every host socket with the events to watch it for; None: do not watch it (it hung up,
    /// and epoll would report it on every wait).
    pub fn sockets(&self) -> impl Iterator<Item = (RawFd, Option<EventSet>)> + '_ {
        let handshakes = self.handshakes.keys().map(|&fd| (fd, Some(EventSet::IN)));
        let conns = self
            .connections
            .values()
            .map(|c| (c.fd(), (!c.hung_up()).then(|| c.interest())));
        handshakes.chain(conns)
    }

    /// Sockets to close once the event loop stops watching them.
    pub fn take_retired(&mut self) -> Vec<UnixStream> {
        std::mem::take(&mut self.retired)
    }

    /// A connection, for tests and counters.
    #[cfg(test)]
    pub fn connection(&self, key: ConnKey) -> Option<&Connection> {
        self.connections.get(&key)
    }
}

impl Drop for UnixBackend {
    fn drop(&mut self) {
        // The socket file is ours: leave no stale path that would stop the next bind. A file
        // someone else has put there since is not ours to remove.
        let ours = !self.handed_over.load(Ordering::SeqCst)
            && std::fs::symlink_metadata(&self.uds_path)
                .is_ok_and(|m| (m.dev(), m.ino()) == self.uds_inode);
        if ours {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

/// `CONNECT <port>` (the newline already stripped), as Firecracker's host side speaks it.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim();
    port.parse().ok()
}

/// Connects to a Unix socket without ever blocking: a listener whose backlog is full refuses
/// (EAGAIN) instead of stalling the event loop.
pub fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long for a Unix address",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes; `socket` is open.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests;
