//! A lockstep host: many VMs in one process, each on its own owner thread, managed only through
//! [`HostControl`]. One VM failing (a bad kernel, a crash, a triple fault, even a panic in its
//! VMM thread) marks that VM failed and leaves the host and the other VMs running.

mod migration_glue;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lockstep_api::control::{
    ControlError, DeviceMetrics, HostControl, HostEvent, HostInfo, RestoreRequest, ShutdownRequest,
    SnapshotInfo, SnapshotRequest, VmDetails, VmInfo, VmMetrics, VmState,
};
use lockstep_api::migration::{IncomingInfo, IncomingRequest, MigrateRequest, MigrationInfo};
use lockstep_api::VmConfig;

use crate::exit::ExitReason;
use crate::host_paths;
use crate::kvm::Hypervisor;
use lockstep_api::private_fs::{self, SocketPathError};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;

use crate::vm::snapshot::files::{self, BackingFile};
use crate::vm::{
    ConsoleInput, ControlError as VmControlError, RunOptions, RunState, SnapshotPaths, Vm,
    VmCommand, VmControl, VmCounters, VmError, VmReply,
};

/// How long a VM's owner thread may take to answer a simple command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a guest gets to shut itself down when the request does not say.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A running VM's handles.
struct Runtime {
    control: VmControl,
    counters: VmCounters,
    thread: Option<JoinHandle<()>>,
    /// Files the VM stands on (drive images, a restored VM's memory file).
    backing: Vec<BackingFile>,
}

/// What the host knows of one VM.
struct SlotState {
    config: VmConfig,
    state: VmState,
    exit_reason: Option<String>,
    boot_count: u64,
    runtime: Option<Runtime>,
}

/// Sends host events to every subscriber that is still listening.
#[derive(Default)]
struct Broadcaster {
    subscribers: Mutex<Vec<mpsc::Sender<HostEvent>>>,
}

impl Broadcaster {
    fn send(&self, event: HostEvent) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| s.send(event.clone()).is_ok());
    }

    fn subscribe(&self) -> mpsc::Receiver<HostEvent> {
        let (tx, rx) = mpsc::channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }
}

/// One VM's place on the host.
struct Slot {
    name: String,
    inner: Mutex<SlotState>,
    changed: Condvar,
    events: Arc<Broadcaster>,
}

impl Slot {
    fn new(name: &str, config: VmConfig, events: Arc<Broadcaster>) -> Arc<Slot> {
        Arc::new(Slot {
            name: name.to_string(),
            inner: Mutex::new(SlotState {
                config,
                state: VmState::Created,
                exit_reason: None,
                boot_count: 0,
                runtime: None,
            }),
            changed: Condvar::new(),
            events,
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the state (the caller holds the lock as `s`), telling subscribers and waiters.
    fn set_state(&self, s: &mut SlotState, state: VmState) {
        if s.state != state {
            let previous = std::mem::replace(&mut s.state, state);
            self.events.send(HostEvent::VmStateChanged {
                name: self.name.clone(),
                previous,
                current: state,
            });
        }
        self.changed.notify_all();
    }
}

/// How a host treats its VMs' consoles and sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostOptions {
    /// Write each VM's serial console to `<state_dir>/<vm>/serial.log` unless its config says
    /// otherwise (a multi-VM host); when false the consoles go to the process's stdout.
    pub serial_logs: bool,
    /// Feed the process's stdin to the VMs' serial consoles (a single-VM, foreground host).
    pub stdin_console: bool,
    /// Each VM has a Firecracker-compatible API socket at `<state_dir>/<vm>/firecracker.sock`.
    pub firecracker_sockets: bool,
    /// Each VM has an interactive console at `<state_dir>/<vm>/console.sock` unless its config
    /// names one.
    pub console_sockets: bool,
}

/// The host.
pub struct Host {
    hv: Hypervisor,
    options: HostOptions,
    state_dir: PathBuf,
    vms: Mutex<BTreeMap<String, Arc<Slot>>>,
    events: Arc<Broadcaster>,
    migrations: crate::migration::Migrations,
    /// The host itself, for migration threads (set by [`Host::into_shared`]).
    me: std::sync::OnceLock<std::sync::Weak<Host>>,
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(e.to_string())
}

fn vm_error(e: VmError) -> ControlError {
    if e.is_config_error() {
        ControlError::BadRequest(e.to_string())
    } else {
        ControlError::Internal(e.to_string())
    }
}

fn control_error(e: VmControlError) -> ControlError {
    match e {
        VmControlError::Gone => ControlError::Conflict("the VM is not running".into()),
        VmControlError::Failed(msg) => ControlError::Internal(msg),
    }
}

/// How an ended VM is reported: its new state and the reason.
fn ended(reason: &ExitReason) -> (VmState, String) {
    match reason {
        ExitReason::GuestReset => (VmState::Stopped, "the guest reset itself".into()),
        ExitReason::GuestShutdown => (VmState::Stopped, "the guest powered off".into()),
        ExitReason::TripleFault => (VmState::Stopped, "the guest triple-faulted".into()),
        ExitReason::Requested { .. } => (VmState::Stopped, "stopped by request".into()),
        ExitReason::VcpuError(msg) => (VmState::Failed, msg.clone()),
    }
}

/// A name for a VM on a host: a valid VM name that is also a plain directory name under the
/// state directory (no leading dot).
fn valid_name(name: &str) -> bool {
    lockstep_api::config::validate_name(name).is_ok() && !name.starts_with('.')
}

impl Host {
    /// A host with no VMs, keeping its files under `state_dir`.
    pub fn new(hv: Hypervisor, state_dir: &Path, options: HostOptions) -> std::io::Result<Host> {
        private_fs::create_private_dir(state_dir)?;
        Ok(Host {
            hv,
            options,
            state_dir: state_dir.to_owned(),
            vms: Mutex::new(BTreeMap::new()),
            events: Arc::default(),
            migrations: Default::default(),
            me: Default::default(),
        })
    }

    /// The host behind an `Arc`, as endpoints hold it; live migration needs a host made so.
    pub fn into_shared(self) -> Arc<Host> {
        let host = Arc::new(self);
        let _ = host.me.set(Arc::downgrade(&host));
        host
    }

    fn vms(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>, ControlError> {
        self.vms()
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.to_string()))
    }

    /// The folder holding a VM's files.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    fn info(&self, slot: &Slot, s: &SlotState) -> VmInfo {
        VmInfo {
            name: slot.name.clone(),
            state: s.state,
            vcpus: s.config.machine_config.vcpu_count,
            mem_size_mib: s.config.machine_config.mem_size_mib,
            exit_reason: s.exit_reason.clone(),
            serial_log: s.config.serial.output_path.clone(),
            console_socket: s.config.serial.console_socket.clone(),
            firecracker_socket: self
                .options
                .firecracker_sockets
                .then(|| self.vm_dir(&slot.name).join("firecracker.sock")),
            boot_count: s.boot_count,
        }
    }

    /// Gives a VM config the host's defaults: its serial log in the VM's folder (0700).
    fn place(&self, config: &mut VmConfig, name: &str) -> Result<(), ControlError> {
        let dir = self.vm_dir(name);
        private_fs::create_private_dir(&dir)
            .map_err(|e| internal(format!("cannot create {}: {e}", dir.display())))?;
        if config.serial.output_path.is_none() && self.options.serial_logs {
            let log = host_paths::serial_log_in(&dir);
            // A log left by an older run keeps no wider mode than a new one gets.
            if std::fs::symlink_metadata(&log).is_ok_and(|m| m.is_file()) {
                std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| internal(format!("{}: {e}", log.display())))?;
            }
            config.serial.output_path = Some(log);
        }
        if config.serial.console_socket.is_none() && self.options.console_sockets {
            config.serial.console_socket = Some(host_paths::console_socket_in(&dir));
        }
        config.name = Some(name.to_string());
        Ok(())
    }

    /// Checks a VM's paths against the host's files and the other VMs' (see [`host_paths`]),
    /// and that its console socket takes nobody's socket or file.
    fn check_paths(&self, name: &str, config: &VmConfig) -> Result<(), ControlError> {
        let slots: Vec<Arc<Slot>> = self.vms().values().cloned().collect();
        let others: Vec<(String, VmConfig)> = slots
            .iter()
            .filter(|slot| slot.name != name)
            .map(|slot| (slot.name.clone(), slot.lock().config.clone()))
            .collect();
        host_paths::check_vm_paths(
            &self.state_dir,
            name,
            config,
            others.iter().map(|(n, c)| (n.as_str(), c)),
        )
        .map_err(ControlError::BadRequest)?;
        host_paths::check_console_socket(config).map_err(|e| match e {
            SocketPathError::InUse(_) => {
                ControlError::Conflict(format!("serial.console_socket: {e}"))
            }
            _ => ControlError::BadRequest(format!("serial.console_socket: {e}")),
        })
    }

    /// Runs `vm` on a new owner thread and records it in `slot` (whose lock the caller holds).
    fn launch(
        &self,
        slot: &Arc<Slot>,
        s: &mut SlotState,
        vm: Vm,
        paused: bool,
    ) -> Result<(), ControlError> {
        let (control, receiver) = VmControl::new().map_err(internal)?;
        let counters = vm.counters();
        let backing = vm.backing_files().to_vec();
        let input = if self.options.stdin_console && s.config.serial.output_path.is_none() {
            let stdin = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map_err(internal)?;
            Some(Box::new(std::fs::File::from(stdin)) as Box<dyn ConsoleInput>)
        } else {
            None
        };
        let owner = slot.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vm-{}", slot.name))
            .spawn(move || {
                let options = RunOptions {
                    control: Some(receiver),
                    paused,
                    input,
                    ..Default::default()
                };
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| vm.run(options)));
                let (state, reason) = match outcome {
                    Ok(Ok(reason)) => ended(&reason),
                    Ok(Err(e)) => (VmState::Failed, e.to_string()),
                    Err(_) => (VmState::Failed, "the VM's VMM thread panicked".to_string()),
                };
                log::info!("{}: {reason}", owner.name);
                let mut s = owner.lock();
                s.exit_reason = Some(reason);
                s.runtime = None;
                owner.set_state(&mut s, state);
            })
            .map_err(internal)?;
        s.runtime = Some(Runtime {
            control,
            counters,
            thread: Some(thread),
            backing,
        });
        s.exit_reason = None;
        s.boot_count += 1;
        slot.set_state(
            s,
            if paused {
                VmState::Paused
            } else {
                VmState::Running
            },
        );
        Ok(())
    }

    fn start_locked(&self, slot: &Arc<Slot>, s: &mut SlotState) -> Result<(), ControlError> {
        if !matches!(
            s.state,
            VmState::Created | VmState::Stopped | VmState::Failed
        ) {
            return Err(ControlError::Conflict(format!(
                "VM {:?} is {:?}; only a VM that is not running can be started",
                slot.name, s.state
            )));
        }
        self.check_paths(&slot.name, &s.config)?;
        let vm = match Vm::create(&self.hv, &s.config) {
            Ok(vm) => vm,
            Err(e) => {
                s.exit_reason = Some(e.to_string());
                slot.set_state(s, VmState::Failed);
                return Err(vm_error(e));
            }
        };
        self.launch(slot, s, vm, false)
    }

    /// Sends a command to a running VM without holding its lock while waiting.
    fn command(
        &self,
        slot: &Slot,
        command: VmCommand,
        timeout: Duration,
    ) -> Result<VmReply, ControlError> {
        let control = slot
            .lock()
            .runtime
            .as_ref()
            .map(|r| r.control.clone())
            .ok_or_else(|| ControlError::Conflict(format!("VM {:?} is not running", slot.name)))?;
        control.call(command, timeout).map_err(control_error)
    }

    /// Stops a VM by force (if it runs) and waits for its owner thread to end.
    fn stop_and_wait(&self, slot: &Slot) -> Result<(), ControlError> {
        let thread = {
            let mut s = slot.lock();
            let Some(runtime) = s.runtime.as_mut() else {
                return Ok(());
            };
            let _ = runtime.control.call(VmCommand::Stop, COMMAND_TIMEOUT);
            runtime.thread.take()
        };
        if let Some(thread) = thread {
            thread
                .join()
                .map_err(|_| internal("the VM's owner thread panicked"))?;
        }
        Ok(())
    }

    /// Waits until the VM is no longer running, or the deadline passes; true if it stopped.
    fn wait_stopped(&self, slot: &Slot, deadline: Instant) -> bool {
        let mut s = slot.lock();
        while s.runtime.is_some() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = slot
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Stops every VM (for the host's own shutdown).
    pub fn stop_all(&self) {
        let slots: Vec<Arc<Slot>> = self.vms().values().cloned().collect();
        for slot in slots {
            if let Err(e) = self.stop_and_wait(&slot) {
                log::warn!("{}: {e}", slot.name);
            }
        }
    }

    fn apply_reply(&self, slot: &Slot, reply: VmReply) -> VmInfo {
        let mut s = slot.lock();
        if let VmReply::State(run) = reply {
            if s.runtime.is_some() {
                let state = match run {
                    RunState::Running => VmState::Running,
                    RunState::Paused => VmState::Paused,
                };
                slot.set_state(&mut s, state);
            }
        }
        self.info(slot, &s)
    }

    fn default_snapshot_paths(&self, name: &str) -> SnapshotPaths {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let dir = self.vm_dir(name).join("snapshots");
        SnapshotPaths {
            state: dir.join(format!("{stamp}.state")),
            memory: dir.join(format!("{stamp}.mem")),
        }
    }
}

impl HostControl for Host {
    fn host_info(&self) -> HostInfo {
        let backend = self.hv.backend();
        HostInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            kvm_backend: backend.short_name().to_string(),
            kvm_backend_description: backend.to_string(),
            mem_mib: self.hv.memory_mib().unwrap_or(0),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            vm_count: self.vms().len(),
        }
    }

    fn list_vms(&self) -> Vec<VmInfo> {
        let slots: Vec<Arc<Slot>> = self.vms().values().cloned().collect();
        slots
            .iter()
            .map(|slot| self.info(slot, &slot.lock()))
            .collect()
    }

    fn create_vm(&self, mut config: VmConfig, start: bool) -> Result<VmInfo, ControlError> {
        let name = config
            .name
            .clone()
            .ok_or_else(|| ControlError::BadRequest("name: a VM on a host needs a name".into()))?;
        if !valid_name(&name) {
            return Err(ControlError::BadRequest(format!(
                "name: {name:?} is not a valid VM name: use 1 to 64 of A-Z a-z 0-9 - _ ."
            )));
        }
        if self.vms().contains_key(&name) || self.migrations.name_reserved(&name) {
            return Err(ControlError::Conflict(format!(
                "a VM named {name:?} exists already (or is arriving by migration)"
            )));
        }
        config
            .validate(&self.hv.host_limits())
            .map_err(|e| ControlError::BadRequest(e.to_string()))?;
        self.check_paths(&name, &config)?;
        self.place(&mut config, &name)?;
        self.check_paths(&name, &config)?;
        let slot = Slot::new(&name, config, self.events.clone());
        {
            let mut vms = self.vms();
            if vms.contains_key(&name) {
                return Err(ControlError::Conflict(format!(
                    "a VM named {name:?} exists already"
                )));
            }
            vms.insert(name.clone(), slot.clone());
        }
        log::info!("{name}: defined");
        self.events
            .send(HostEvent::VmCreated { name: name.clone() });
        let mut s = slot.lock();
        if start {
            self.start_locked(&slot, &mut s)?;
        }
        Ok(self.info(&slot, &s))
    }

    fn get_vm(&self, name: &str) -> Result<VmDetails, ControlError> {
        let slot = self.slot(name)?;
        let s = slot.lock();
        Ok(VmDetails {
            info: self.info(&slot, &s),
            config: s.config.clone(),
        })
    }

    fn start_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        let slot = self.slot(name)?;
        let mut s = slot.lock();
        self.start_locked(&slot, &mut s)?;
        Ok(self.info(&slot, &s))
    }

    fn pause_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        let slot = self.slot(name)?;
        let reply = self.command(&slot, VmCommand::Pause, COMMAND_TIMEOUT)?;
        Ok(self.apply_reply(&slot, reply))
    }

    fn resume_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        let slot = self.slot(name)?;
        let reply = self.command(&slot, VmCommand::Resume, COMMAND_TIMEOUT)?;
        Ok(self.apply_reply(&slot, reply))
    }

    fn shutdown_vm(&self, name: &str, request: ShutdownRequest) -> Result<VmInfo, ControlError> {
        let slot = self.slot(name)?;
        if slot.lock().runtime.is_none() {
            return Err(ControlError::Conflict(format!(
                "VM {name:?} is not running"
            )));
        }
        if !request.force {
            let timeout = request
                .timeout_s
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
            match self.command(&slot, VmCommand::SendCtrlAltDel, COMMAND_TIMEOUT) {
                Ok(_) => {
                    {
                        let mut s = slot.lock();
                        if s.runtime.is_some() {
                            slot.set_state(&mut s, VmState::ShuttingDown);
                        }
                    }
                    if self.wait_stopped(&slot, Instant::now() + timeout) {
                        let info = self.info(&slot, &slot.lock());
                        return Ok(info);
                    }
                    log::info!("{name}: the guest did not stop within {timeout:?}; stopping it");
                }
                Err(e) => log::info!("{name}: cannot ask the guest to stop ({e}); stopping it"),
            }
        }
        self.stop_and_wait(&slot)?;
        let info = self.info(&slot, &slot.lock());
        Ok(info)
    }

    fn reset_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        let slot = self.slot(name)?;
        self.stop_and_wait(&slot)?;
        let mut s = slot.lock();
        self.start_locked(&slot, &mut s)?;
        Ok(self.info(&slot, &s))
    }

    fn delete_vm(&self, name: &str) -> Result<(), ControlError> {
        let slot = self.slot(name)?;
        self.stop_and_wait(&slot)?;
        self.vms().remove(name);
        log::info!("{name}: deleted");
        self.events.send(HostEvent::VmDeleted {
            name: name.to_string(),
        });
        Ok(())
    }

    fn snapshot_vm(
        &self,
        name: &str,
        request: SnapshotRequest,
    ) -> Result<SnapshotInfo, ControlError> {
        let slot = self.slot(name)?;
        let defaults = self.default_snapshot_paths(name);
        let paths = SnapshotPaths {
            state: request.state_path.unwrap_or(defaults.state),
            memory: request.memory_path.unwrap_or(defaults.memory),
        };
        for (field, path) in [("state_path", &paths.state), ("memory_path", &paths.memory)] {
            host_paths::check_in_own_folder(&self.state_dir, name, field, path)
                .map_err(ControlError::BadRequest)?;
        }
        for path in [&paths.state, &paths.memory] {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                // The host's snapshots folder is made private; folders a user names are made
                // 0700 only where they do not exist yet.
                let made = if dir.starts_with(&self.state_dir) {
                    private_fs::create_private_dir(dir)
                } else {
                    private_fs::create_dirs(dir)
                };
                made.map_err(|e| {
                    ControlError::BadRequest(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        // Every VM of this host, not only this one: a snapshot over another VM's disk or
        // memory file would change that VM under it.
        let backing: Vec<(String, BackingFile)> = self
            .vms()
            .values()
            .flat_map(|other| {
                let s = other.lock();
                let files = s.runtime.as_ref().map(|r| r.backing.clone());
                files
                    .unwrap_or_default()
                    .into_iter()
                    .map(|f| (other.name.clone(), f))
                    .collect::<Vec<_>>()
            })
            .collect();
        files::check_destinations(&paths.state, &paths.memory, &backing)
            .map_err(|e| ControlError::BadRequest(e.to_string()))?;
        let started = Instant::now();
        match self.command(&slot, VmCommand::Snapshot(paths.clone()), SNAPSHOT_TIMEOUT)? {
            // Snapshot files hold the guest's memory: they are written 0600 whatever the umask
            // (`snapshot::files::AtomicFile`).
            VmReply::Snapshot(stats) => Ok(SnapshotInfo {
                state_path: paths.state,
                memory_path: paths.memory,
                state_bytes: stats.state_bytes,
                memory_bytes: stats.memory_bytes,
                duration_ms: started.elapsed().as_secs_f64() * 1e3,
            }),
            other => Err(internal(format!("unexpected answer {other:?}"))),
        }
    }

    fn restore_vm(&self, request: RestoreRequest) -> Result<VmInfo, ControlError> {
        let paths = SnapshotPaths {
            state: request.state_path.clone(),
            memory: request.memory_path.clone(),
        };
        let mut chosen: Option<String> = None;
        let mut new_dir: Option<PathBuf> = None;
        let vm = Vm::restore_with(&self.hv, &paths, |config| {
            let name = request.name.clone().or_else(|| config.name.clone()).unwrap_or_else(|| "restored".into());
            if !valid_name(&name)
                || self.vms().contains_key(&name)
                || self.migrations.name_reserved(&name)
            {
                return Err(format!("a VM named {name:?} exists already, or the name is invalid; choose another with \"name\""));
            }
            if request.name.is_some() || config.name.is_none() {
                // A new name gets a serial log and console of its own.
                config.serial.output_path = None;
                config.serial.console_socket = None;
            }
            // The snapshot may come from another host: what a host placed is placed afresh
            // here, and what remains is checked as a new VM's config is.
            host_paths::forget_host_managed(config, &self.state_dir);
            self.check_paths(&name, config).map_err(|e| e.to_string())?;
            let dir = self.vm_dir(&name);
            new_dir = (!dir.exists()).then_some(dir);
            self.place(config, &name).map_err(|e| e.to_string())?;
            self.check_paths(&name, config).map_err(|e| e.to_string())?;
            chosen = Some(name);
            Ok(())
        })
        .map_err(|e| {
            // A failed restore leaves no folder behind (an empty one only: never what another
            // VM or the user put there).
            if let Some(dir) = &new_dir {
                let _ = std::fs::remove_dir(dir);
            }
            vm_error(e)
        })?;
        let name = chosen.expect("set by the config adjustment");
        let slot = Slot::new(&name, vm.config().clone(), self.events.clone());
        let mut vms = self.vms();
        if vms.contains_key(&name) {
            return Err(ControlError::Conflict(format!(
                "a VM named {name:?} exists already"
            )));
        }
        let mut s = slot.lock();
        self.launch(&slot, &mut s, vm, !request.resume)?;
        let info = self.info(&slot, &s);
        drop(s);
        vms.insert(name.clone(), slot);
        drop(vms);
        self.events.send(HostEvent::VmCreated { name });
        Ok(info)
    }

    fn vm_metrics(&self, name: &str) -> Result<VmMetrics, ControlError> {
        let slot = self.slot(name)?;
        let s = slot.lock();
        let mut vcpu: BTreeMap<String, u64> = BTreeMap::new();
        let mut devices = Vec::new();
        if let Some(runtime) = &s.runtime {
            for counters in &runtime.counters.vcpus {
                for (k, v) in counters.counters() {
                    *vcpu.entry(k.to_string()).or_default() += v;
                }
            }
            for (kind, id, counters) in &runtime.counters.devices {
                devices.push(DeviceMetrics {
                    kind: kind.to_string(),
                    id: id.clone(),
                    counters: counters
                        .counters()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                });
            }
        }
        Ok(VmMetrics {
            name: name.to_string(),
            vcpu,
            devices,
        })
    }

    fn update_vm(&self, name: &str, mut config: VmConfig) -> Result<VmInfo, ControlError> {
        let slot = self.slot(name)?;
        if config.name.as_deref().is_some_and(|n| n != name) {
            return Err(ControlError::BadRequest(format!(
                "name: a VM cannot be renamed (from {name:?})"
            )));
        }
        config
            .validate(&self.hv.host_limits())
            .map_err(|e| ControlError::BadRequest(e.to_string()))?;
        self.check_paths(name, &config)?;
        self.place(&mut config, name)?;
        self.check_paths(name, &config)?;
        let mut s = slot.lock();
        if s.runtime.is_some() {
            return Err(ControlError::Conflict(format!(
                "VM {name:?} is {:?}; stop it to change its settings",
                s.state
            )));
        }
        s.config = config;
        let info = self.info(&slot, &s);
        drop(s);
        self.events.send(HostEvent::VmModified {
            name: name.to_string(),
        });
        Ok(info)
    }

    fn subscribe(&self) -> mpsc::Receiver<HostEvent> {
        self.events.subscribe()
    }

    fn migrate_incoming(&self, request: IncomingRequest) -> Result<IncomingInfo, ControlError> {
        crate::migration::start_incoming(self.shared()?, request)
    }

    fn migrate_vm(
        &self,
        name: &str,
        request: MigrateRequest,
    ) -> Result<MigrationInfo, ControlError> {
        crate::migration::start_outgoing(self.shared()?, name, request)
    }

    fn get_migration(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        self.migrations.get(id)
    }

    fn cancel_migration(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        self.migrations.cancel(id)
    }

    fn failover_migration(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        self.migrations.failover(id)
    }

    fn list_migrations(&self) -> Vec<MigrationInfo> {
        self.migrations.list()
    }
}
