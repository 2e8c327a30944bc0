//! The harness for lockstep's guest-running tests: finds (and builds) the `lockstep` binary and
//! the guest images, starts a VM as a real `lockstep run` process, waits for serial output,
//! types into the console, and tears everything down even when a test panics.

pub mod etcd;
pub mod host;
pub mod images;
pub mod journal;
pub mod kvm;
pub mod netns;
pub mod pattern;
pub mod programs;
pub mod relay;
pub mod report;
pub mod trials;
pub mod vm;

pub use images::{guest_images, linux_images, lockstep_bin, GuestImages, LinuxImages};
pub use kvm::require_kvm;
pub use report::GuestReport;
pub use vm::{repo_path, run_to_exit, RunOutcome, TestVm, VmConfigBuilder};

/// A loopback TCP port free at the time of asking, for a listener the test configures.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
