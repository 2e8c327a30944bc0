//! `lockstep host` (many VMs, managed through the control API) and `lockstep run --api-sock`
//! (one VM driven through Firecracker's API, as Firecracker is).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use lockstep_api::control::{HostControl, HostEvent, VmState};
use lockstep_api::firecracker::spawn_firecracker;
use lockstep_api::http::{self, ApiToken, Listeners, ServerHandle};
use lockstep_api::{HostConfig, VmConfig};
use lockstep_seccomp::ThreadKind;
use lockstep_vmm::event_loop::{read_signal, termination_signalfd};
use lockstep_vmm::host::{Host, HostOptions};
use lockstep_vmm::Hypervisor;

use crate::privileges::{self, Identity};
use crate::{fail, EXIT_CONFIG_ERROR, EXIT_VMM_ERROR};

/// Watches the termination signals on a thread of its own; the number of the last one received
/// (0 for none) is in the returned cell.
fn watch_signals() -> Arc<AtomicI32> {
    let received = Arc::new(AtomicI32::new(0));
    let fd = match termination_signalfd() {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("cannot catch termination signals: {e}");
            return received;
        }
    };
    let cell = received.clone();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        lockstep_seccomp::install(ThreadKind::Main);
        loop {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, -1) };
            if let Some(signal) = read_signal(&fd) {
                cell.store(signal, Ordering::SeqCst);
            }
        }
    });
    received
}

/// Per-VM Firecracker sockets, opened and closed as VMs come and go.
fn manage_firecracker_sockets(host: Arc<Host>, events: mpsc::Receiver<HostEvent>) {
    std::thread::spawn(move || {
        lockstep_seccomp::install(ThreadKind::FirecrackerApi);
        let mut servers: HashMap<String, ServerHandle> = HashMap::new();
        let open = |name: &str, servers: &mut HashMap<String, ServerHandle>| {
            let socket = host.vm_dir(name).join("firecracker.sock");
            match spawn_firecracker(host.clone(), name.to_string(), &socket) {
                Ok(handle) => {
                    servers.insert(name.to_string(), handle);
                }
                Err(e) => log::warn!(
                    "{name}: cannot open its Firecracker API socket {}: {e}",
                    socket.display()
                ),
            }
        };
        for vm in host.list_vms() {
            open(&vm.name, &mut servers);
        }
        for event in events {
            match event {
                HostEvent::VmCreated { name } if !servers.contains_key(&name) => {
                    open(&name, &mut servers)
                }
                HostEvent::VmDeleted { name } => {
                    servers.remove(&name);
                }
                _ => {}
            }
        }
    });
}

/// `lockstep host --config host.json [--user USER] [--takeover SOCKET]`.
pub fn host(config_path: &Path, user: Option<&str>, takeover: Option<&Path>) -> ExitCode {
    if takeover.is_some() && user.is_some() {
        // Root is given up before any thread starts, and the endpoints are bound only once the
        // old host has let go of them, after the VMs (and their threads) moved in.
        return fail(
            EXIT_CONFIG_ERROR,
            "--takeover cannot be combined with --user yet",
        );
    }
    let user = match user.map(privileges::lookup).transpose() {
        Ok(u) => u,
        Err(e) => return fail(EXIT_CONFIG_ERROR, &e.to_string()),
    };
    let config = match HostConfig::from_file(config_path) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                EXIT_CONFIG_ERROR,
                &format!("{}: {e}", config_path.display()),
            )
        }
    };
    let vms = match config.vm_configs() {
        Ok(v) => v,
        Err(e) => {
            return fail(
                EXIT_CONFIG_ERROR,
                &format!("{}: {e}", config_path.display()),
            )
        }
    };
    let cim_config = match cim_config(&config) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                EXIT_CONFIG_ERROR,
                &format!("{}: {e}", config_path.display()),
            )
        }
    };
    let hv = match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => return fail(EXIT_VMM_ERROR, &e.to_string()),
    };
    log::info!("host KVM backend: {}", hv.backend());
    let options = HostOptions {
        serial_logs: true,
        stdin_console: false,
        firecracker_sockets: config.firecracker_sockets,
        console_sockets: config.console_sockets,
    };
    let host = match Host::new(hv, &config.state_dir, options) {
        Ok(h) => h.into_shared(),
        Err(e) => {
            return fail(
                EXIT_VMM_ERROR,
                &format!("state_dir {}: {e}", config.state_dir.display()),
            )
        }
    };
    if let Some(dir) = config.api_socket.parent() {
        // Folders made here are 0700; one that exists (/run) keeps its mode.
        if let Err(e) = lockstep_api::private_fs::create_dirs(dir) {
            return fail(
                EXIT_VMM_ERROR,
                &format!("api_socket: cannot create {}: {e}", dir.display()),
            );
        }
    }
    let token = match config.api_tcp.map(|_| api_token(&config)) {
        None => None,
        Some(Ok(token)) => Some(token),
        Some(Err(e)) => return fail(EXIT_VMM_ERROR, &e),
    };
    // Bound now, served once the VMs at start are there: a client connecting early waits. A
    // takeover binds them once the old host has let go of them.
    let bind = || {
        Listeners::new()
            .bind_unix(&config.api_socket)
            .and_then(|l| match (config.api_tcp, token.clone()) {
                (Some(addr), Some(token)) => l.bind_tcp(addr, token),
                _ => Ok(l),
            })
    };
    let mut listeners = takeover.is_none().then(bind);
    if let Some(user) = &user {
        if let Err(e) = drop_root(user, &config.state_dir) {
            return fail(EXIT_VMM_ERROR, &e.to_string());
        }
    }
    let signals = watch_signals();
    lockstep_vmm::migration::spawn_terminal_progress(host.clone());
    if config.firecracker_sockets {
        manage_firecracker_sockets(host.clone(), host.subscribe());
    }
    if let Some(socket) = takeover {
        // The VMs are the old host's (the config's are there already).
        match crate::takeover::take_over(&host, socket, &config.state_dir) {
            Ok(moved) => log::info!("takeover: {moved} running VMs moved into this process"),
            Err(e) => return fail(EXIT_VMM_ERROR, &format!("takeover: {e}")),
        }
        listeners = Some(bind());
    }
    for (vm, autostart) in vms.into_iter().filter(|_| takeover.is_none()) {
        let name = vm.display_name().to_string();
        // One VM that cannot be defined or booted does not stop the host.
        if let Err(e) = host.create_vm(vm, autostart) {
            log::error!("{name}: {e}");
        }
    }
    let cim = match cim_config.map(|c| start_cim(c, &config.state_dir, &host)) {
        None => None,
        Some(Ok(server)) => Some(server),
        Some(Err(e)) => return fail(EXIT_VMM_ERROR, &e),
    };
    let listeners = listeners.unwrap_or_else(bind);
    let api = match listeners.and_then(|l| http::spawn(host.clone(), l)) {
        Ok(api) => api,
        Err(e) => return fail(EXIT_VMM_ERROR, &format!("control API: {e}")),
    };
    log::info!("control API on {}", config.api_socket.display());
    let takeover_socket = match crate::takeover::listen(host.clone(), &config.state_dir) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("{e}: no takeover of this host's VMs");
            None
        }
    };
    let handed_over = || {
        takeover_socket
            .as_ref()
            .is_some_and(|t| t.handover.requested())
    };
    lockstep_seccomp::install(ThreadKind::Main);
    while signals.load(Ordering::SeqCst) == 0 && !handed_over() {
        std::thread::sleep(Duration::from_millis(20));
    }
    match handed_over() {
        true => log::info!("stopping: a new process took every VM over"),
        false => log::info!("stopping: signal {}", signals.load(Ordering::SeqCst)),
    }
    if let Err(e) = api.stop() {
        log::warn!("control API: {e}");
    }
    drop(cim);
    host.stop_all();
    if let Some(listening) = takeover_socket {
        let handover = listening.handover.clone();
        drop(listening);
        handover.confirm();
    }
    ExitCode::SUCCESS
}

/// The token TCP clients of the control API present: the configured file's, or the host's own
/// (`<state_dir>/api.token`, generated on first start).
fn api_token(config: &HostConfig) -> Result<ApiToken, String> {
    match &config.api_tcp_token_path {
        Some(path) => ApiToken::from_file(path).map_err(|e| format!("api_tcp_token_path: {e}")),
        None => ApiToken::load_or_generate(&config.state_dir.join("api.token"))
            .map_err(|e| format!("api_tcp: {e}")),
    }
}

/// Gives the state folder to `user` and becomes that user. No other thread exists yet, so every
/// thread the host starts runs as the user.
fn drop_root(user: &Identity, state_dir: &Path) -> Result<(), privileges::PrivilegeError> {
    privileges::chown_tree(state_dir, user)?;
    privileges::become_user(user)?;
    log::info!(
        "running as {} (uid {}, gid {})",
        user.name,
        user.uid,
        user.gid
    );
    Ok(())
}

/// The host config's `cim` section, parsed and checked before anything on the host is touched.
fn cim_config(config: &HostConfig) -> Result<Option<lockstep_cim::CimConfig>, String> {
    let Some(section) = &config.cim else {
        return Ok(None);
    };
    let cim: lockstep_cim::CimConfig = serde_path_to_error::deserialize(section)
        .map_err(|e| format!("cim.{}: {}", e.path(), e.inner()))?;
    cim.check().map_err(|e| format!("cim: {e}"))?;
    Ok(Some(cim))
}

/// Starts the CIM endpoint.
fn start_cim(
    cim: lockstep_cim::CimConfig,
    state_dir: &Path,
    host: &Arc<Host>,
) -> Result<lockstep_cim::CimServer, String> {
    let server =
        lockstep_cim::start(host.clone(), cim, state_dir).map_err(|e| format!("cim: {e}"))?;
    if let Some(addr) = server.https_addr() {
        log::info!("CIM endpoint on https://{addr}/cimom");
    }
    if let Some(addr) = server.http_addr() {
        log::info!("CIM endpoint on http://{addr}/cimom");
    }
    Ok(server)
}

/// `lockstep run --api-sock PATH [config]`: one VM, in the foreground, configured and driven
/// through Firecracker's API (or booted at once from `config`); the process ends with the VM.
pub fn firecracker(api_sock: &Path, id: &str, config: Option<VmConfig>) -> ExitCode {
    let signals = watch_signals();
    let hv = match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => return fail(EXIT_VMM_ERROR, &e.to_string()),
    };
    log::info!("host KVM backend: {}", hv.backend());
    let state_dir: PathBuf = std::env::temp_dir().join(format!("lockstep-{}", std::process::id()));
    let options = HostOptions {
        serial_logs: false,
        stdin_console: true,
        ..Default::default()
    };
    let host = match Host::new(hv, &state_dir, options) {
        Ok(h) => h.into_shared(),
        Err(e) => return fail(EXIT_VMM_ERROR, &format!("{}: {e}", state_dir.display())),
    };
    let events = host.subscribe();
    if let Some(mut config) = config {
        config.name = Some(id.to_string());
        if let Err(e) = host.create_vm(config, true) {
            return fail(EXIT_CONFIG_ERROR, &e.to_string());
        }
    }
    let api = match spawn_firecracker(host.clone(), id.to_string(), api_sock) {
        Ok(api) => api,
        Err(e) => {
            return fail(
                EXIT_VMM_ERROR,
                &format!("--api-sock {}: {e}", api_sock.display()),
            )
        }
    };
    log::info!("Firecracker-compatible API on {}", api_sock.display());
    lockstep_seccomp::install(ThreadKind::Main);
    let code = loop {
        if signals.load(Ordering::SeqCst) != 0 {
            break ExitCode::from(128u8.saturating_add(signals.load(Ordering::SeqCst) as u8));
        }
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(HostEvent::VmStateChanged {
                current: VmState::Stopped,
                ..
            }) => break ExitCode::SUCCESS,
            Ok(HostEvent::VmStateChanged {
                current: VmState::Failed,
                name,
                ..
            }) => {
                let reason = host
                    .get_vm(&name)
                    .ok()
                    .and_then(|d| d.info.exit_reason)
                    .unwrap_or_default();
                break fail(EXIT_VMM_ERROR, &reason);
            }
            _ => {}
        }
    };
    drop(api);
    host.stop_all();
    let _ = std::fs::remove_dir_all(&state_dir);
    code
}
