//! `lockstep host --takeover SOCKET`: a new host process takes every VM of a running one, one by
//! one over the same-host migration path (guest memory handed over as memfds, not copied), then
//! the old process stops serving and exits 0 and the new one serves the control API in its
//! place: the VMM binary is upgraded under running guests.
//!
//! Every host listens on `<state_dir>/takeover.sock` (mode 0600; a peer must also run as the
//! host's user, checked with SO_PEERCRED). The conversation is JSON, one object a line: the new
//! process asks for the `list` of VMs; for each running or paused VM it opens a one-shot
//! incoming listener of its own and asks the old host to `move` the VM there (the answer comes
//! once the migration has ended); VMs that are not running are defined afresh from their
//! config. At the end it sends `exit`: the old host stops its endpoints and answers, then exits.
//! If a move fails, the VMs already moved are sent back (`receive` asks the old host for a
//! listener) and the new process gives up; the old host serves on.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lockstep_api::control::{ControlError, HostControl, VmDetails, VmState};
use lockstep_api::migration::{IncomingRequest, MigrateRequest, MigrationInfo, MigrationPhase};
use lockstep_api::private_fs::{self, SocketFile};
use lockstep_seccomp::ThreadKind;
use lockstep_vmm::host::Host;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The takeover socket's name in the state folder.
pub const SOCKET_NAME: &str = "takeover.sock";
/// Longest request line read from a peer.
const MAX_LINE: u64 = 64 << 10;
/// How long one VM's move may take, end to end.
const MOVE_TIMEOUT: Duration = Duration::from_secs(180);

/// What the new process asks of the old one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    /// Every VM with its config.
    List,
    /// Migrate a VM to `destination` with `token`; answered once the migration has ended.
    Move {
        name: String,
        destination: String,
        token: String,
    },
    /// Open an incoming listener for a VM coming back (a failed takeover).
    Receive { name: String, listen: String },
    /// Stop serving and exit.
    Exit,
}

/// The old host's side: set when a new process asked it to exit. The takeover thread answers
/// the new process once the main thread has stopped the endpoints (the main thread's seccomp
/// filter has no sockets).
#[derive(Default)]
pub struct Handover {
    requested: AtomicBool,
    /// (endpoints down, answered)
    steps: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Handover {
    /// True once a new process took every VM and asked this one to exit.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn steps(&self) -> std::sync::MutexGuard<'_, (bool, bool)> {
        self.steps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Says that this host's endpoints are down, and waits (a few seconds at most) until the
    /// new process has been told that it may bind them.
    pub fn confirm(&self) {
        self.steps().0 = true;
        self.changed.notify_all();
        let steps = self.steps();
        let _ = self
            .changed
            .wait_timeout_while(steps, Duration::from_secs(5), |s| !s.1);
    }

    /// The takeover thread: waits until the endpoints are down, then tells the new process.
    fn answer_when_down(&self, mut peer: UnixStream) {
        let steps = self.steps();
        let mut steps = self
            .changed
            .wait_while(steps, |s| !s.0)
            .unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(peer, "{}", json!({ "ok": true }));
        steps.1 = true;
        drop(steps);
        self.changed.notify_all();
    }
}

/// The takeover socket of a host, removed when dropped.
pub struct Listening {
    /// What the main thread watches.
    pub handover: Arc<Handover>,
    _file: SocketFile,
}

/// Listens on `<state_dir>/takeover.sock` and serves new processes on a thread of its own.
pub fn listen(host: Arc<Host>, state_dir: &Path) -> Result<Listening, String> {
    let path = state_dir.join(SOCKET_NAME);
    let listener = private_fs::bind_private_socket(&path)
        .map_err(|e| format!("takeover socket {}: {e}", path.display()))?;
    let file = SocketFile::track(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    listener
        .set_nonblocking(false)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let handover = Arc::new(Handover::default());
    let shared = handover.clone();
    std::thread::Builder::new()
        .name("takeover".into())
        .spawn(move || {
            // It starts migrations, as the control API does.
            lockstep_seccomp::install(ThreadKind::Api);
            serve(&host, &listener, &shared);
        })
        .map_err(|e| format!("cannot start the takeover thread: {e}"))?;
    Ok(Listening {
        handover,
        _file: file,
    })
}

fn serve(host: &Arc<Host>, listener: &UnixListener, handover: &Handover) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("takeover socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Err(why) = lockstep_vmm::migration::same_user(&stream) {
            log::warn!("takeover socket: refused a peer: {why}");
            continue;
        }
        match serve_peer(host, stream) {
            Ok(Some(peer)) => {
                log::info!("takeover: every VM has moved to a new process; stopping");
                handover.requested.store(true, Ordering::SeqCst);
                handover.answer_when_down(peer);
                return;
            }
            Ok(None) => {}
            Err(e) => log::warn!("takeover: {e}"),
        }
    }
}

/// Answers one peer's requests; returns its connection when it asked this host to exit.
fn serve_peer(host: &Arc<Host>, stream: UnixStream) -> Result<Option<UnixStream>, String> {
    let mut out = stream.try_clone().map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    loop {
        let mut line = String::new();
        let n = (&mut lines)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Err(e) => json!({ "error": format!("bad request: {e}") }),
            Ok(Request::Exit) => {
                let left: Vec<String> = host
                    .list_vms()
                    .into_iter()
                    .filter(|vm| matches!(vm.state, VmState::Running | VmState::Paused))
                    .map(|vm| vm.name)
                    .collect();
                if left.is_empty() {
                    return Ok(Some(stream));
                }
                json!({ "error": format!("VMs still run here: {}", left.join(", ")) })
            }
            Ok(request) => answer(host, request).unwrap_or_else(|e| json!({ "error": e })),
        };
        writeln!(out, "{answer}").map_err(|e| e.to_string())?;
    }
}

fn answer(host: &Arc<Host>, request: Request) -> Result<Value, String> {
    let text = |e: ControlError| e.to_string();
    match request {
        Request::List => {
            let vms = host
                .list_vms()
                .into_iter()
                .map(|vm| host.get_vm(&vm.name))
                .collect::<Result<Vec<VmDetails>, _>>()
                .map_err(text)?;
            Ok(json!({ "vms": vms }))
        }
        Request::Move {
            name,
            destination,
            token,
        } => {
            let info = move_vm(&**host, &name, destination, token)?;
            Ok(json!({ "migration": info }))
        }
        Request::Receive { name, listen } => {
            let info = host
                .migrate_incoming(IncomingRequest {
                    listen,
                    name,
                    ..Default::default()
                })
                .map_err(text)?;
            Ok(json!({ "incoming": info }))
        }
        Request::Exit => Err("exit is answered by the caller".into()),
    }
}

/// Migrates `name` from `host` and waits until the migration has ended; an error unless it
/// completed.
fn move_vm(
    host: &dyn HostControl,
    name: &str,
    destination: String,
    token: String,
) -> Result<MigrationInfo, String> {
    let request = MigrateRequest {
        destination,
        token,
        downtime_ms: None,
        timeout_s: None,
        max_bandwidth_mib_s: None,
        auto_converge: false,
        share_memory: Some(true),
        ft: None,
    };
    let started = host.migrate_vm(name, request).map_err(|e| e.to_string())?;
    let info = wait_ended(host, &started.id)?;
    match info.phase {
        MigrationPhase::Completed => Ok(info),
        _ => Err(format!(
            "moving {name}: {}",
            info.error.as_deref().unwrap_or("failed")
        )),
    }
}

fn wait_ended(host: &dyn HostControl, id: &str) -> Result<MigrationInfo, String> {
    let deadline = Instant::now() + MOVE_TIMEOUT;
    loop {
        let info = host.get_migration(id).map_err(|e| e.to_string())?;
        if matches!(
            info.phase,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        ) {
            return Ok(info);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "migration {id} did not end within {MOVE_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The new process's side of the conversation.
struct Peer {
    out: UnixStream,
    lines: BufReader<UnixStream>,
}

impl Peer {
    fn ask(&mut self, request: &Request) -> Result<Value, String> {
        let text = serde_json::to_string(request).map_err(|e| e.to_string())?;
        writeln!(self.out, "{text}").map_err(|e| format!("the old host: {e}"))?;
        let mut line = String::new();
        (&mut self.lines)
            .take(16 << 20)
            .read_line(&mut line)
            .map_err(|e| format!("the old host: {e}"))?;
        if line.is_empty() {
            return Err("the old host closed the connection".into());
        }
        let answer: Value =
            serde_json::from_str(&line).map_err(|e| format!("the old host's answer: {e}"))?;
        match answer.get("error").and_then(Value::as_str) {
            Some(why) => Err(format!("the old host: {why}")),
            None => Ok(answer),
        }
    }
}

/// Where a VM moving into this process is listened for.
fn listen_path(state_dir: &Path, name: &str) -> PathBuf {
    // VM names never start with a dot: no VM folder has this name.
    state_dir.join(format!(".takeover-{name}.sock"))
}

/// Takes every VM of the host listening on `socket` into `host`; returns how many moved. On
/// return the old host has stopped serving (its endpoints may be bound here) and is exiting.
pub fn take_over(host: &Arc<Host>, socket: &Path, state_dir: &Path) -> Result<usize, String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach the host at {}: {e}", socket.display()))?;
    lockstep_vmm::migration::same_user(&stream).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(MOVE_TIMEOUT + Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut peer = Peer {
        out: stream.try_clone().map_err(|e| e.to_string())?,
        lines: BufReader::new(stream),
    };
    let list = peer.ask(&Request::List)?;
    let vms: Vec<VmDetails> = serde_json::from_value(list["vms"].clone())
        .map_err(|e| format!("the old host's list: {e}"))?;
    let mut moved: Vec<String> = Vec::new();
    for vm in vms {
        let name = vm.info.name.clone();
        let outcome = match vm.info.state {
            VmState::Running | VmState::Paused => {
                move_in(host, &mut peer, state_dir, &name).map(|()| moved.push(name.clone()))
            }
            // Not running: defined here from its config, as it was there.
            _ => host
                .create_vm(vm.config, false)
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        if let Err(why) = outcome {
            let why = format!("{name}: {why}");
            give_back(host, &mut peer, state_dir, &moved);
            return Err(why);
        }
        log::info!("takeover: {name} is here");
    }
    peer.ask(&Request::Exit)?;
    Ok(moved.len())
}

fn move_in(host: &Arc<Host>, peer: &mut Peer, state_dir: &Path, name: &str) -> Result<(), String> {
    let listen = format!("unix:{}", listen_path(state_dir, name).display());
    let incoming = host
        .migrate_incoming(IncomingRequest {
            listen,
            name: name.to_string(),
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
    let result = peer.ask(&Request::Move {
        name: name.to_string(),
        destination: incoming.listen,
        token: incoming.token,
    });
    if result.is_err() {
        let _ = host.cancel_migration(&incoming.id);
    }
    result?;
    let arrived = wait_ended(&**host, &incoming.id)?;
    match arrived.phase {
        MigrationPhase::Completed => Ok(()),
        _ => Err(arrived.error.unwrap_or_else(|| "did not arrive".into())),
    }
}

/// Sends the VMs that moved here back to the old host after a failed takeover.
fn give_back(host: &Arc<Host>, peer: &mut Peer, state_dir: &Path, moved: &[String]) {
    for name in moved {
        let back = (|| -> Result<(), String> {
            let listen = format!("unix:{}", listen_path(state_dir, name).display());
            let answer = peer.ask(&Request::Receive {
                name: name.clone(),
                listen,
            })?;
            let incoming = &answer["incoming"];
            let field = |k: &str| incoming[k].as_str().unwrap_or_default().to_string();
            move_vm(&**host, name, field("listen"), field("token")).map(drop)
        })();
        match back {
            Ok(()) => log::info!("takeover: {name} went back to the old host"),
            Err(e) => log::error!("takeover: {name} could not go back and runs here: {e}"),
        }
    }
}
