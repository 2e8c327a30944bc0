//! A private etcd for a test: Debian's `etcd` (package `etcd-server`) on free loopback ports with
//! its own data folder, ready when [`Etcd::start`] returns, killed when dropped. It never touches
//! a system etcd: the ports are picked free, the data folder is a fresh temporary one.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use lockstep_vmm::ft::{Arbiter, ArbiterConfig};

use crate::programs;

/// How long etcd has to answer after it starts.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running etcd, killed (and its data folder removed) on drop.
pub struct Etcd {
    child: Child,
    client: SocketAddr,
    log: PathBuf,
    /// The network namespace it listens in (None: the test's own).
    netns: Option<String>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts an etcd for `test`, or returns `None` after saying loudly that the test is skipped
    /// when `etcd` is not installed. Under `CI=true` a missing etcd fails the test, naming the
    /// package that brings it.
    pub fn start(test: &str) -> Option<Etcd> {
        Self::start_in(test, None)
    }

    /// As [`Etcd::start`], listening on the loopback of network namespace `netns` (for hosts
    /// that run in it).
    pub fn start_in(test: &str, netns: Option<&str>) -> Option<Etcd> {
        if programs::find("etcd").is_none() && std::env::var("CI").as_deref() != Ok("true") {
            let _ = writeln!(
                std::io::stderr(),
                "\n!!! SKIPPED {test}: `etcd` is not installed (Debian package etcd-server; \
                 scripts/setup-host.sh installs it); the FT arbiter tests did NOT run !!!\n"
            );
            return None;
        }
        // A port picked free can be taken before etcd binds it: try again with new ones.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(netns) {
                Ok(etcd) => return Some(etcd),
                Err(why) => last = why,
            }
        }
        panic!("{test}: etcd did not start: {last}");
    }

    fn try_start(netns: Option<&str>) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
        let client: SocketAddr = format!("127.0.0.1:{}", crate::free_port())
            .parse()
            .map_err(|e| format!("{e}"))?;
        let peer = format!("http://127.0.0.1:{}", crate::free_port());
        let log = dir.path().join("etcd.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let log_err = log_file.try_clone().map_err(|e| format!("log file: {e}"))?;
        let mut cmd = match netns {
            None => programs::command("etcd"),
            Some(ns) => {
                let mut cmd = programs::command("ip");
                cmd.args(["netns", "exec", ns])
                    .arg(programs::require("etcd"));
                cmd
            }
        };
        // The environment's ETCD_* settings would override the flags' private set-up.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(name);
            }
        }
        cmd.arg("--name")
            .arg("lockstep-test")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(format!("http://{client}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://{client}"))
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("lockstep-test={peer}"))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        let child = cmd.spawn().map_err(|e| format!("cannot start etcd: {e}"))?;
        let mut etcd = Etcd {
            child,
            client,
            log,
            netns: netns.map(str::to_string),
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            let probe = etcd.arbiter(Duration::from_millis(500));
            if etcd.inside(move || probe.read("lockstep-probe").is_ok()) {
                return Ok(etcd);
            }
            if let Ok(Some(status)) = etcd.child.try_wait() {
                return Err(format!("etcd exited ({status}): {}", etcd.log_tail()));
            }
            if start.elapsed() > READY_WITHIN {
                return Err(format!(
                    "etcd did not answer within {READY_WITHIN:?}: {}",
                    etcd.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client endpoint (its JSON gateway is on the same port).
    pub fn endpoint(&self) -> SocketAddr {
        self.client
    }

    /// An arbiter on this etcd whose requests time out after `timeout`.
    pub fn arbiter(&self, timeout: Duration) -> Arbiter {
        let mut config = ArbiterConfig::new(vec![self.client]);
        config.timeout = timeout;
        Arbiter::new(config)
    }

    /// Runs `f` where etcd can be reached (in its network namespace, if it has one).
    pub fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let Some(ns) = &self.netns else {
            return f();
        };
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns only changes this thread's network namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in etcd's namespace")
    }

    /// A pair's record as (live host, epoch), read where etcd can be reached.
    pub fn record(&self, pair: &str) -> Option<(String, u64)> {
        let arbiter = self.arbiter(Duration::from_secs(5));
        let pair = pair.to_string();
        self.inside(move || arbiter.read(&pair))
            .expect("etcd answers")
            .map(|seen| (seen.record.live, seen.record.epoch))
    }

    /// etcd's process id, to stop (SIGSTOP) or kill it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills etcd now and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last 2,000 bytes of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let from = text.len().saturating_sub(2000);
        String::from_utf8_lossy(&text[from..]).into_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // A stopped etcd (SIGSTOP by a test) still dies of SIGKILL.
        self.kill();
    }
}
