//! A VM under test: a real `lockstep run` process whose serial console is this test's pipe.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::images::lockstep_bin;
use crate::report::{whole_lines, GuestReport};

/// Builds a VM config JSON with Firecracker's keys.
#[derive(Debug, Clone)]
pub struct VmConfigBuilder {
    json: Value,
}

impl VmConfigBuilder {
    /// One vCPU, 128 MiB, the given kernel.
    pub fn new(kernel: &Path) -> Self {
        VmConfigBuilder {
            json: json!({
                "boot-source": { "kernel_image_path": kernel },
                "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
            }),
        }
    }

    /// The kernel command line.
    pub fn boot_args(mut self, args: &str) -> Self {
        self.json["boot-source"]["boot_args"] = json!(args);
        self
    }

    /// The initrd.
    pub fn initrd(mut self, path: &Path) -> Self {
        self.json["boot-source"]["initrd_path"] = json!(path);
        self
    }

    /// lockstep's boot protocol choice (`auto`, `linux64`, `pvh`).
    pub fn boot_protocol(mut self, protocol: &str) -> Self {
        self.json["boot-source"]["boot_protocol"] = json!(protocol);
        self
    }

    /// Number of vCPUs.
    pub fn vcpus(mut self, n: u32) -> Self {
        self.json["machine-config"]["vcpu_count"] = json!(n);
        self
    }

    /// Guest memory in MiB.
    pub fn mem_mib(mut self, mib: u64) -> Self {
        self.json["machine-config"]["mem_size_mib"] = json!(mib);
        self
    }

    /// Sets any top-level key (e.g. `serial`, `name`, or a section under test).
    pub fn set(mut self, key: &str, value: Value) -> Self {
        self.json[key] = value;
        self
    }

    /// The JSON.
    pub fn build(self) -> Value {
        self.json
    }
}

/// Bytes a child wrote, shared with the thread that reads them.
#[derive(Default)]
struct Captured {
    data: Mutex<(Vec<u8>, bool)>,
    grew: Condvar,
}

impl Captured {
    fn spawn_reader(mut source: impl Read + Send + 'static) -> Arc<Captured> {
        let captured = Arc::new(Captured::default());
        let sink = captured.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = source.read(&mut buf).unwrap_or(0);
                let mut data = sink.data.lock().unwrap();
                if n == 0 {
                    data.1 = true;
                    sink.grew.notify_all();
                    return;
                }
                data.0.extend_from_slice(&buf[..n]);
                sink.grew.notify_all();
            }
        });
        captured
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data.lock().unwrap().0).into_owned()
    }

    /// Waits until `pred` holds for the text, the stream ends or time runs out.
    fn wait_until(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut data = self.data.lock().unwrap();
        loop {
            if pred(&String::from_utf8_lossy(&data.0)) {
                return true;
            }
            let now = Instant::now();
            if data.1 || now >= deadline {
                return false;
            }
            data = self.grew.wait_timeout(data, deadline - now).unwrap().0;
        }
    }
}

/// Where a [`TestVm`]'s console input comes from.
enum Console {
    Pipe,
    Terminal,
}

/// A new pseudo-terminal: the master side (the test's keyboard) and the slave side (lockstep's
/// stdin).
pub(crate) fn open_pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given integers; the name, termios and
    // window size arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty succeeded: both descriptors are new and owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

/// A running `lockstep run`, killed when dropped.
pub struct TestVm {
    child: Child,
    /// The console input: the pipe to lockstep's stdin, or the master side of its terminal.
    stdin: Option<Box<dyn Write + Send>>,
    serial: Arc<Captured>,
    logs: Arc<Captured>,
    status: Option<ExitStatus>,
    dir: tempfile::TempDir,
}

impl TestVm {
    /// Writes `config` to a fresh folder and starts `lockstep run` on it, with the serial
    /// console on pipes.
    pub fn start(config: &Value) -> TestVm {
        Self::start_in(config, None)
    }

    /// [`TestVm::start`], with lockstep inside a network namespace (to reach its tap).
    pub fn start_in(config: &Value, netns: Option<&str>) -> TestVm {
        Self::launch(config, netns, Console::Pipe)
    }

    /// [`TestVm::start`], with lockstep's stdin on a terminal (a pseudo-terminal the test
    /// holds), as a person runs it: raw mode, the Ctrl-A escape on. [`TestVm::send`] types there.
    pub fn start_on_terminal(config: &Value) -> TestVm {
        Self::launch(config, None, Console::Terminal)
    }

    fn launch(config: &Value, netns: Option<&str>, console: Console) -> TestVm {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("vm.json");
        std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        let mut command = match netns {
            Some(ns) => {
                let mut c = crate::programs::command("ip");
                c.args(["netns", "exec", ns]).arg(lockstep_bin());
                c
            }
            None => Command::new(lockstep_bin()),
        };
        let terminal = match console {
            Console::Pipe => {
                command.stdin(Stdio::piped());
                None
            }
            Console::Terminal => {
                let (master, slave) = open_pty();
                command.stdin(Stdio::from(slave));
                Some(master)
            }
        };
        let mut child = command
            .arg("run")
            .arg(&path)
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", lockstep_bin().display()));
        let serial = Captured::spawn_reader(child.stdout.take().unwrap());
        let logs = Captured::spawn_reader(child.stderr.take().unwrap());
        let stdin: Option<Box<dyn Write + Send>> = match terminal {
            Some(master) => Some(Box::new(master)),
            None => child
                .stdin
                .take()
                .map(|s| Box::new(s) as Box<dyn Write + Send>),
        };
        TestVm {
            child,
            stdin,
            serial,
            logs,
            status: None,
            dir,
        }
    }

    /// The folder holding the config (and anything else the test puts there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id of `lockstep`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the guest wrote to its serial console so far.
    pub fn serial(&self) -> String {
        self.serial.text()
    }

    /// lockstep's own log output (stderr) so far.
    pub fn logs(&self) -> String {
        self.logs.text()
    }

    /// The guest's `LKS` report lines so far.
    pub fn report(&self) -> GuestReport {
        GuestReport::parse(&self.serial())
    }

    fn transcript(&self) -> String {
        format!(
            "--- serial ---\n{}\n--- lockstep log ---\n{}",
            self.serial(),
            self.logs()
        )
    }

    /// Waits until the serial output contains `needle`; panics with the transcript otherwise.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        if !self.serial.wait_until(timeout, |t| t.contains(needle)) {
            panic!(
                "no {needle:?} on the serial console within {timeout:?}\n{}",
                self.transcript()
            );
        }
        self.serial()
    }

    /// Waits for a whole line (ended by a newline) that contains `needle`, and returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let complete = |t: &str| whole_lines(t).any(|l| l.contains(needle));
        if !self.serial.wait_until(timeout, complete) {
            panic!(
                "no whole line with {needle:?} on the serial console within {timeout:?}\n{}",
                self.transcript()
            );
        }
        let text = self.serial();
        let line = whole_lines(&text).find(|l| l.contains(needle));
        line.unwrap_or_default().to_string()
    }

    /// Waits until `needle` appears in the serial output after byte offset `from`.
    pub fn wait_for_after(&self, from: usize, needle: &str, timeout: Duration) -> String {
        let found = self.serial.wait_until(timeout, |t| {
            t.get(from..).is_some_and(|rest| rest.contains(needle))
        });
        if !found {
            panic!(
                "no {needle:?} after offset {from} within {timeout:?}\n{}",
                self.transcript()
            );
        }
        self.serial()
    }

    /// Types `text` on the serial console.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("console input still open");
        stdin
            .write_all(text.as_bytes())
            .expect("write to the console");
        stdin.flush().unwrap();
    }

    /// Closes the console input.
    pub fn close_input(&mut self) {
        self.stdin = None;
    }

    /// Waits for `lockstep` to exit and returns its status; panics (after killing it) on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for lockstep") {
                self.status = Some(status);
                // Let the reader threads take the last bytes.
                self.serial.wait_until(Duration::from_secs(2), |_| false);
                self.logs.wait_until(Duration::from_secs(2), |_| false);
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "lockstep did not exit within {timeout:?}\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to `lockstep`.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The outcome of a `lockstep run` that is expected to end by itself.
#[derive(Debug)]
pub struct RunOutcome {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Serial output.
    pub serial: String,
    /// lockstep's stderr.
    pub logs: String,
}

/// Runs `lockstep run <config_file>` with no console input and waits for it to end.
pub fn run_to_exit(config_file: &Path, timeout: Duration) -> RunOutcome {
    let mut child = Command::new(lockstep_bin())
        .arg("run")
        .arg(config_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockstep");
    let serial = Captured::spawn_reader(child.stdout.take().unwrap());
    let logs = Captured::spawn_reader(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!(
                "lockstep run {} did not end within {timeout:?}\n{}",
                config_file.display(),
                logs.text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    serial.wait_until(Duration::from_secs(2), |_| false);
    logs.wait_until(Duration::from_secs(2), |_| false);
    RunOutcome {
        code: status.code(),
        serial: serial.text(),
        logs: logs.text(),
    }
}

/// A path inside the workspace, for configs that name repository files.
pub fn repo_path(relative: &str) -> PathBuf {
    crate::images::workspace_root().join(relative)
}
