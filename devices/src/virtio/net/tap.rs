//! The host side of a virtio-net device: a tap interface opened by name, in non-blocking mode
//! and with a virtio-net header in front of every frame, so checksum and segmentation offloads
//! pass between the guest and the host stack unchanged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

use super::frame::VNET_HDR_LEN;

const TUNTAP: std::os::raw::c_uint = 0x54;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, std::os::raw::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, std::os::raw::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, std::os::raw::c_int);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, std::os::raw::c_uint);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// Interface names are at most 15 bytes and a NUL.
const IFNAMSIZ: usize = 16;

/// TUNSETOFFLOAD: the tap may hand us frames whose checksum is left to the receiver.
pub const TUN_F_CSUM: u32 = 0x01;
/// TUNSETOFFLOAD: the tap may hand us TCP/IPv4 frames of up to 64 KiB (needs `TUN_F_CSUM`).
pub const TUN_F_TSO4: u32 = 0x02;
/// TUNSETOFFLOAD: the tap may hand us TCP/IPv6 frames of up to 64 KiB (needs `TUN_F_CSUM`).
pub const TUN_F_TSO6: u32 = 0x04;

/// Why a tap could not be opened or configured; every message names the tap.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("{name:?} is not a tap device name: {reason}")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// /dev/net/tun or TUNSETIFF refused (no such device and no right to create it, the tap is
    /// in use by another process, ...).
    #[error("cannot open tap device {name}: {source}")]
    Open {
        /// The tap.
        name: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// An ioctl on the open tap failed.
    #[error("cannot {what} on tap device {name}: {source}")]
    Configure {
        /// The tap.
        name: String,
        /// What was being set.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags at the start of the union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _rest: [u8; 22],
}

/// An open tap device. Reads return one frame, writes send one frame, both with a
/// `virtio_net_hdr_v1` (12 bytes) in front.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Takes a tap another lockstep process opened and passed over a Unix socket (a same-host
    /// migration), after checking with TUNGETIFF that it is the tap `name` opened as [`Tap::open`]
    /// opens taps (a tap, no packet information, with the vnet header).
    pub fn from_passed(file: File, name: &str) -> Result<Tap, TapError> {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _rest: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq`; `req` has its layout and size (40 bytes)
        // and lives for the duration of the call.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, TUNGETIFF(), &mut req) };
        if rc < 0 {
            return Err(TapError::Open {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if &req.name[..len] != name.as_bytes() || req.flags & wanted != wanted {
            return Err(TapError::BadName {
                name: name.to_string(),
                reason: "the descriptor handed over is not this tap, opened with a vnet header",
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// Another descriptor on this tap, to hand it to another process.
    pub fn try_clone_file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Attaches to the tap interface `name` (the kernel creates a non-persistent one if it does
    /// not exist and the process may), with a 12-byte vnet header and no offloads yet.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let bad = |reason| TapError::BadName {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() >= IFNAMSIZ {
            return Err(bad("interface names are at most 15 bytes"));
        }
        if name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b == b'%' || b.is_ascii_whitespace())
        {
            // '%' would make the kernel pick a fresh name instead of opening this one.
            return Err(bad("it contains a NUL, '/', '%' or whitespace"));
        }
        let open_err = |source| TapError::Open {
            name: name.to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(open_err)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _rest: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a `struct ifreq`; `req` has its layout and size (40 bytes) and
        // lives for the duration of the call.
        let rc = unsafe { ioctl_with_ref(&file, TUNSETIFF(), &req) };
        if rc < 0 {
            return Err(open_err(std::io::Error::last_os_error()));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let hdr_len = VNET_HDR_LEN as std::os::raw::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `hdr_len` is.
        let rc = unsafe { ioctl_with_ref(&tap.file, TUNSETVNETHDRSZ(), &hdr_len) };
        if rc < 0 {
            return Err(tap.configure_error("set the vnet header size"));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn configure_error(&self, what: &'static str) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source: std::io::Error::last_os_error(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloaded frames (`TUN_F_*`) the reader of this tap accepts.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let rc = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), libc::c_ulong::from(flags)) };
        if rc < 0 {
            return Err(self.configure_error("set offloads"));
        }
        Ok(())
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        retry_interrupted(|| (&self.file).read(buf))
    }

    /// Reads one frame (vnet header first) into the buffers `iovecs` describe, in order;
    /// `WouldBlock` when there is none. Returns the frame's full length, which is larger than
    /// the buffers when the frame was cut to fit.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for writes for the whole call and that
    /// nothing else treats as initialised Rust data (guest memory qualifies: the guest owns it).
    pub unsafe fn read_into(&self, iovecs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller vouches for the buffers.
        unsafe { self.vectored(libc::readv, iovecs) }
    }

    /// Sends one frame gathered from the buffers `iovecs` describe, in order (vnet header
    /// first); `WouldBlock` when the tap cannot take it now.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for reads for the whole call (guest
    /// memory qualifies: the kernel copies it, and a guest that changes it meanwhile only
    /// changes what it sends).
    pub unsafe fn write_from(&self, iovecs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller vouches for the buffers.
        unsafe { self.vectored(libc::writev, iovecs) }
    }

    /// `readv` or `writev` (`call`) on the tap, retried when interrupted.
    ///
    /// # Safety
    ///
    /// As [`Tap::read_into`] for `readv`, [`Tap::write_from`] for `writev`.
    unsafe fn vectored(
        &self,
        call: unsafe extern "C" fn(libc::c_int, *const libc::iovec, libc::c_int) -> libc::ssize_t,
        iovecs: &[libc::iovec],
    ) -> std::io::Result<usize> {
        let count = libc::c_int::try_from(iovecs.len())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        retry_interrupted(|| {
            // SAFETY: the caller vouches for the buffers; the pointer and count describe the
            // iovec array, which outlives the call.
            let n = unsafe { call(self.file.as_raw_fd(), iovecs.as_ptr(), count) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        })
    }

    /// Sends one frame (header included); `WouldBlock` when the tap cannot take it now.
    pub fn write(&self, frame: &[u8]) -> std::io::Result<usize> {
        retry_interrupted(|| (&self.file).write(frame))
    }

    /// A second handle on the same tap (a duplicated descriptor).
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// A tap stand-in for tests: our end of a non-blocking datagram pair, and the host's end.
    /// Our end's send buffer holds only a few frames, so the "tap" fills up.
    #[cfg(test)]
    pub(crate) fn socket_pair() -> (Tap, std::os::unix::net::UnixDatagram) {
        let (ours, host) = std::os::unix::net::UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let size: libc::c_int = 8192;
        // SAFETY: SO_SNDBUF reads one int of the size given.
        let rc = unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(rc, 0);
        let file = File::from(std::os::fd::OwnedFd::from(ours));
        (Tap::from_file(file, "sockpair"), host)
    }

    /// Wraps any message-preserving descriptor (a datagram or `SOCK_SEQPACKET` socket) as a
    /// tap, so tests and fuzz targets can fill it up and drain it at will; offloads are not set
    /// on it.
    #[cfg(any(test, fuzzing))]
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
        }
    }
}

fn retry_interrupted(mut op: impl FnMut() -> std::io::Result<usize>) -> std::io::Result<usize> {
    loop {
        match op() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for name in ["", "sixteen-chars-xx", "tap%d", "a/b", "a b"] {
            let err = Tap::open(name).unwrap_err();
            assert!(matches!(err, TapError::BadName { .. }), "{name:?}: {err}");
        }
    }

    #[test]
    fn a_passed_descriptor_that_is_no_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_passed(file, "tap0"),
            Err(TapError::Open { .. })
        ));
    }

    #[test]
    fn ioctl_numbers_match_linux() {
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
        assert_eq!(TUNGETIFF(), 0x8004_54d2);
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
