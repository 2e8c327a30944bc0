//! The migration stream: frames (`type: u8`, `length: u32 LE`, payload), each type with its own
//! bound on the length; the handshake and its HMAC; the endpoints (TCP or Unix socket); and the
//! CPUID compatibility check. Everything read from the stream is untrusted: a frame longer than
//! its type allows is refused before its payload is read, and a payload is read as it arrives (a
//! length prefix alone never makes the reader allocate).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use hmac::{Hmac, Mac};
use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

/// The stream format this lockstep speaks.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a guest page on the wire.
pub const PAGE: usize = 4096;
/// How long a side waits actively for the peer's next frame before it blocks (see
/// [`AwaitInput`]): longer than the source takes from its last round to its pause and the
/// machine state, so that neither side sleeps through the switch.
pub const SWITCH_SPIN: Duration = Duration::from_millis(5);
/// Most pages in one `Pages` frame.
pub const MAX_PAGES_PER_FRAME: usize = 256;
/// Bytes of the destination's nonce and of the MAC.
pub const NONCE_BYTES: usize = 32;
/// Longest handshake accepted (the config, regions and CPUID take a few KiB).
const MAX_HANDSHAKE: u32 = 1 << 20;
/// Longest reason in a `Refuse` or `Abort` frame.
const MAX_REASON: u32 = 4096;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Destination to source: the nonce the MAC covers.
    Hello = 1,
    /// Source to destination: the MAC, then the handshake (JSON).
    Auth = 2,
    /// Destination: the handshake is accepted; pages may come. One byte 1: the same-host path
    /// the source offered is taken (`Fds` comes next, then a second, empty `Accept`).
    Accept = 3,
    /// Destination: refused, with the reason (UTF-8).
    Refuse = 4,
    /// Source: a first page number (u64 LE) and whole pages.
    Pages = 5,
    /// Source: a first page number and a count (u64 LE each) of pages that are all zeros.
    Zero = 6,
    /// Source: the end of a pre-copy round (its number, u32 LE).
    RoundEnd = 7,
    /// Source: the machine state, as a snapshot state file.
    State = 8,
    /// Destination: the state is loaded; waiting for `Go`.
    Ready = 9,
    /// Source: the VM is the destination's now; one byte, 1 to run it, 0 to keep it paused
    /// (it was paused on the source). The source will never resume its own.
    Go = 10,
    /// Destination: the VM runs here.
    Running = 11,
    /// Either side: giving up, with the reason (UTF-8).
    Abort = 12,
    /// Source, same host only: the guest memory regions (address and length, u64 LE each), one
    /// memfd for each passed with the frame (SCM_RIGHTS), then the taps of the network
    /// interfaces in config order. See `migration::local`.
    Fds = 13,
    /// Source, same host only, right after `State` when the destination took it (`Accept`
    /// `[1, 1]`): the open vsock connections' states with their host sockets, and the console
    /// client's socket (SCM_RIGHTS). See `migration::connections`.
    Conns = 14,
    /// Fault tolerance, primary: an epoch's checkpoint is whole (its number, u64 LE, then the
    /// machine state as a snapshot state file); the `Pages` and `Zero` frames since the last
    /// one are its memory. See `ft`.
    Checkpoint = 15,
    /// Fault tolerance, secondary: the checkpoint of that epoch (u64 LE) is applied; then the
    /// secondary's heartbeat timeout in milliseconds (u64 LE; absent: the primary's own).
    Ack = 16,
    /// Fault tolerance, either side: still here (empty).
    Heartbeat = 17,
    /// Fault tolerance, primary: a drive's full copy begins (the drive's index in the config,
    /// u32 LE, and the image's size, u64 LE).
    DiskBegin = 18,
    /// Fault tolerance, primary: bytes of a drive's image in its full copy (index u32 LE,
    /// offset u64 LE, the bytes).
    DiskChunk = 19,
    /// Fault tolerance, primary: a 4 KiB block a guest write touched in this epoch (index u32
    /// LE, block number u64 LE, its bytes: fewer for the short last block of an image).
    DiskBlock = 20,
    /// Fault tolerance, primary: a planned failover; the checkpoint just sent is the last, the
    /// primary stays paused, and the secondary takes over and answers `Running` (empty).
    Failover = 21,
    /// Fault tolerance, old primary, after `Running` of a planned failover: where to pair
    /// again with the roles switched (an [`FtStandby`](lockstep_api::migration::FtStandby) as
    /// JSON: this host's listener for the VM and its token).
    Rejoin = 22,
}

impl Kind {
    /// The frame type for a byte, if there is one.
    pub fn from_u8(byte: u8) -> Option<Kind> {
        use Kind::*;
        Some(match byte {
            1 => Hello,
            2 => Auth,
            3 => Accept,
            4 => Refuse,
            5 => Pages,
            6 => Zero,
            7 => RoundEnd,
            8 => State,
            9 => Ready,
            10 => Go,
            11 => Running,
            12 => Abort,
            13 => Fds,
            14 => Conns,
            15 => Checkpoint,
            16 => Ack,
            17 => Heartbeat,
            18 => DiskBegin,
            19 => DiskChunk,
            20 => DiskBlock,
            21 => Failover,
            22 => Rejoin,
            _ => return None,
        })
    }

    /// The longest payload a frame of this type may have.
    pub fn max_len(self) -> u32 {
        match self {
            Kind::Hello => NONCE_BYTES as u32,
            Kind::Auth => NONCE_BYTES as u32 + MAX_HANDSHAKE,
            Kind::Refuse | Kind::Abort | Kind::Rejoin => MAX_REASON,
            Kind::Pages => (8 + MAX_PAGES_PER_FRAME * PAGE) as u32,
            Kind::Zero => 16,
            Kind::RoundEnd => 4,
            Kind::State => crate::vm::snapshot::MAX_STATE_FILE as u32,
            Kind::Checkpoint => 8 + crate::vm::snapshot::MAX_STATE_FILE as u32,
            Kind::Ack => 16,
            Kind::DiskBegin => 12,
            Kind::DiskChunk => {
                12 + lockstep_devices::virtio::block::replica::FULL_COPY_CHUNK as u32
            }
            Kind::DiskBlock => {
                12 + lockstep_devices::virtio::block::replica::REPLICA_BLOCK_SIZE as u32
            }
            Kind::Go => 1,
            Kind::Accept => 2,
            Kind::Conns => super::connections::MAX_CONNS_BYTES,
            Kind::Fds => (16 * super::local::MAX_REGIONS) as u32,
            Kind::Ready | Kind::Running | Kind::Heartbeat | Kind::Failover => 0,
        }
    }
}

/// Why a stream could not be read or was refused.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The stream ended in the middle of something.
    #[error("the stream is truncated: {0}")]
    Truncated(String),
    /// A frame type this lockstep does not know.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A frame longer than its type allows.
    #[error("a {kind:?} frame of {len} bytes (at most {max})")]
    TooLong {
        /// Its type.
        kind: Kind,
        /// Its claimed length.
        len: u32,
        /// The bound.
        max: u32,
    },
    /// A frame that does not belong here.
    #[error("expected {expected}, got a {got:?} frame")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: Kind,
    },
    /// A frame whose payload is malformed.
    #[error("a malformed {kind:?} frame: {why}")]
    Malformed {
        /// Its type.
        kind: Kind,
        /// What is wrong.
        why: String,
    },
    /// The source does not hold the token.
    #[error("authentication failed: the stream's MAC does not match the token")]
    BadMac,
    /// The peer refused or gave up, with its reason.
    #[error("the peer refused: {0}")]
    Refused(String),
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its type.
    pub kind: Kind,
    /// Its payload, no longer than the type allows.
    pub payload: Vec<u8>,
}

/// Writes one frame (its header and payload in one buffer when small).
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= kind.max_len())
        .ok_or_else(|| io::Error::other(format!("a {kind:?} frame too long to send")))?;
    let mut header = [0u8; 5];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&header)?;
    w.write_all(payload)
}

/// Reads one frame, refusing unknown types and lengths above the type's bound before the
/// payload is read; the payload buffer grows only as bytes arrive.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => {
                return Err(ProtocolError::Truncated(
                    "the connection closed between frames".into(),
                ))
            }
            Ok(0) => {
                return Err(ProtocolError::Truncated(
                    "the connection closed inside a frame header".into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let kind = Kind::from_u8(header[0]).ok_or(ProtocolError::UnknownType(header[0]))?;
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    if len > kind.max_len() {
        return Err(ProtocolError::TooLong {
            kind,
            len,
            max: kind.max_len(),
        });
    }
    let mut payload = Vec::with_capacity((len as usize).min(64 << 10));
    r.take(u64::from(len)).read_to_end(&mut payload)?;
    if payload.len() != len as usize {
        return Err(ProtocolError::Truncated(format!(
            "a {kind:?} frame has {} of its {len} bytes",
            payload.len()
        )));
    }
    Ok(Frame { kind, payload })
}

/// Reads a frame and refuses anything but `kind`; `Refuse` and `Abort` become their reason.
pub fn expect_frame(
    r: &mut impl Read,
    kind: Kind,
    expected: &'static str,
) -> Result<Vec<u8>, ProtocolError> {
    let frame = read_frame(r)?;
    match frame.kind {
        k if k == kind => Ok(frame.payload),
        Kind::Refuse | Kind::Abort => Err(ProtocolError::Refused(reason_text(&frame.payload))),
        got => Err(ProtocolError::Unexpected { expected, got }),
    }
}

/// A peer's reason as text (invalid UTF-8 replaced, control characters dropped).
pub fn reason_text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload)
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

/// A reason cut to what a `Refuse` or `Abort` frame holds.
pub fn reason_bytes(reason: &str) -> &[u8] {
    let mut end = reason.len().min(MAX_REASON as usize);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason.as_bytes()[..end]
}

/// A page-number and count pair (a `Zero` frame), or a page number (the head of `Pages`).
pub fn read_u64(payload: &[u8], at: usize) -> Option<u64> {
    let word: [u8; 8] = payload.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(word))
}

/// One CPUID entry as the handshake carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf.
    pub function: u32,
    /// Subleaf.
    pub index: u32,
    /// Registers.
    pub eax: u32,
    /// Registers.
    pub ebx: u32,
    /// Registers.
    pub ecx: u32,
    /// Registers.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> CpuidEntry {
        CpuidEntry {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

/// What the source says about the VM before any page moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// [`FORMAT_VERSION`] of the source.
    pub format: u32,
    /// The source's lockstep version.
    pub lockstep_version: String,
    /// The VM's config, as its JSON text.
    pub config: String,
    /// Guest memory regions (address, length).
    pub regions: Vec<(u64, u64)>,
    /// The CPUID the guest was given (vCPU 0's).
    pub cpuid: Vec<CpuidEntry>,
    /// The source offers to hand guest memory over as memfds instead of copying it (over a
    /// Unix socket, memory backed by memfds).
    #[serde(default)]
    pub same_host: bool,
    /// The source hands open vsock and console connections over on the same-host path, when
    /// the destination answers `Accept` `[1, 1]` (see `migration::connections`).
    #[serde(default)]
    pub connections: bool,
    /// A fault-tolerant pairing, not a move: the destination stands by as the secondary.
    #[serde(default)]
    pub ft: Option<FtHello>,
}

/// What the primary tells its secondary about the pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FtHello {
    /// The pair's id in the arbiter.
    pub pair: String,
    /// The primary's host id (the record's `live` while it is).
    pub primary: String,
    /// Milliseconds between checkpoints.
    pub epoch_ms: u64,
    /// The primary's end of the second heartbeat path (see `ft::beacon`), if it has one.
    #[serde(default)]
    pub heartbeat: Option<String>,
    /// The size in bytes of each drive's image, in the config's order: a secondary creates an
    /// image it was told to keep (`drive_overrides`) and does not have yet at this size.
    #[serde(default)]
    pub drive_sizes: Vec<u64>,
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 under `token` over `nonce || handshake` (None only if the HMAC crate refused
/// the key, which it does for no length).
pub fn mac(token: &str, nonce: &[u8], handshake: &[u8]) -> Option<[u8; 32]> {
    let mut m = <HmacSha256 as Mac>::new_from_slice(token.as_bytes()).ok()?;
    m.update(nonce);
    m.update(handshake);
    Some(m.finalize().into_bytes().into())
}

/// Checks a MAC in constant time.
pub fn verify_mac(token: &str, nonce: &[u8], handshake: &[u8], tag: &[u8]) -> bool {
    let Ok(mut m) = <HmacSha256 as Mac>::new_from_slice(token.as_bytes()) else {
        return false;
    };
    m.update(nonce);
    m.update(handshake);
    m.verify_slice(tag).is_ok()
}

/// Splits an `Auth` payload into its MAC and handshake, checks the MAC, and decodes the
/// handshake only then.
pub fn open_auth(token: &str, nonce: &[u8], payload: &[u8]) -> Result<Handshake, ProtocolError> {
    if payload.len() < NONCE_BYTES {
        return Err(ProtocolError::Malformed {
            kind: Kind::Auth,
            why: "shorter than its MAC".into(),
        });
    }
    let (tag, handshake) = payload.split_at(NONCE_BYTES);
    if !verify_mac(token, nonce, handshake, tag) {
        return Err(ProtocolError::BadMac);
    }
    serde_json::from_slice(handshake).map_err(|e| ProtocolError::Malformed {
        kind: Kind::Auth,
        why: format!("handshake: {e}"),
    })
}

/// Bits the guest sees that are not host features: set by the kernel from CR4, or by lockstep
/// for the VM's topology (`x86_64::cpuid`); (leaf, subleaf, register index 0..4 = eax..edx,
/// mask).
const DYNAMIC_BITS: &[(u32, u32, usize, u32)] = &[
    (1, 0, 2, 1 << 27),          // OSXSAVE
    (7, 0, 2, 1 << 4),           // OSPKE
    (1, 0, 3, 1 << 28),          // HTT: more than one logical processor
    (0x8000_0001, 0, 2, 1 << 1), // CmpLegacy (AMD topology)
];

/// Feature registers compared bit by bit: (leaf, subleaf, register indexes).
const FEATURE_REGS: &[(u32, u32, &[usize])] = &[
    (1, 0, &[2, 3]),
    (7, 0, &[1, 2, 3]),
    (7, 1, &[0]),
    (0xd, 1, &[0]),
    (0x8000_0001, 0, &[2, 3]),
];

fn regs(e: &CpuidEntry) -> [u32; 4] {
    [e.eax, e.ebx, e.ecx, e.edx]
}

/// Checks that the CPUID a guest was given can be given here: the same vendor, and every
/// feature bit it sees among this host's supported ones. The error names the leaf, register and
/// bits.
pub fn cpuid_compatible(guest: &[CpuidEntry], supported: &[CpuidEntry]) -> Result<(), String> {
    let find = |set: &[CpuidEntry], f: u32, i: u32| {
        set.iter()
            .find(|e| e.function == f && (e.index == i || f != 7 && f != 0xd))
            .copied()
    };
    if let (Some(g), Some(h)) = (find(guest, 0, 0), find(supported, 0, 0)) {
        if (g.ebx, g.ecx, g.edx) != (h.ebx, h.ecx, h.edx) {
            return Err("the guest's CPU vendor is not this host's".into());
        }
    }
    const NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];
    for &(leaf, sub, which) in FEATURE_REGS {
        let Some(g) = find(guest, leaf, sub) else {
            continue;
        };
        let h = find(supported, leaf, sub)
            .map(|h| regs(&h))
            .unwrap_or([0; 4]);
        let g = regs(&g);
        for &r in which {
            let dynamic: u32 = DYNAMIC_BITS
                .iter()
                .filter(|d| d.0 == leaf && d.1 == sub && d.2 == r)
                .map(|d| d.3)
                .fold(0, |a, b| a | b);
            let missing = g[r] & !h[r] & !dynamic;
            if missing != 0 {
                return Err(format!(
                    "CPUID leaf {leaf:#x} subleaf {sub} {}: feature bits {missing:#x} the guest sees are not supported on this host (guest {:#x}, host {:#x})",
                    NAMES[r], g[r], h[r]
                ));
            }
        }
    }
    Ok(())
}

/// Where a migration stream goes or is listened for: `HOST:PORT` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `HOST:PORT` (an IP address and port) or `unix:/absolute/path`.
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!("{text:?}: a Unix socket path must be absolute"));
            }
            return Ok(Endpoint::Unix(path));
        }
        text.parse::<SocketAddr>()
            .map(Endpoint::Tcp)
            .map_err(|_| format!("{text:?} is neither IP:PORT nor unix:/path"))
    }

    /// Connects, waiting at most `timeout`.
    pub fn connect(&self, timeout: Duration) -> io::Result<Conn> {
        match self {
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, timeout)?;
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }
            Endpoint::Unix(path) => Ok(Conn::Unix(UnixStream::connect(path)?)),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A migration connection.
#[derive(Debug)]
pub enum Conn {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Conn {
    /// Bounds every read and write.
    pub fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
        }
    }

    /// This side's IP address on a TCP connection (none on a Unix socket).
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Conn::Tcp(s) => s.local_addr().ok().map(|a| a.ip()),
            Conn::Unix(_) => None,
        }
    }

    /// Bounds every read (writes keep theirs).
    pub fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(timeout)),
            Conn::Unix(s) => s.set_read_timeout(Some(timeout)),
        }
    }

    /// Closes both directions (a blocked reader or writer then returns).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }
}

/// A stream whose reader can wait actively for input that is due very soon.
pub trait AwaitInput: Read {
    /// Returns once input is there or `spin` has passed; does nothing by default.
    fn await_input(&self, _spin: Duration) {}
}

impl AwaitInput for &[u8] {}

impl AwaitInput for Conn {
    /// Looks for input, giving up the CPU between looks, for at most `spin`; the read that
    /// follows blocks as usual if none came. Used where the peer answers within a millisecond
    /// or so (the switch): a thread asleep in a blocking read can take far longer than that
    /// to be woken on a busy host.
    fn await_input(&self, spin: Duration) {
        let fd = match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        };
        let start = std::time::Instant::now();
        loop {
            let mut look = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call; a zero timeout.
            let ready = unsafe { libc::poll(&mut look, 1, 0) };
            if ready != 0 || start.elapsed() >= spin {
                return;
            }
            std::thread::yield_now();
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(kind: u8, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Zero, &[1; 16]).unwrap();
        write_frame(&mut buf, Kind::Go, &[1]).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap().payload, vec![1; 16]);
        assert_eq!(read_frame(&mut r).unwrap().kind, Kind::Go);
        assert!(matches!(
            read_frame(&mut r),
            Err(ProtocolError::Truncated(_))
        ));
    }

    #[test]
    fn lengths_above_the_types_bound_are_refused_before_reading() {
        // A State frame claiming 4 GiB, with nothing behind it.
        let bytes = frame_bytes(Kind::State as u8, u32::MAX, &[]);
        assert!(matches!(
            read_frame(&mut &bytes[..]),
            Err(ProtocolError::TooLong {
                kind: Kind::State,
                ..
            })
        ));
        let bytes = frame_bytes(Kind::Go as u8, 2, &[0, 0]);
        assert!(matches!(
            read_frame(&mut &bytes[..]),
            Err(ProtocolError::TooLong { .. })
        ));
        let bytes = frame_bytes(Kind::Pages as u8, (8 + 257 * PAGE) as u32, &[]);
        assert!(read_frame(&mut &bytes[..]).is_err());
        assert!(write_frame(&mut Vec::new(), Kind::Hello, &[0; 33]).is_err());
    }

    #[test]
    fn unknown_types_and_truncated_frames_are_refused() {
        assert!(matches!(
            read_frame(&mut &frame_bytes(99, 0, &[])[..]),
            Err(ProtocolError::UnknownType(99))
        ));
        assert!(matches!(
            read_frame(&mut &[5u8, 0, 0][..]),
            Err(ProtocolError::Truncated(_))
        ));
        let cut = frame_bytes(Kind::Pages as u8, 8 + PAGE as u32, &[0; 100]);
        assert!(matches!(
            read_frame(&mut &cut[..]),
            Err(ProtocolError::Truncated(_))
        ));
    }

    #[test]
    fn refusals_carry_their_reason() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Refuse, b"no room\n").unwrap();
        match expect_frame(&mut &buf[..], Kind::Accept, "Accept") {
            Err(ProtocolError::Refused(why)) => assert_eq!(why, "no room"),
            other => panic!("{other:?}"),
        }
        let long = "x".repeat(10_000);
        assert_eq!(reason_bytes(&long).len(), MAX_REASON as usize);
    }

    fn handshake() -> Vec<u8> {
        serde_json::to_vec(&Handshake {
            format: FORMAT_VERSION,
            lockstep_version: "1".into(),
            config: "{}".into(),
            regions: vec![(0, 4096)],
            cpuid: vec![],
            same_host: false,
            connections: false,
            ft: None,
        })
        .unwrap()
    }

    #[test]
    fn the_mac_binds_token_nonce_and_handshake() {
        let hs = handshake();
        let nonce = [7u8; NONCE_BYTES];
        let mut auth = mac("token", &nonce, &hs).unwrap().to_vec();
        auth.extend_from_slice(&hs);
        assert!(open_auth("token", &nonce, &auth).is_ok());
        assert!(matches!(
            open_auth("other", &nonce, &auth),
            Err(ProtocolError::BadMac)
        ));
        assert!(matches!(
            open_auth("token", &[8u8; NONCE_BYTES], &auth),
            Err(ProtocolError::BadMac)
        ));
        let mut changed = auth.clone();
        let last = changed.len() - 2;
        changed[last] ^= 1;
        assert!(matches!(
            open_auth("token", &nonce, &changed),
            Err(ProtocolError::BadMac)
        ));
        assert!(open_auth("token", &nonce, &auth[..10]).is_err());
    }

    fn leaf(function: u32, index: u32, r: [u32; 4]) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
        }
    }

    #[test]
    fn cpuid_needs_every_feature_bit_here() {
        let host = vec![leaf(0, 0, [0xd, 1, 2, 3]), leaf(1, 0, [0, 0, 0b0110, 0xff])];
        let mut guest = host.clone();
        assert!(cpuid_compatible(&guest, &host).is_ok());
        guest[1].ecx |= 1 << 27; // OSXSAVE: the kernel's, allowed
        assert!(cpuid_compatible(&guest, &host).is_ok());
        guest[1].ecx |= 1;
        let why = cpuid_compatible(&guest, &host).unwrap_err();
        assert!(why.contains("leaf 0x1") && why.contains("ecx"), "{why}");
        let mut other_vendor = host.clone();
        other_vendor[0].ebx = 9;
        assert!(cpuid_compatible(&other_vendor, &host).is_err());
        let extra = vec![leaf(7, 0, [0, 1, 0, 0])];
        assert!(cpuid_compatible(&extra, &host).is_err());
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("127.0.0.1:5000").unwrap(),
            Endpoint::Tcp("127.0.0.1:5000".parse().unwrap())
        );
        assert_eq!(
            Endpoint::parse("unix:/tmp/m.sock").unwrap(),
            Endpoint::Unix("/tmp/m.sock".into())
        );
        assert!(Endpoint::parse("unix:rel").is_err());
        assert!(Endpoint::parse("example.com:80").is_err());
    }
}
