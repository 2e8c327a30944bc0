//! Test harness for the CIM endpoint (feature `testing`): starts it on ephemeral ports (over a
//! given host, the fake one by default), and runs the real WBEM clients against it. The guest
//! tests use it against a real host: `run_pywbem(&Target, &[...])` needs only a URL and
//! credentials.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub mod raw_http;

use crate::fake_host::FakeHost;
use crate::{CimConfig, CimServer, CimUser};
use lockstep_api::control::HostControl;

/// Where a CIM endpoint is and how to log in.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://127.0.0.1:port` or `https://...`.
    pub url: String,
    /// User.
    pub user: String,
    /// Password.
    pub password: String,
    /// The server's certificate, for HTTPS.
    pub ca_cert: Option<PathBuf>,
}

/// A running endpoint over a host, with its state folder removed on drop.
pub struct TestServer {
    /// The endpoint (stops on drop).
    pub server: Option<CimServer>,
    /// Plain HTTP.
    pub http: Target,
    /// HTTPS.
    pub https: Target,
    /// The state folder.
    pub state_dir: PathBuf,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh state folder under the system's temp folder.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lockstep-cim-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

impl TestServer {
    /// The endpoint over a fake host with `vms` stopped VMs (`vm000`, ...).
    pub fn fake(vms: usize) -> TestServer {
        TestServer::over(Arc::new(FakeHost::with_vms(vms)), CimConfig::default())
    }

    /// The endpoint over `host`, HTTP and HTTPS on ephemeral loopback ports, one user with a
    /// random password; other settings from `base`.
    pub fn over(host: Arc<dyn HostControl>, base: CimConfig) -> TestServer {
        let state_dir = temp_dir("server");
        let password = format!(
            "pw-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let config = CimConfig {
            https: Some("127.0.0.1:0".parse().unwrap()),
            http: Some("127.0.0.1:0".parse().unwrap()),
            users: vec![CimUser {
                name: "admin".into(),
                password_hash: crate::hash_password(&password).unwrap(),
            }],
            hostname: Some("localhost".into()),
            ..base
        };
        let server = crate::start(host, config, &state_dir).expect("start the CIM endpoint");
        let target = |scheme: &str, addr: std::net::SocketAddr, ca: Option<PathBuf>| Target {
            url: format!("{scheme}://{addr}"),
            user: "admin".into(),
            password: password.clone(),
            ca_cert: ca,
        };
        let http = target("http", server.http_addr().unwrap(), None);
        let https = target(
            "https",
            server.https_addr().unwrap(),
            Some(state_dir.join("cim").join("cert.pem")),
        );
        TestServer {
            server: Some(server),
            http,
            https,
            state_dir,
        }
    }
}

/// Whether a client tool is installed; when it is not, says so loudly, and under `CI=true`
/// fails the test instead of skipping it.
pub fn require(tool: &str, probe: &mut Command) -> bool {
    let ok = probe.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        let msg = format!(
            "{tool} is not installed ({}): run scripts/setup-host.sh",
            installer_of(tool)
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    ok
}

/// What installs `tool`, from the list scripts/setup-host.sh installs (pywbem, a Python module,
/// comes with pywbemtools).
fn installer_of(tool: &str) -> String {
    const HOST_PROGRAMS: &str = include_str!("../../scripts/host-programs.tsv");
    let program = if tool == "pywbem" { "pywbemcli" } else { tool };
    HOST_PROGRAMS
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(p, _)| *p == program)
        .map_or_else(
            || "not in scripts/host-programs.tsv".to_string(),
            |(_, installer)| format!("it comes with {installer}"),
        )
}

/// Whether pywbem can be imported.
pub fn have_pywbem() -> bool {
    require(
        "pywbem",
        Command::new("python3").args(["-c", "import pywbem"]),
    )
}

/// Whether pywbemcli runs.
pub fn have_pywbemcli() -> bool {
    require("pywbemcli", Command::new("pywbemcli").arg("--version"))
}

/// Whether wbemcli is there (it has no --version; -h exits 0 or 1, so look for the file).
pub fn have_wbemcli() -> bool {
    require(
        "wbemcli",
        Command::new("sh").args(["-c", "command -v wbemcli"]),
    )
}

/// The folder of the CIM crate's client test scripts.
pub fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// A command for a client with the environment cleaned of CA-bundle overrides (requests would
/// otherwise ignore the certificate we pass).
pub fn client(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE");
    c
}

/// Runs a command, printing its output, and returns it.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    eprintln!(
        "$ {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `pywbem_client.py` against `target` with extra arguments; panics on any failed check.
pub fn run_pywbem(target: &Target, extra: &[&str]) {
    let script = tests_dir().join("pywbem_client.py");
    let mut cmd = client("python3");
    cmd.arg(script).args([
        "--url",
        &target.url,
        "--user",
        &target.user,
        "--password",
        &target.password,
    ]);
    if let Some(ca) = &target.ca_cert {
        cmd.arg("--ca-cert").arg(ca);
    }
    cmd.args(extra);
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "pywbem checks failed against {}",
        target.url
    );
}

/// Runs `pywbem_migration.py`: a live migration from `source` to `destination` through their
/// CIM endpoints (both with the same credentials), with extra arguments (`--vm`, `--new-name`,
/// ...); panics on any failed check.
pub fn run_pywbem_migration(source: &Target, destination: &Target, extra: &[&str]) {
    let script = tests_dir().join("pywbem_migration.py");
    let mut cmd = client("python3");
    cmd.arg(script).args([
        "--source",
        &source.url,
        "--destination",
        &destination.url,
        "--user",
        &source.user,
        "--password",
        &source.password,
    ]);
    cmd.args(extra);
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "pywbem migration checks failed from {} to {}",
        source.url,
        destination.url
    );
}

/// Runs pywbemcli against `target`. `instance query` goes through a one-line shim: pywbemcli
/// 1.4 calls `list()` on pywbem's IterQueryInstances result, which is not iterable, so that
/// command fails against every real server; the shim makes the result iterable.
pub fn pywbemcli(target: &Target, args: &[&str]) -> Output {
    let shim = tests_dir().join("pywbemcli_shim.py");
    let mut cmd = client("python3");
    cmd.arg(shim).args([
        "-s",
        &target.url,
        "-u",
        &target.user,
        "-p",
        &target.password,
        "-d",
        "root/cimv2",
    ]);
    if let Some(ca) = &target.ca_cert {
        cmd.arg("--ca-certs").arg(ca);
    }
    cmd.args(args);
    run(&mut cmd)
}

/// Runs wbemcli on `path` (`/root/cimv2:Class...`) at `target` with its credentials in the URL.
pub fn wbemcli(target: &Target, op: &str, path: &str, extra: &[&str]) -> Output {
    wbemcli_as(target, &target.user, &target.password, op, path, extra)
}

/// The same with other credentials.
pub fn wbemcli_as(
    target: &Target,
    user: &str,
    password: &str,
    op: &str,
    path: &str,
    extra: &[&str],
) -> Output {
    let (scheme, hostport) = target.url.split_once("://").expect("a URL");
    let url = format!("{scheme}://{user}:{password}@{hostport}{path}");
    let mut cmd = client("wbemcli");
    if let Some(ca) = &target.ca_cert {
        cmd.arg("-cacert").arg(ca);
    }
    cmd.arg(op).arg(url).args(extra);
    run(&mut cmd)
}
