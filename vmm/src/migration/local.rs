//! Same-host migration: over a Unix socket between two lockstep processes of the same user,
//! guest memory is not copied. Guest RAM is memfds mapped shared (`memory::create_guest_memory`);
//! the source passes them with SCM_RIGHTS in one `Fds` frame and the destination maps the same
//! pages, so the switch moves only vCPU and device state and does not grow with memory size.
//!
//! The source offers it in the handshake (`Handshake::same_host`, under the HMAC); the
//! destination takes it only over a Unix socket whose peer (SO_PEERCRED) runs as its own user,
//! and answers `Accept` with a 1. It then reads the `Fds` frame with its descriptors and checks
//! every one before mapping it: as many as the announced regions (at most [`MAX_FDS`]), each a
//! memfd (a shmem or hugetlbfs file whose seals can be read) of exactly its region's size with
//! its size sealed (so that the source cannot shrink it under the mapping), then answers a
//! second, empty `Accept` once the VM is built on them.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::protocol::{read_u64, Conn, Kind};
use crate::memory::{self, GuestMemoryMmap};
use crate::vm::incoming::HandedOver;

/// Most memory regions an `Fds` frame may announce (guest RAM has one or two).
pub const MAX_REGIONS: usize = 4;
/// Most descriptors one `Fds` frame may carry: the regions' memfds and the taps.
pub const MAX_FDS: usize = MAX_REGIONS + 32;

/// `statfs` magic numbers of the file systems memfds live on.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Why memory could not be handed over, or a handed-over descriptor was refused.
#[derive(Debug, Error)]
pub enum LocalError {
    /// The same-host path needs a Unix socket.
    #[error("not over a Unix socket")]
    NotUnix,
    /// The peer's credentials could not be read.
    #[error("SO_PEERCRED: {0}")]
    PeerCred(#[source] io::Error),
    /// The peer runs as another user.
    #[error("the peer (pid {pid}) runs as uid {uid}, this host as uid {me}")]
    OtherUser {
        /// The peer's process.
        pid: i32,
        /// The peer's user.
        uid: u32,
        /// This process's user.
        me: u32,
    },
    /// The VM's memory is not memfds (a restored VM maps its snapshot file).
    #[error("guest memory is not backed by memfds")]
    NotMemfds,
    /// More descriptors than one frame carries.
    #[error("{0} descriptors to pass, at most {MAX_FDS}")]
    TooManyFds(usize),
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
    #[error("the connection closed before the memory descriptors")]
    Closed,
    /// Another frame came.
    #[error("expected the memory descriptors, got frame type {0}")]
    Unexpected(u8),
    /// A frame longer than an `Fds` frame may be.
    #[error("an Fds frame of {0} bytes")]
    TooLong(u32),
    /// The announced regions are not the handshake's.
    #[error("the Fds frame's regions are not the handshake's")]
    Regions,
    /// Not as many descriptors as the regions and devices need.
    #[error(
        "{got} descriptors for {regions} memory regions, {taps} taps and {vsock} vsock socket"
    )]
    Count {
        /// Descriptors received.
        got: usize,
        /// Regions announced.
        regions: usize,
        /// Network interfaces in the config.
        taps: usize,
        /// 1 with a vsock device.
        vsock: usize,
    },
    /// A memory descriptor is not a memfd of its region's size with its size sealed.
    #[error("the descriptor for the region at {base:#x}: {why}")]
    Descriptor {
        /// The region's guest address.
        base: u64,
        /// What is wrong with it.
        why: String,
    },
    /// Mapping the memory failed.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The regions do not form guest memory.
    #[error("invalid guest memory layout: {0}")]
    Layout(#[from] vm_memory::GuestRegionCollectionError),
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> LocalError {
    move |source| LocalError::Io { what, source }
}

/// True when the source can offer the same-host path: a Unix socket, every region a memfd.
pub fn can_offer(conn: &Conn, memory: &GuestMemoryMmap) -> bool {
    matches!(conn, Conn::Unix(_)) && memory::memfds(memory).is_some()
}

/// The destination's check of the peer: a Unix socket, the same user as this process.
pub fn check_peer(conn: &Conn) -> Result<(), LocalError> {
    let Conn::Unix(stream) = conn else {
        return Err(LocalError::NotUnix);
    };
    same_user(stream)
}

/// Checks that the process at the other end of `stream` (SO_PEERCRED) runs as this process's
/// effective user.
pub fn same_user(stream: &UnixStream) -> Result<(), LocalError> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, which lives on this stack.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(LocalError::PeerCred(io::Error::last_os_error()));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid != me {
        return Err(LocalError::OtherUser {
            pid: cred.pid,
            uid: cred.uid,
            me,
        });
    }
    Ok(())
}

/// The source: sends the `Fds` frame, the regions with their memfds and the taps, in one
/// message.
pub fn send_memory(
    conn: &Conn,
    memory: &GuestMemoryMmap,
    taps: &[(String, Arc<File>)],
    vsock: Option<&File>,
) -> Result<(), LocalError> {
    let Conn::Unix(stream) = conn else {
        return Err(LocalError::NotUnix);
    };
    let mut files = memory::memfds(memory).ok_or(LocalError::NotMemfds)?;
    files.extend(taps.iter().map(|(_, f)| &**f));
    files.extend(vsock);
    if files.len() > MAX_FDS {
        return Err(LocalError::TooManyFds(files.len()));
    }
    let mut payload = Vec::with_capacity(16 * files.len());
    for region in memory.iter() {
        payload.extend_from_slice(&region.start_addr().0.to_le_bytes());
        payload.extend_from_slice(&region.len().to_le_bytes());
    }
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut frame = vec![Kind::Fds as u8];
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    let sent = stream
        .send_with_fds(&[&frame[..]], &fds)
        .map_err(|e| io_error("sending the memory descriptors")(errno(e)))?;
    if sent != frame.len() {
        // A short send of a few dozen bytes on a blocking stream: send the rest plainly (the
        // descriptors went with the first byte).
        use std::io::Write;
        let mut s: &UnixStream = stream;
        s.write_all(&frame[sent..])
            .map_err(io_error("sending the memory descriptors"))?;
    }
    Ok(())
}

/// The destination: reads the `Fds` frame and its descriptors, checks the memfds against
/// `regions` and maps them; returns the memory, the `taps` tap descriptors that followed and
/// the vsock listener when `vsock` (each checked when its device takes it: `Tap::from_passed`,
/// `UnixBackend::from_passed`). Anything else, or anything wrong, is refused; every received
/// descriptor is closed on the way out.
pub fn receive_memory(
    conn: &Conn,
    regions: &[(u64, u64)],
    taps: usize,
    vsock: bool,
) -> Result<HandedOver, LocalError> {
    let Conn::Unix(stream) = conn else {
        return Err(LocalError::NotUnix);
    };
    let mut header = [0u8; 5];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, which outlives the call; any bytes are valid there.
    let (got, count) = unsafe { stream.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io_error("receiving the memory descriptors")(errno(e)))?;
    let mut files: Vec<File> = raw[..count.min(MAX_FDS)]
        .iter()
        // SAFETY: the kernel just gave us these descriptors; nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Err(LocalError::Closed);
    }
    let mut s: &UnixStream = stream;
    s.read_exact(&mut header[got..])
        .map_err(io_error("the Fds frame header"))?;
    if header[0] != Kind::Fds as u8 {
        return Err(LocalError::Unexpected(header[0]));
    }
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    if len > Kind::Fds.max_len() {
        return Err(LocalError::TooLong(len));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)
        .map_err(io_error("the Fds frame"))?;
    let announced: Vec<(u64, u64)> = (0..payload.len() / 16)
        .filter_map(|i| Some((read_u64(&payload, 16 * i)?, read_u64(&payload, 16 * i + 8)?)))
        .collect();
    if !payload.len().is_multiple_of(16) || announced != regions {
        return Err(LocalError::Regions);
    }
    if files.len() != regions.len() + taps + usize::from(vsock) {
        return Err(LocalError::Count {
            got: files.len(),
            regions: regions.len(),
            taps,
            vsock: usize::from(vsock),
        });
    }
    let vsock = vsock.then(|| files.pop()).flatten();
    let taps = files.split_off(regions.len());
    let mut mapped = Vec::with_capacity(files.len());
    for (file, &(base, len)) in files.into_iter().zip(regions) {
        let huge = check_memfd(&file, len).map_err(|why| LocalError::Descriptor { base, why })?;
        mapped.push(memory::map_memfd(file, GuestAddress(base), len, huge)?);
    }
    let memory = GuestMemoryMmap::from_regions(mapped)?;
    Ok(HandedOver {
        memory,
        taps,
        vsock,
    })
}

/// Removes the socket file at `path` (the same-host source's console socket, in this host's
/// folder for the VM) so that the VM binds its own there once it runs here; the source's
/// console, which tracks its file, then leaves the new one alone. Anything but a socket stays.
pub fn clear_console_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!(
                "{}: cannot take the console socket over: {e}",
                path.display()
            );
        }
    }
}

/// vmm-sys-util's error as the `io::Error` it stands for.
fn errno(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// Checks that `file` is a memfd of `len` bytes whose size cannot change; returns whether it is
/// on huge pages.
fn check_memfd(file: &File, len: u64) -> Result<bool, String> {
    let meta = file.metadata().map_err(|e| format!("fstat: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() != len {
        return Err(format!("{} bytes, not {len}", meta.len()));
    }
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into `fs`.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(format!("fstatfs: {}", std::io::Error::last_os_error()));
    }
    let huge = match fs.f_type as i64 {
        TMPFS_MAGIC => false,
        HUGETLBFS_MAGIC => true,
        other => return Err(format!("not a memfd (file system {other:#x})")),
    };
    // SAFETY: F_GET_SEALS takes no argument and reads only the descriptor.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(format!(
            "not a memfd (F_GET_SEALS: {})",
            std::io::Error::last_os_error()
        ));
    }
    let needed = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    if seals & needed != needed {
        return Err("its size is not sealed".into());
    }
    if seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0 {
        return Err("it is sealed against writing".into());
    }
    Ok(huge)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::Bytes;

    use super::*;

    fn pair() -> (Conn, Conn) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn::Unix(a), Conn::Unix(b))
    }

    #[test]
    fn memory_is_handed_over_not_copied() {
        let mem = memory::create_guest_memory(16 << 20, false).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x8000)).unwrap();
        let (a, b) = pair();
        assert!(can_offer(&a, &mem));
        check_peer(&b).unwrap();
        send_memory(&a, &mem, &[], None).unwrap();
        let handed = receive_memory(&b, &memory::region_layout(&mem), 0, false).unwrap();
        assert!(handed.taps.is_empty() && handed.vsock.is_none());
        let there = handed.memory;
        assert_eq!(
            there.read_obj::<u32>(GuestAddress(0x8000)).unwrap(),
            0x1234_5678
        );
        // The same pages: a write on one side shows on the other.
        there.write_obj(7u64, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 7);
    }

    /// Sends an `Fds` frame announcing `regions` with `fds` attached.
    fn send_raw(conn: &Conn, regions: &[(u64, u64)], fds: &[RawFd]) {
        let Conn::Unix(s) = conn else { unreachable!() };
        let mut frame = vec![Kind::Fds as u8];
        frame.extend_from_slice(&(16 * regions.len() as u32).to_le_bytes());
        for (a, l) in regions {
            frame.extend_from_slice(&a.to_le_bytes());
            frame.extend_from_slice(&l.to_le_bytes());
        }
        s.send_with_fds(&[&frame[..]], fds).unwrap();
    }

    fn memfd(len: u64, seal: bool) -> File {
        // SAFETY: a NUL-terminated name; the new descriptor is owned by the File.
        let file = unsafe {
            File::from_raw_fd(libc::memfd_create(
                c"t".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            ))
        };
        file.set_len(len).unwrap();
        if seal {
            // SAFETY: F_ADD_SEALS on our own descriptor.
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, memory::MEMFD_SEALS) };
        }
        file
    }

    #[test]
    fn bogus_descriptors_are_refused() {
        let regions = [(0u64, 1u64 << 20)];
        let refused = |regions_sent: &[(u64, u64)], fds: &[RawFd]| {
            let (a, b) = pair();
            send_raw(&a, regions_sent, fds);
            receive_memory(&b, &regions, 0, false)
                .unwrap_err()
                .to_string()
        };
        let good = memfd(1 << 20, true);
        // A regular file of the right size.
        let mut plain = tempfile::tempfile().unwrap();
        plain.write_all(&vec![0; 1 << 20]).unwrap();
        let why = refused(&regions, &[plain.as_raw_fd()]);
        assert!(why.contains("not a memfd"), "{why}");
        // The wrong size, an unsealed memfd, a pipe.
        let why = refused(&regions, &[memfd(2 << 20, true).as_raw_fd()]);
        assert!(why.contains("not 1048576"), "{why}");
        let why = refused(&regions, &[memfd(1 << 20, false).as_raw_fd()]);
        assert!(why.contains("not sealed"), "{why}");
        let (r, _w) = std::io::pipe().unwrap();
        assert!(refused(&regions, &[r.as_raw_fd()]).contains("not a regular file"));
        // Too few, too many, other regions than announced.
        assert!(refused(&regions, &[]).contains("0 descriptors"));
        let many: Vec<RawFd> = vec![good.as_raw_fd(); MAX_FDS + 2];
        assert!(receive_many_is_refused(&regions, &many));
        assert!(refused(&[(4096, 1 << 20)], &[good.as_raw_fd()]).contains("not the handshake's"));
        // And the good one passes.
        let (a, b) = pair();
        send_raw(&a, &regions, &[good.as_raw_fd()]);
        receive_memory(&b, &regions, 0, false).unwrap();
    }

    fn receive_many_is_refused(regions: &[(u64, u64)], fds: &[RawFd]) -> bool {
        let (a, b) = pair();
        send_raw(&a, regions, fds);
        receive_memory(&b, regions, 0, false).is_err()
    }

    #[test]
    fn other_frames_are_refused() {
        let (a, b) = pair();
        let Conn::Unix(mut s) = a else { unreachable!() };
        s.write_all(&[Kind::State as u8, 0, 0, 0, 0]).unwrap();
        assert!(receive_memory(&b, &[(0, 4096)], 0, false)
            .unwrap_err()
            .to_string()
            .contains("expected the memory descriptors"));
        let (a, b) = pair();
        drop(a);
        assert!(receive_memory(&b, &[(0, 4096)], 0, false).is_err());
    }
}
