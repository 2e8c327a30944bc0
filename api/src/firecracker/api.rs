//! The Firecracker API's routes and their mapping onto [`HostControl`] (see the module above
//! for the mapping table).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::model::{
    ActionType, BackendType, FirecrackerVersion, InstanceActionInfo, InstanceInfo, Logger,
    MetricsConfig, RunState, SerialDevice, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
    VmStatePatch,
};
use super::pending::PendingConfig;
use crate::config::{BootSource, HostLimits, MachineConfig, MAX_VCPUS};
use crate::control::{
    ControlError, HostControl, RestoreRequest, ShutdownRequest, SnapshotRequest, VmDetails, VmState,
};
use crate::devices::{DriveConfig, EntropyConfig, NetConfig, VsockConfig};
use crate::error::ConfigError;
use crate::http::routes::{self, Route, RouteMatch};
use crate::http::server::{empty_reply, json_reply, Handler, Reply, Request, RequestProblem};
use crate::http::{parse_json_body, MAX_BODY_BYTES};

/// The Firecracker API version `GET /version` reports: the release whose API this layer
/// follows. Clients compare it with the minimum they need.
pub const FIRECRACKER_API_VERSION: &str = "1.12.0";
/// Seconds the guest gets to stop after `SendCtrlAltDel` before the host stops the VM by force.
pub const CTRL_ALT_DEL_GRACE_S: u64 = 10;

const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
const ID_MISMATCH: &str = "The id from the path does not match the id from the body!";
const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Describe,
    Version,
    Action,
    GetMachineConfig,
    PutMachineConfig,
    PatchMachineConfig,
    BootSource,
    Drive,
    NetworkInterface,
    Vsock,
    Entropy,
    Serial,
    Logger,
    Metrics,
    PatchVm,
    VmConfig,
    SnapshotCreate,
    SnapshotLoad,
}

const ROUTES: &[Route<Op>] = &[
    Route::new(Method::GET, "/", Op::Describe),
    Route::new(Method::GET, "/version", Op::Version),
    Route::new(Method::PUT, "/actions", Op::Action),
    Route::new(Method::GET, "/machine-config", Op::GetMachineConfig),
    Route::new(Method::PUT, "/machine-config", Op::PutMachineConfig),
    Route::new(Method::PATCH, "/machine-config", Op::PatchMachineConfig),
    Route::new(Method::PUT, "/boot-source", Op::BootSource),
    Route::new(Method::PUT, "/drives/{drive_id}", Op::Drive),
    Route::new(
        Method::PUT,
        "/network-interfaces/{iface_id}",
        Op::NetworkInterface,
    ),
    Route::new(Method::PUT, "/vsock", Op::Vsock),
    Route::new(Method::PUT, "/entropy", Op::Entropy),
    Route::new(Method::PUT, "/serial", Op::Serial),
    Route::new(Method::PUT, "/logger", Op::Logger),
    Route::new(Method::PUT, "/metrics", Op::Metrics),
    Route::new(Method::PATCH, "/vm", Op::PatchVm),
    Route::new(Method::GET, "/vm/config", Op::VmConfig),
    Route::new(Method::PUT, "/snapshot/create", Op::SnapshotCreate),
    Route::new(Method::PUT, "/snapshot/load", Op::SnapshotLoad),
];

/// A refused request: 400 with Firecracker's `fault_message`, or 500 for host failures.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    message: String,
}

fn bad(message: impl Into<String>) -> Failure {
    Failure {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
    }
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Failure {
        let status = match e {
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        Failure {
            status,
            message: e.to_string(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Failure {
        bad(e.to_string())
    }
}

/// Whether a VM in `state` runs guest code (or is about to stop doing so).
fn is_live(state: VmState) -> bool {
    matches!(
        state,
        VmState::Running | VmState::Paused | VmState::ShuttingDown
    )
}

/// Whether the VM exists on the host yet.
enum Phase {
    /// Not yet: pre-boot resources are being gathered.
    PreBoot,
    /// It does, in this state and with this config.
    Defined(Box<VmDetails>),
}

/// What the API keeps between requests.
#[derive(Default)]
struct FcState {
    pending: PendingConfig,
    metrics_path: Option<PathBuf>,
}

/// Firecracker's API for one VM.
pub(crate) struct FirecrackerApi {
    host: Arc<dyn HostControl>,
    vm_name: String,
    /// Held for a whole request: like Firecracker's single API thread, requests run one at a time.
    state: Mutex<FcState>,
}

fn body<T: DeserializeOwned>(request: &Request) -> Result<T, Failure> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad(format!(
            "{} {} needs a JSON body",
            request.method, request.path
        )));
    }
    Ok(parse_json_body(&request.body)?)
}

fn no_content() -> Reply {
    empty_reply(StatusCode::NO_CONTENT)
}

impl FirecrackerApi {
    pub(crate) fn new(host: Arc<dyn HostControl>, vm_name: String) -> FirecrackerApi {
        FirecrackerApi {
            host,
            vm_name,
            state: Mutex::new(FcState::default()),
        }
    }

    fn phase(&self) -> Result<Phase, Failure> {
        match self.host.get_vm(&self.vm_name) {
            Ok(details) => Ok(Phase::Defined(Box::new(details))),
            Err(ControlError::NotFound(_)) => Ok(Phase::PreBoot),
            Err(e) => Err(e.into()),
        }
    }

    /// The VM's details, or Firecracker's refusal before the VM exists.
    fn defined(&self) -> Result<VmDetails, Failure> {
        match self.phase()? {
            Phase::PreBoot => Err(bad(NOT_BEFORE_START)),
            Phase::Defined(details) => Ok(*details),
        }
    }

    fn limits(&self) -> HostLimits {
        let mem_mib = match self.host.host_info().mem_mib {
            0 => u64::MAX,
            known => known,
        };
        HostLimits {
            mem_mib,
            max_vcpus: MAX_VCPUS,
        }
    }

    /// Changes one pre-boot section: in the pending config while the VM does not exist, in the
    /// host's config (`update_vm`) while it is defined but not running; refused once it runs.
    fn configure(
        &self,
        state: &mut FcState,
        section: &str,
        change: impl FnOnce(&mut PendingConfig) -> Result<(), Failure>,
    ) -> Result<Reply, Failure> {
        match self.phase()? {
            Phase::PreBoot => {
                let mut candidate = state.pending.clone();
                change(&mut candidate)?;
                candidate.check_section(&self.vm_name, section, &self.limits())?;
                state.pending = candidate;
            }
            Phase::Defined(d) if !is_live(d.info.state) => {
                let mut candidate = PendingConfig::from_vm_config(&d.config);
                change(&mut candidate)?;
                candidate.check_section(&self.vm_name, section, &self.limits())?;
                if let Some(config) = candidate.to_vm_config(&self.vm_name) {
                    self.host.update_vm(&self.vm_name, config)?;
                }
            }
            Phase::Defined(_) => return Err(bad(NOT_AFTER_START)),
        }
        Ok(no_content())
    }

    fn dispatch(&self, request: &Request) -> Result<Reply, Failure> {
        let (op, params) = match routes::find(ROUTES, &request.method, &request.path) {
            RouteMatch::Found(op, params) => (op, params),
            _ => {
                return Err(bad(format!(
                    "Invalid request method and/or path: {} {}.",
                    request.method,
                    request.path.trim_start_matches('/')
                )))
            }
        };
        let id = params.first().copied().unwrap_or_default();
        // A panic while holding the lock leaves the state as the last request left it.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        let ok = StatusCode::OK;
        match op {
            Op::Describe => Ok(json_reply(ok, &self.instance_info()?)),
            Op::Version => Ok(json_reply(
                ok,
                &FirecrackerVersion {
                    firecracker_version: FIRECRACKER_API_VERSION,
                },
            )),
            Op::GetMachineConfig => match self.phase()? {
                Phase::PreBoot => Ok(json_reply(ok, &state.pending.machine_config)),
                Phase::Defined(d) => Ok(json_reply(ok, &d.config.machine_config)),
            },
            Op::VmConfig => match self.phase()? {
                Phase::PreBoot => Ok(json_reply(ok, &state.pending)),
                Phase::Defined(d) => Ok(json_reply(ok, &d.config)),
            },
            Op::PutMachineConfig => {
                let machine = body::<MachineConfig>(request)?;
                self.configure(state, "machine-config", |c| {
                    c.machine_config = machine;
                    Ok(())
                })
            }
            Op::PatchMachineConfig => self.configure(state, "machine-config", |c| {
                Ok(c.patch_machine_config(&request.body)?)
            }),
            Op::BootSource => {
                let boot = body::<BootSource>(request)?;
                self.configure(state, "boot-source", |c| {
                    c.boot_source = Some(boot);
                    Ok(())
                })
            }
            Op::Drive => {
                let drive = body::<DriveConfig>(request)?;
                if drive.drive_id != id {
                    return Err(bad(ID_MISMATCH));
                }
                self.configure(state, "drives", |c| {
                    c.put_drive(drive);
                    Ok(())
                })
            }
            Op::NetworkInterface => {
                let iface = body::<NetConfig>(request)?;
                if iface.iface_id != id {
                    return Err(bad(ID_MISMATCH));
                }
                self.configure(state, "network-interfaces", |c| {
                    c.put_interface(iface);
                    Ok(())
                })
            }
            Op::Vsock => {
                let vsock = body::<VsockConfig>(request)?;
                self.configure(state, "vsock", |c| {
                    c.vsock = Some(vsock);
                    Ok(())
                })
            }
            Op::Entropy => {
                let entropy = body::<EntropyConfig>(request)?;
                self.configure(state, "entropy", |c| {
                    c.entropy = Some(entropy);
                    Ok(())
                })
            }
            Op::Serial => {
                let serial = body::<SerialDevice>(request)?;
                if serial.rate_limiter.is_some() {
                    return Err(bad(
                        "rate_limiter: rate limiting is not supported by lockstep",
                    ));
                }
                self.configure(state, "serial", |c| {
                    c.serial.output_path = serial.serial_out_path;
                    Ok(())
                })
            }
            Op::Logger => {
                let logger = body::<Logger>(request)?;
                log::warn!(
                    "{}: Firecracker API: PUT /logger accepted, but lockstep logs through the host's log{}",
                    self.vm_name,
                    logger
                        .log_path
                        .map(|p| format!("; {} is not written", p.display()))
                        .unwrap_or_default()
                );
                Ok(no_content())
            }
            Op::Metrics => {
                let metrics = body::<MetricsConfig>(request)?;
                if state.metrics_path.is_some() {
                    return Err(bad("Reinitialization of metrics not allowed."));
                }
                state.metrics_path = Some(metrics.metrics_path);
                Ok(no_content())
            }
            Op::Action => self.action(state, body::<InstanceActionInfo>(request)?.action_type),
            Op::PatchVm => {
                let wanted = body::<VmStatePatch>(request)?.state;
                let current = self.defined()?.info.state;
                match (wanted, current) {
                    (RunState::Paused, VmState::Paused) | (RunState::Resumed, VmState::Running) => {
                    }
                    (RunState::Paused, _) => {
                        self.host.pause_vm(&self.vm_name)?;
                    }
                    (RunState::Resumed, _) => {
                        self.host.resume_vm(&self.vm_name)?;
                    }
                }
                Ok(no_content())
            }
            Op::SnapshotCreate => {
                let params = body::<SnapshotCreateParams>(request)?;
                self.defined()?;
                if params.snapshot_type == Some(SnapshotType::Diff) {
                    return Err(bad(
                        "snapshot_type: lockstep writes full snapshots only; use \"Full\"",
                    ));
                }
                let request = SnapshotRequest {
                    state_path: Some(params.snapshot_path),
                    memory_path: Some(params.mem_file_path),
                };
                self.host.snapshot_vm(&self.vm_name, request)?;
                Ok(no_content())
            }
            Op::SnapshotLoad => {
                let params = body::<SnapshotLoadParams>(request)?;
                let configured = match self.phase()? {
                    Phase::PreBoot => !state.pending.is_empty(),
                    Phase::Defined(d) if is_live(d.info.state) => return Err(bad(NOT_AFTER_START)),
                    // The host has a config for this VM already.
                    Phase::Defined(_) => true,
                };
                if configured {
                    return Err(bad(
                        "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
                    ));
                }
                let request = restore_request(params, &self.vm_name)?;
                self.host.restore_vm(request)?;
                Ok(no_content())
            }
        }
    }

    fn instance_info(&self) -> Result<InstanceInfo, Failure> {
        let state = match self.phase()? {
            Phase::PreBoot => "Not started",
            Phase::Defined(d) => match d.info.state {
                VmState::Running | VmState::ShuttingDown => "Running",
                VmState::Paused => "Paused",
                VmState::Created | VmState::Stopped | VmState::Failed => "Not started",
            },
        };
        Ok(InstanceInfo {
            id: self.vm_name.clone(),
            state,
            vmm_version: env!("CARGO_PKG_VERSION"),
            app_name: "lockstep",
        })
    }

    fn action(&self, state: &mut FcState, action: ActionType) -> Result<Reply, Failure> {
        match action {
            ActionType::InstanceStart => match self.phase()? {
                Phase::PreBoot => {
                    let config = state.pending.to_vm_config(&self.vm_name).ok_or_else(|| {
                        bad("Cannot start the microVM without a boot source: PUT /boot-source first.")
                    })?;
                    self.host.create_vm(config, true)?;
                    // The host holds the config now; GET /vm/config reads it from there.
                    state.pending = PendingConfig::default();
                    Ok(no_content())
                }
                Phase::Defined(d) if is_live(d.info.state) => Err(bad(NOT_AFTER_START)),
                Phase::Defined(_) => {
                    self.host.start_vm(&self.vm_name)?;
                    Ok(no_content())
                }
            },
            ActionType::SendCtrlAltDel => {
                let d = self.defined()?;
                if !is_live(d.info.state) {
                    return Err(bad(format!(
                        "The microVM is not running (it is {:?}).",
                        d.info.state
                    )));
                }
                self.send_ctrl_alt_del()?;
                Ok(no_content())
            }
            ActionType::FlushMetrics => {
                if let Some(path) = &state.metrics_path {
                    if let Phase::Defined(_) = self.phase()? {
                        self.flush_metrics(path)?;
                    }
                }
                Ok(no_content())
            }
        }
    }

    /// Firecracker returns once the key press is sent; the host's shutdown waits for the guest,
    /// so it runs on a thread of its own and this reply does not wait.
    fn send_ctrl_alt_del(&self) -> Result<(), Failure> {
        let host = self.host.clone();
        let name = self.vm_name.clone();
        let request = ShutdownRequest {
            timeout_s: Some(CTRL_ALT_DEL_GRACE_S),
            force: false,
        };
        std::thread::Builder::new()
            .name("fc-ctrl-alt-del".into())
            .spawn(move || {
                lockstep_seccomp::install(lockstep_seccomp::ThreadKind::FirecrackerApi);
                match host.shutdown_vm(&name, request) {
                    Ok(info) => log::info!("{name}: SendCtrlAltDel: the VM is {:?}", info.state),
                    Err(e) => log::warn!("{name}: SendCtrlAltDel: {e}"),
                }
            })
            .map_err(|e| Failure {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("cannot start the shutdown: {e}"),
            })?;
        Ok(())
    }

    /// Appends the VM's counters to the metrics file as one JSON line. A FIFO without a reader
    /// is an error rather than a request that never ends.
    fn flush_metrics(&self, path: &Path) -> Result<(), Failure> {
        let metrics = self.host.vm_metrics(&self.vm_name)?;
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let mut line =
            serde_json::json!({"utc_timestamp_ms": millis, "lockstep": metrics}).to_string();
        line.push('\n');
        let fail =
            |e: std::io::Error| bad(format!("Cannot flush metrics to {}: {e}", path.display()));
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(fail)?;
        file.write_all(line.as_bytes()).map_err(fail)
    }
}

/// Firecracker's load parameters as the host's restore request, refusing what lockstep lacks.
fn restore_request(params: SnapshotLoadParams, vm_name: &str) -> Result<RestoreRequest, Failure> {
    let memory_path = match (params.mem_file_path, params.mem_backend) {
        (Some(path), None) => path,
        (None, Some(backend)) if backend.backend_type == BackendType::File => backend.backend_path,
        (None, Some(_)) => return Err(bad(
            "mem_backend.backend_type: lockstep loads guest memory from a file only; use \"File\"",
        )),
        (Some(_), Some(_)) => {
            return Err(bad(
                "Only one of mem_file_path and mem_backend may be given.",
            ))
        }
        (None, None) => return Err(bad("Either mem_backend or mem_file_path is required.")),
    };
    if !params.network_overrides.is_empty() {
        return Err(bad("network_overrides: not supported by lockstep"));
    }
    if params.vsock_override.is_some() {
        return Err(bad("vsock_override: not supported by lockstep"));
    }
    if params.clock_realtime {
        return Err(bad("clock_realtime: not supported by lockstep"));
    }
    Ok(RestoreRequest {
        state_path: params.snapshot_path,
        memory_path,
        name: Some(vm_name.to_string()),
        resume: params.resume_vm,
    })
}

impl Handler for FirecrackerApi {
    fn handle(&self, request: &Request) -> Reply {
        match self.dispatch(request) {
            Ok(reply) => reply,
            Err(failure) => {
                log::debug!(
                    "{}: Firecracker API {} {}: {}",
                    self.vm_name,
                    request.method,
                    request.path,
                    failure.message
                );
                fault(failure.status, &failure.message)
            }
        }
    }

    fn refuse(&self, problem: &RequestProblem) -> Reply {
        match problem {
            RequestProblem::TooLarge => fault(
                StatusCode::BAD_REQUEST,
                &format!("Request payload is larger than the limit of {MAX_BODY_BYTES} bytes allowed by server."),
            ),
            RequestProblem::NotJson(_) => fault(StatusCode::BAD_REQUEST, "The body is not JSON."),
            RequestProblem::Unreadable(e) => fault(
                StatusCode::BAD_REQUEST,
                &format!("Cannot read the request body: {e}"),
            ),
            RequestProblem::HandlerPanicked => fault(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal error: the request's handler failed (see the host's log).",
            ),
            // The Firecracker API listens on a Unix socket only; TCP refusals cannot happen.
            RequestProblem::Unauthorized(why) => fault(StatusCode::UNAUTHORIZED, why),
            RequestProblem::WrongHost(host) => fault(
                StatusCode::MISDIRECTED_REQUEST,
                &format!("Host {host:?} is not this server."),
            ),
        }
    }

    fn json_content_type_only(&self) -> bool {
        false
    }
}

fn fault(status: StatusCode, message: &str) -> Reply {
    json_reply(
        status,
        &super::model::Fault {
            fault_message: message,
        },
    )
}
