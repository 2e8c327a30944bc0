//! A network namespace of the test's own, with a tap device in it: lockstep runs inside the
//! namespace and opens the tap, and the test's host-side programs run there too, so traffic never
//! leaves the namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::programs;

/// A namespace with a tap `<name>` at `host_ip/24`; deleted on drop.
pub struct NetNs {
    name: String,
    tap: String,
    subnet: u8,
}

fn ip(args: &[&str]) {
    let out = programs::output(programs::command("ip").args(args));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// Creates a namespace with a fresh name and a tap on 10.77.<n>.1/24 in it.
    pub fn create() -> NetNs {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 100_000) * 100 + n;
        let subnet = (id % 250 + 1) as u8;
        let ns = NetNs {
            name: format!("lkst{id}"),
            tap: format!("lkstap{}", id % 100_000),
            subnet,
        };
        let _ = programs::command("ip")
            .args(["netns", "del", &ns.name])
            .output();
        ip(&["netns", "add", &ns.name]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&[
            "ip", "tuntap", "add", "dev", &ns.tap, "mode", "tap", "vnet_hdr",
        ]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.host_ip()),
            "dev",
            &ns.tap,
        ]);
        ns.exec(&["ip", "link", "set", &ns.tap, "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap device's name.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// The host side's address.
    pub fn host_ip(&self) -> String {
        format!("10.77.{}.1", self.subnet)
    }

    /// An address for the guest in the tap's subnet.
    pub fn guest_ip(&self) -> String {
        format!("10.77.{}.2", self.subnet)
    }

    /// Moves the host address from the tap to a bridge `br0` with the tap and a second one on
    /// it (one L2 segment, as two hosts' ports on a switch); returns the second tap's name.
    pub fn bridge_with_second_tap(&self) -> String {
        let tap_b = format!("{}b", self.tap);
        self.exec(&["ip", "addr", "flush", "dev", &self.tap]);
        self.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        self.exec(&["ip", "link", "set", &self.tap, "master", "br0"]);
        self.exec(&[
            "ip", "tuntap", "add", "dev", &tap_b, "mode", "tap", "vnet_hdr",
        ]);
        self.exec(&["ip", "link", "set", &tap_b, "master", "br0"]);
        self.exec(&["ip", "link", "set", &tap_b, "up"]);
        let address = format!("{}/24", self.host_ip());
        self.exec(&["ip", "addr", "add", &address, "dev", "br0"]);
        self.exec(&["ip", "link", "set", "br0", "up"]);
        tap_b
    }

    /// Runs a command inside the namespace and checks that it succeeds.
    pub fn exec(&self, args: &[&str]) {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "ip netns exec {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a command inside the namespace and returns its output. The program (`args[0]`)
    /// must be installed: a missing one fails the test by name, not with an empty output.
    pub fn output(&self, args: &[&str]) -> std::process::Output {
        let (program, rest) = args.split_first().expect("a program to run");
        let program = programs::require(program);
        programs::output(
            programs::command("ip")
                .args(["netns", "exec", &self.name])
                .arg(program)
                .args(rest),
        )
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it opens live there).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open the namespace");
            // SAFETY: setns only changes this thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

/// A frame seen on an interface: its packet type (`libc::PACKET_OUTGOING` for what the kernel
/// sent out of it, e.g. into a tap towards its VMM; anything else came in from it) and bytes.
pub type Seen = (u8, Vec<u8>);

/// A [`Seen`] frame with the time the capture read it (at most 2048 bytes of it).
pub type SeenAt = (std::time::Instant, u8, Vec<u8>);

impl NetNs {
    /// Captures every frame on `iface` in this namespace, both ways, until `stop` is set.
    pub fn capture(
        &self,
        iface: &str,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<Vec<Seen>> {
        let timed = self.capture_timed(iface, stop);
        std::thread::spawn(move || {
            let frames = timed.join().expect("the capture thread");
            frames.into_iter().map(|(_, kind, f)| (kind, f)).collect()
        })
    }

    /// [`NetNs::capture`], each frame with the time it was read (the benchmarks' failover time).
    pub fn capture_timed(
        &self,
        iface: &str,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<Vec<SeenAt>> {
        let iface = std::ffi::CString::new(iface).expect("an interface name");
        self.run(move || {
            use std::os::fd::{FromRawFd, OwnedFd};
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket creation; the descriptor is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh descriptor we own.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(iface.as_ptr()) };
            assert!(index > 0, "no interface {iface:?}");
            // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set next.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `addr` is a sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    len,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: SO_RCVTIMEO reads one timeval of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(rc, 0);
            let mut frames = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: an all-zero sockaddr_ll is valid for recvfrom to fill.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = len;
                // SAFETY: `buf` and `from` are writable for the lengths given.
                let n = unsafe {
                    libc::recvfrom(
                        sock.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if n > 0 {
                    let at = std::time::Instant::now();
                    frames.push((at, from.sll_pkttype, buf[..n as usize].to_vec()));
                }
            }
            frames
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = programs::command("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
