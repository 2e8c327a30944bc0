//! Same-host migration of open connections: the vsock device's connections (their state and
//! host sockets) and the console socket's client go to the destination at the switch, so that
//! host programs and the person at the console keep their sessions.
//!
//! Offered in the handshake (`Handshake::connections`, under the HMAC) and taken with a second
//! byte in the same-host `Accept` (`[1, 1]`), so that either side may be an older lockstep. The
//! source sends one `Conns` frame right after the machine state, while the VM is paused (its
//! device loop reads no socket then): the connections' states (bincode) with their streams
//! attached (SCM_RIGHTS), then the console client's stream if one is connected. The destination
//! reads it with `recvmsg`, wraps every descriptor at once (closed on any error), and checks the
//! count against the frame and [`MAX_CONN_FDS`] and each descriptor: a connected Unix stream
//! socket. The source keeps its own descriptors: if the switch fails before `Go`, its VM resumes
//! with its connections as they were.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use lockstep_devices::virtio::vsock::VsockConnState;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::protocol::{Conn, Kind};

/// Most vsock connections one `Conns` frame hands over (SCM_RIGHTS carries at most 253
/// descriptors in one message; one more is the console client's).
pub const MAX_VSOCK_CONNS: usize = 200;
/// Most descriptors one `Conns` frame carries.
pub const MAX_CONN_FDS: usize = MAX_VSOCK_CONNS + 1;
/// Most console input handed over (what the console holds for a guest that does not read).
pub const MAX_CONSOLE_INPUT: usize = 1 << 20;
/// Longest `Conns` payload: every connection's state with a full transmit buffer, and the
/// console's input.
pub const MAX_CONNS_BYTES: u32 = (MAX_VSOCK_CONNS
    * (lockstep_devices::virtio::vsock::TX_BUF_SIZE as usize + 256)
    + MAX_CONSOLE_INPUT
    + 64) as u32;

/// What a same-host source hands over at the switch.
#[derive(Debug, Default)]
pub struct HandedConnections {
    /// The vsock device's open connections with their host sockets.
    pub vsock: Vec<(VsockConnState, UnixStream)>,
    /// The console socket's connected client.
    pub console: Option<UnixStream>,
    /// What the console client typed that had not reached the guest yet.
    pub console_input: Vec<u8>,
}

/// [`HandedConnections`] as a VM's reply carries them (compared by identity).
#[derive(Debug, Clone)]
pub struct SharedConnections(pub std::sync::Arc<HandedConnections>);

impl PartialEq for SharedConnections {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedConnections {}

/// The `Conns` frame's payload; the descriptors follow in this order: the vsock connections',
/// then the console client's.
#[derive(Debug, Serialize, Deserialize)]
struct ConnsPayload {
    vsock: Vec<VsockConnState>,
    console: bool,
    console_input: Vec<u8>,
}

/// Why connections could not be handed over, or handed-over ones were refused.
#[derive(Debug, Error)]
pub enum ConnsError {
    /// The same-host path needs a Unix socket.
    #[error("not over a Unix socket")]
    NotUnix,
    /// More connections than one frame carries.
    #[error("{0} open vsock connections, at most {MAX_VSOCK_CONNS} can be handed over")]
    TooMany(usize),
    /// The states could not be encoded or decoded.
    #[error("the connections' state: {0}")]
    Encoding(String),
    /// Sending or receiving failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the socket said.
        #[source]
        source: io::Error,
    },
    /// The connection closed first.
    #[error("the connection closed before the open connections came")]
    Closed,
    /// Another frame came.
    #[error("expected the open connections, got frame type {0}")]
    Unexpected(u8),
    /// A frame longer than a `Conns` frame may be.
    #[error("a Conns frame of {0} bytes")]
    TooLong(u32),
    /// Not as many descriptors as the frame says.
    #[error("{got} descriptors for {vsock} vsock connections and {console} console client")]
    Count {
        /// Descriptors received.
        got: usize,
        /// Connections announced.
        vsock: usize,
        /// 1 with a console client.
        console: usize,
    },
    /// A descriptor is not a connected Unix stream socket.
    #[error("descriptor {index}: {why}")]
    Descriptor {
        /// Its place in the frame.
        index: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The destination has no vsock device but was handed connections.
    #[error("vsock connections handed over to a VM without a vsock device")]
    NoVsock,
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> ConnsError {
    move |source| ConnsError::Io { what, source }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_CONNS_BYTES as usize }>()
}

/// The source: sends the `Conns` frame with the streams attached.
pub fn send_connections(conn: &Conn, handed: &HandedConnections) -> Result<(), ConnsError> {
    let Conn::Unix(stream) = conn else {
        return Err(ConnsError::NotUnix);
    };
    if handed.vsock.len() > MAX_VSOCK_CONNS {
        return Err(ConnsError::TooMany(handed.vsock.len()));
    }
    let payload = ConnsPayload {
        vsock: handed.vsock.iter().map(|(s, _)| s.clone()).collect(),
        console: handed.console.is_some(),
        console_input: handed.console_input.clone(),
    };
    let payload = bincode::serde::encode_to_vec(&payload, bincode_config())
        .map_err(|e| ConnsError::Encoding(e.to_string()))?;
    if payload.len() > MAX_CONNS_BYTES as usize {
        return Err(ConnsError::Encoding(format!("{} bytes", payload.len())));
    }
    let fds: Vec<RawFd> = handed
        .vsock
        .iter()
        .map(|(_, s)| s.as_raw_fd())
        .chain(handed.console.as_ref().map(|s| s.as_raw_fd()))
        .collect();
    let mut header = vec![Kind::Conns as u8];
    header.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let sent = stream
        .send_with_fds(&[&header[..]], &fds)
        .map_err(|e| io_error("sending the open connections")(errno(e)))?;
    use std::io::Write;
    let mut s: &UnixStream = stream;
    s.write_all(&header[sent..])
        .and_then(|()| s.write_all(&payload))
        .map_err(io_error("sending the open connections"))
}

/// The destination: reads the `Conns` frame and its descriptors and checks them; anything
/// wrong is refused and every received descriptor closed.
pub fn receive_connections(conn: &Conn, has_vsock: bool) -> Result<HandedConnections, ConnsError> {
    let Conn::Unix(stream) = conn else {
        return Err(ConnsError::NotUnix);
    };
    let mut header = [0u8; 5];
    // One more than may come: a source that sends too many is seen, not truncated.
    let mut raw = [-1 as RawFd; MAX_CONN_FDS + 1];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, which outlives the call; any bytes are valid there.
    let (got, count) = unsafe { stream.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io_error("receiving the open connections")(errno(e)))?;
    let mut fds: Vec<OwnedFd> = raw[..count.min(raw.len())]
        .iter()
        // SAFETY: the kernel just gave us these descriptors; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Err(ConnsError::Closed);
    }
    let mut s: &UnixStream = stream;
    s.read_exact(&mut header[got..])
        .map_err(io_error("the Conns frame header"))?;
    if header[0] != Kind::Conns as u8 {
        return Err(ConnsError::Unexpected(header[0]));
    }
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    if len > MAX_CONNS_BYTES {
        return Err(ConnsError::TooLong(len));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)
        .map_err(io_error("the Conns frame"))?;
    let (payload, _): (ConnsPayload, usize) =
        bincode::serde::decode_from_slice(&payload, bincode_config())
            .map_err(|e| ConnsError::Encoding(e.to_string()))?;
    let console = usize::from(payload.console);
    if payload.vsock.len() > MAX_VSOCK_CONNS || fds.len() != payload.vsock.len() + console {
        return Err(ConnsError::Count {
            got: fds.len(),
            vsock: payload.vsock.len(),
            console,
        });
    }
    if payload.console_input.len() > MAX_CONSOLE_INPUT
        || (!payload.console && !payload.console_input.is_empty())
    {
        return Err(ConnsError::Encoding(format!(
            "{} bytes of console input",
            payload.console_input.len()
        )));
    }
    if !payload.vsock.is_empty() && !has_vsock {
        return Err(ConnsError::NoVsock);
    }
    for (index, fd) in fds.iter().enumerate() {
        check_stream(fd).map_err(|why| ConnsError::Descriptor { index, why })?;
    }
    let console = payload
        .console
        .then(|| fds.pop())
        .flatten()
        .map(UnixStream::from);
    let vsock = payload
        .vsock
        .into_iter()
        .zip(fds.into_iter().map(UnixStream::from))
        .collect();
    Ok(HandedConnections {
        vsock,
        console,
        console_input: payload.console_input,
    })
}

/// Checks that `fd` is a connected Unix stream socket.
fn check_stream(fd: &OwnedFd) -> Result<(), String> {
    let int_opt = |opt: libc::c_int| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the option writes one int into `v`, which lives on this stack.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(format!("not a socket ({})", io::Error::last_os_error()));
        }
        Ok(v)
    };
    if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX || int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("not a Unix stream socket".into());
    }
    if int_opt(libc::SO_ACCEPTCONN)? != 0 {
        return Err("a listening socket".into());
    }
    // SAFETY: an all-zero sockaddr_un is a valid value to be overwritten.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes into `addr`, which lives on this stack.
    let rc = unsafe {
        libc::getpeername(
            fd.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_un).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!("not connected ({})", io::Error::last_os_error()));
    }
    Ok(())
}

/// vmm-sys-util's error as the `io::Error` it stands for.
fn errno(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    use lockstep_devices::virtio::vsock::VsockConnPhase;

    use super::*;

    fn pair() -> (Conn, Conn) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn::Unix(a), Conn::Unix(b))
    }

    fn state(local_port: u32) -> VsockConnState {
        VsockConnState {
            local_port,
            peer_port: 5000,
            phase: VsockConnPhase::Established,
            peer_buf_alloc: 65536,
            peer_fwd_cnt: 10,
            rx_cnt: 20,
            fwd_cnt_told: 0,
            credit_requested: false,
            update_wanted: false,
            tx_data: b"queued".to_vec(),
            tx_preamble: 0,
            tx_fwd_cnt: 7,
            host_readable: false,
            host_eof: false,
            host_no_recv: false,
            host_hup: false,
            host_shut: 0,
            guest_shut: 0,
            told_guest: 0,
            reset_wanted: false,
            deadline_ms: None,
        }
    }

    /// Sends a `Conns` frame announcing `vsock` states (and a console when `console`) with
    /// `fds` attached, whatever they are.
    fn send_raw(conn: &Conn, vsock: Vec<VsockConnState>, console: bool, fds: &[RawFd]) {
        let Conn::Unix(s) = conn else { unreachable!() };
        let payload = bincode::serde::encode_to_vec(
            ConnsPayload {
                vsock,
                console,
                console_input: Vec::new(),
            },
            bincode_config(),
        )
        .unwrap();
        let mut frame = vec![Kind::Conns as u8];
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        s.send_with_fds(&[&frame[..]], fds).unwrap();
        (&*s).write_all(&payload).unwrap();
    }

    #[test]
    fn connections_and_the_console_client_are_handed_over() {
        let (a, b) = pair();
        let (mine, mut theirs) = UnixStream::pair().unwrap();
        let (console, mut person) = UnixStream::pair().unwrap();
        let handed = HandedConnections {
            vsock: vec![(state(1234), mine)],
            console: Some(console),
            console_input: b"typed ahead".to_vec(),
        };
        send_connections(&a, &handed).unwrap();
        let got = receive_connections(&b, true).unwrap();
        assert_eq!(got.vsock.len(), 1);
        assert_eq!(got.vsock[0].0, state(1234));
        assert_eq!(got.console_input, b"typed ahead");
        // The same sockets: what the far ends write arrives on the received descriptors.
        use std::io::Read;
        theirs.write_all(b"v").unwrap();
        person.write_all(b"c").unwrap();
        let mut byte = [0u8];
        (&got.vsock[0].1).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"v");
        got.console.as_ref().unwrap().read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"c");
    }

    #[test]
    fn bogus_descriptors_and_counts_are_refused() {
        let refused = |vsock: Vec<VsockConnState>, console: bool, fds: &[RawFd]| {
            let (a, b) = pair();
            send_raw(&a, vsock, console, fds);
            receive_connections(&b, true).unwrap_err().to_string()
        };
        let (good, _peer) = UnixStream::pair().unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        assert!(refused(vec![state(1)], false, &[r.as_raw_fd()]).contains("not a socket"));
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("l")).unwrap();
        assert!(refused(vec![state(1)], false, &[listener.as_raw_fd()]).contains("listening"));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(refused(vec![], true, &[udp.as_raw_fd()]).contains("not a Unix stream"));
        // SAFETY: a new socket, owned by the OwnedFd.
        let unconnected =
            unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)) };
        assert!(refused(vec![], true, &[unconnected.as_raw_fd()]).contains("not connected"));
        // Too few, too many, more than the fixed maximum.
        assert!(
            refused(vec![state(1), state(2)], false, &[good.as_raw_fd()])
                .contains("1 descriptors for 2")
        );
        assert!(refused(vec![], false, &[good.as_raw_fd()]).contains("1 descriptors for 0"));
        let many: Vec<VsockConnState> = (0..MAX_VSOCK_CONNS as u32 + 1).map(state).collect();
        assert!(refused(many, false, &[good.as_raw_fd()]).contains("descriptors for"));
        // Connections for a VM without a vsock device.
        let (a, b) = pair();
        send_raw(&a, vec![state(1)], false, &[good.as_raw_fd()]);
        assert!(matches!(
            receive_connections(&b, false),
            Err(ConnsError::NoVsock)
        ));
        // Another frame.
        let (a, b) = pair();
        let Conn::Unix(mut s) = a else { unreachable!() };
        s.write_all(&[Kind::Ready as u8, 0, 0, 0, 0]).unwrap();
        assert!(matches!(
            receive_connections(&b, true),
            Err(ConnsError::Unexpected(_))
        ));
    }
}
