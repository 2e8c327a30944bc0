//! A host under test: a real `lockstep host` process, driven with curl through its control API,
//! every reply checked against the OpenAPI document.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_api::openapi_check::{self, Reply};
use serde_json::{json, Value};

use crate::images::lockstep_bin;
use crate::report::whole_lines;

/// A reply as curl saw it.
#[derive(Debug, Clone)]
pub struct CurlReply {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl CurlReply {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Reply for CurlReply {
    fn status(&self) -> u16 {
        self.status
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn body(&self) -> &[u8] {
        &self.body
    }
}

/// Runs curl against a Unix socket and parses what it printed.
pub fn curl_unix(socket: &Path, method: &str, path: &str, body: Option<&str>) -> CurlReply {
    let mut cmd = crate::programs::command("curl");
    cmd.args([
        "-s",
        "-i",
        "--max-time",
        "300",
        "-H",
        "Expect:",
        "--unix-socket",
    ])
    .arg(socket)
    .args(["-X", method])
    .arg(format!("http://localhost{path}"));
    if let Some(body) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = crate::programs::output(&mut cmd);
    assert!(
        out.status.success(),
        "curl {method} {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_reply(&out.stdout)
}

fn parse_reply(raw: &[u8]) -> CurlReply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    CurlReply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// A running `lockstep host`, stopped (SIGTERM) when dropped.
pub struct TestHost {
    child: Child,
    dir: tempfile::TempDir,
    api: PathBuf,
    log: PathBuf,
}

impl TestHost {
    /// Starts a host whose config has `vms` (VM configs with names, booted at start).
    pub fn start(vms: Vec<Value>) -> TestHost {
        Self::start_with(vms, json!({}))
    }

    /// [`TestHost::start`] with more host config keys merged in.
    pub fn start_with(vms: Vec<Value>, extra: Value) -> TestHost {
        Self::start_in(vms, extra, None)
    }

    /// [`TestHost::start_with`], the host process inside a network namespace (to reach its
    /// taps).
    pub fn start_in(vms: Vec<Value>, extra: Value, netns: Option<&str>) -> TestHost {
        Self::launch(vms, extra, netns, false)
    }

    /// [`TestHost::start`] with the host's standard error on a pseudo-terminal, as when a
    /// person runs it; what it writes there is copied into its log.
    pub fn start_on_terminal(vms: Vec<Value>) -> TestHost {
        Self::launch(vms, json!({}), None, true)
    }

    fn launch(vms: Vec<Value>, extra: Value, netns: Option<&str>, terminal: bool) -> TestHost {
        let dir = tempfile::tempdir().expect("temp dir");
        let api = dir.path().join("api.sock");
        let mut config = json!({
            "api_socket": api,
            "state_dir": dir.path().join("state"),
            "vms": vms.into_iter().map(|c| json!({ "config": c, "autostart": true })).collect::<Vec<_>>(),
        });
        if let (Some(cfg), Some(more)) = (config.as_object_mut(), extra.as_object()) {
            cfg.extend(more.clone());
        }
        let path = dir.path().join("host.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let log = dir.path().join("host.log");
        let mut command = match netns {
            Some(ns) => {
                let mut c = crate::programs::command("ip");
                c.args(["netns", "exec", ns]).arg(lockstep_bin());
                c
            }
            None => Command::new(lockstep_bin()),
        };
        let log_file = std::fs::File::create(&log).unwrap();
        let stderr = if terminal {
            let (mut master, slave) = crate::vm::open_pty();
            let mut copy = log_file;
            // Until the host exits (the terminal's master side then reads EIO).
            std::thread::spawn(move || std::io::copy(&mut master, &mut copy));
            Stdio::from(slave)
        } else {
            Stdio::from(log_file)
        };
        let child = command
            .args(["host", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start lockstep host");
        let host = TestHost {
            child,
            dir,
            api,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !host.api.exists() {
            assert!(
                Instant::now() < deadline,
                "the control API never came up:\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        host
    }

    /// The host process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The control API's socket.
    pub fn api_socket(&self) -> &Path {
        &self.api
    }

    /// The host's folder (its state folder is `state/` in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// lockstep's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A VM's serial log so far.
    pub fn serial(&self, vm: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("state").join(vm).join("serial.log"))
            .unwrap_or_default()
    }

    /// Waits for `needle` in a VM's serial log.
    pub fn wait_serial(&self, vm: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.serial(vm);
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} from {vm} within {timeout:?}:\n{text}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a whole line containing `needle` in a VM's serial log (a line still being
    /// written is not taken); returns the log.
    pub fn wait_serial_line(&self, vm: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.serial(vm);
            if whole_lines(&text).any(|l| l.contains(needle)) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no whole line with {needle:?} from {vm} within {timeout:?}:\n{text}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Calls the API: `template` is the documented path (e.g. `/v1/vms/{name}`), `path` the real
    /// one. The reply is checked against the OpenAPI document before it is returned.
    pub fn call(
        &self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<&Value>,
    ) -> CurlReply {
        let text = body.map(|b| b.to_string());
        let reply = curl_unix(&self.api, method, path, text.as_deref());
        let doc = openapi_check::document();
        if let Err(e) = openapi_check::check_reply(&doc, method, template, &reply) {
            panic!("reply breaks the OpenAPI document: {e}\n{}", reply.text());
        }
        reply
    }

    /// The state of a VM, as `GET /v1/vms/{name}` reports it.
    pub fn state(&self, vm: &str) -> String {
        let reply = self.call("GET", "/v1/vms/{name}", &format!("/v1/vms/{vm}"), None);
        reply.json()["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A migration's (or pairing's) info, `GET /v1/migrations/{id}`.
    pub fn migration(&self, id: &str) -> Value {
        let reply = self.call(
            "GET",
            "/v1/migrations/{id}",
            &format!("/v1/migrations/{id}"),
            None,
        );
        assert_eq!(reply.status, 200, "migration {id}: {}", reply.text());
        reply.json()
    }

    /// Waits (at most `timeout`) until `check` holds for migration `id`'s info, naming `what`
    /// it waited for if it never does; returns the info.
    pub fn wait_migration(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.migration(id);
            if check(&info) {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "migration {id}: no {what} within {timeout:?}: {info}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a VM reaches `state`.
    pub fn wait_state(&self, vm: &str, state: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.state(vm) != state {
            assert!(
                Instant::now() < deadline,
                "{vm} never became {state}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a new host process on this one's config with `--takeover` on this one's takeover
    /// socket; returns it and its log file.
    fn spawn_takeover(&self) -> (std::process::Child, PathBuf) {
        let log = self.dir.path().join("host-takeover.log");
        let child = Command::new(lockstep_bin())
            .args(["host", "--config"])
            .arg(self.dir.path().join("host.json"))
            .arg("--takeover")
            .arg(self.dir.path().join("state").join("takeover.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start lockstep host --takeover");
        (child, log)
    }

    /// Starts a new host process on this one's config with `--takeover` on this one's takeover
    /// socket, waits until this one has exited and the new one serves the control API; returns
    /// the new host and this one's exit code.
    pub fn take_over(mut self) -> (TestHost, Option<i32>) {
        let (mut child, log) = self.spawn_takeover();
        let logs = |old: &TestHost| {
            format!(
                "old host:\n{}\nnew host:\n{}",
                old.log(),
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let code = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status.code();
            }
            if let Some(status) = child.try_wait().expect("wait") {
                panic!("the new host ended ({status}) first:\n{}", logs(&self));
            }
            assert!(
                Instant::now() < deadline,
                "the old host did not exit:\n{}",
                logs(&self)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        while !self.api.exists() {
            if let Some(status) = child.try_wait().expect("wait") {
                panic!("the new host ended ({status}):\n{}", logs(&self));
            }
            assert!(
                Instant::now() < deadline,
                "the new host's control API never came up:\n{}",
                logs(&self)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        let host = TestHost {
            child,
            dir,
            api: self.api.clone(),
            log,
        };
        (host, code)
    }

    /// Starts a takeover of this host as [`TestHost::take_over`] does, for one that must fail:
    /// waits until the new process has ended (this one must serve on) and returns its exit
    /// code and its log.
    pub fn failed_take_over(&mut self) -> (Option<i32>, String) {
        let (mut child, log) = self.spawn_takeover();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let new_log = || std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(status) = child.try_wait().expect("wait") {
                return (status.code(), new_log());
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!(
                    "the old host ended ({status}):\n{}\n{}",
                    self.log(),
                    new_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the takeover did not end:\n{}\n{}",
                self.log(),
                new_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the host with SIGTERM and returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("lockstep host did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A connection to a VM's interactive console socket.
pub struct Console {
    stream: std::os::unix::net::UnixStream,
    seen: String,
}

impl Console {
    /// Connects to the console socket at `path`.
    pub fn connect(path: &Path) -> Console {
        let stream = std::os::unix::net::UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Console {
            stream,
            seen: String::new(),
        }
    }

    /// Types `line` and a newline, then waits for a line of output that starts with `expect`.
    /// Only the start of a line counts, because the terminal echoes `line` itself: a command
    /// like `ping ...; echo ping-done` must not match its own echo.
    pub fn run(&mut self, line: &str, expect: &str, timeout: Duration) -> String {
        use std::io::Write;
        let from = self.seen.len();
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to the console");
        self.wait_from(from, &format!("\n{expect}"), timeout)
    }

    /// Waits for `expect` in the output from byte `from` on; returns that output.
    pub fn wait_from(&mut self, from: usize, expect: &str, timeout: Duration) -> String {
        use std::io::Read;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(rest) = self.seen.get(from..) {
                if rest.contains(expect) {
                    return rest.to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {expect:?} on the console within {timeout:?}; it showed:\n{}",
                &self.seen[from.min(self.seen.len())..]
            );
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("the console closed; it showed:\n{}", self.seen),
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("console: {e}"),
            }
        }
    }
}

/// An argon2 hash of `password` for a host config's CIM users, from `lockstep hash-password`.
pub fn hash_password(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(lockstep_bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", lockstep_bin().display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "lockstep hash-password failed: {out:?}"
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
