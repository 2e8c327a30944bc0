//! The control plane's view of a lockstep host: the operations the HTTP API (and the CIM
//! endpoint) offer, and the types they exchange. The host implements [`HostControl`]; the
//! endpoints only call it, and never touch a VM's internals.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::migration::{IncomingInfo, IncomingRequest, MigrateRequest, MigrationInfo};
use crate::VmConfig;

/// A VM's life-cycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined, not running (never started, or stopped and ready to start again).
    Created,
    /// Running guest code.
    Running,
    /// Paused: vCPUs and devices stopped where they were.
    Paused,
    /// A shutdown was asked of the guest; waiting for it to stop.
    ShuttingDown,
    /// It ran and has ended (see `exit_reason`); can be started again.
    Stopped,
    /// It could not be built or it crashed (see `exit_reason`); can be started again.
    Failed,
}

/// What the control plane reports about a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's name (unique on the host).
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub mem_size_mib: u64,
    /// Why it stopped or failed, when it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
    /// The file its serial console is written to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log: Option<PathBuf>,
    /// A Unix socket offering the interactive serial console, when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_socket: Option<PathBuf>,
    /// A Unix socket speaking Firecracker's API for this VM, when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firecracker_socket: Option<PathBuf>,
    /// Times this VM has been started.
    pub boot_count: u64,
}

/// A VM's report plus its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDetails {
    /// State and the rest.
    #[serde(flatten)]
    pub info: VmInfo,
    /// The config it was defined with.
    pub config: VmConfig,
}

/// What a graceful shutdown may do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// How long the guest gets to stop itself before the VM is stopped by force (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Skip asking the guest: stop at once.
    #[serde(default)]
    pub force: bool,
}

/// Where to write a snapshot; defaults are under the host's state folder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The state file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_path: Option<PathBuf>,
    /// The guest memory file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_path: Option<PathBuf>,
}

/// A written snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The state file.
    pub state_path: PathBuf,
    /// The guest memory file.
    pub memory_path: PathBuf,
    /// Bytes of machine state.
    pub state_bytes: u64,
    /// Bytes of guest memory.
    pub memory_bytes: u64,
    /// Time taken, milliseconds.
    pub duration_ms: f64,
}

/// A snapshot to bring back as a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The state file.
    pub state_path: PathBuf,
    /// The guest memory file.
    pub memory_path: PathBuf,
    /// The restored VM's name (default: the name in the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Run it at once (default), or leave it paused.
    #[serde(default = "default_true")]
    pub resume: bool,
}

fn default_true() -> bool {
    true
}

/// Counters of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMetrics {
    /// `serial`, `block`, `net`, `rng` or `vsock`.
    pub kind: String,
    /// The drive or interface id, when the device has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Counter name to value.
    pub counters: BTreeMap<String, u64>,
}

/// Counters of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMetrics {
    /// The VM.
    pub name: String,
    /// Counters summed over its vCPUs (exits, pio_exits, mmio_exits, ...).
    pub vcpu: BTreeMap<String, u64>,
    /// Each device.
    pub devices: Vec<DeviceMetrics>,
}

/// What the host reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// lockstep's version.
    pub version: String,
    /// The KVM backend (`vmx`, `svm`, `pvm`, `unknown`).
    pub kvm_backend: String,
    /// A description of it.
    pub kvm_backend_description: String,
    /// Host memory, MiB.
    pub mem_mib: u64,
    /// Host CPUs.
    pub cpus: u32,
    /// VMs defined on the host.
    pub vm_count: usize,
}

/// Something that happened on the host, for subscribers (CIM indications).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HostEvent {
    /// A VM was defined.
    VmCreated {
        /// The VM.
        name: String,
    },
    /// A VM's state changed.
    VmStateChanged {
        /// The VM.
        name: String,
        /// Its state before.
        previous: VmState,
        /// Its state now.
        current: VmState,
    },
    /// A VM's config changed.
    VmModified {
        /// The VM.
        name: String,
    },
    /// A VM was removed.
    VmDeleted {
        /// The VM.
        name: String,
    },
}

/// Why a control operation failed; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ControlError {
    /// No VM by that name (404).
    #[error("no VM named {0:?}")]
    NotFound(String),
    /// The request is malformed or names something invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// The VM is not in a state that allows the operation (409).
    #[error("{0}")]
    Conflict(String),
    /// The host failed to carry it out (500).
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
    /// The HTTP status code for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::NotFound(_) => 404,
            ControlError::BadRequest(_) => 400,
            ControlError::Conflict(_) => 409,
            ControlError::Internal(_) => 500,
        }
    }
}

/// A host's control operations. Every method may block for as long as the operation takes
/// (a snapshot of a large VM, a graceful shutdown): endpoints call them off their I/O threads.
pub trait HostControl: Send + Sync + 'static {
    /// The host itself.
    fn host_info(&self) -> HostInfo;
    /// Every VM, sorted by name.
    fn list_vms(&self) -> Vec<VmInfo>;
    /// Defines a VM from a config (its `name` is required), and starts it when `start`.
    fn create_vm(&self, config: VmConfig, start: bool) -> Result<VmInfo, ControlError>;
    /// One VM with its config.
    fn get_vm(&self, name: &str) -> Result<VmDetails, ControlError>;
    /// Boots a created, stopped or failed VM.
    fn start_vm(&self, name: &str) -> Result<VmInfo, ControlError>;
    /// Pauses a running VM.
    fn pause_vm(&self, name: &str) -> Result<VmInfo, ControlError>;
    /// Resumes a paused VM.
    fn resume_vm(&self, name: &str) -> Result<VmInfo, ControlError>;
    /// Asks the guest to shut down, then stops the VM by force after the timeout (or at once).
    fn shutdown_vm(&self, name: &str, request: ShutdownRequest) -> Result<VmInfo, ControlError>;
    /// Hard reset: stops the VM and boots it again from its config.
    fn reset_vm(&self, name: &str) -> Result<VmInfo, ControlError>;
    /// Removes a VM (stopping it first if it runs).
    fn delete_vm(&self, name: &str) -> Result<(), ControlError>;
    /// Writes a snapshot of a running or paused VM.
    fn snapshot_vm(
        &self,
        name: &str,
        request: SnapshotRequest,
    ) -> Result<SnapshotInfo, ControlError>;
    /// Brings a snapshot back as a VM on this host.
    fn restore_vm(&self, request: RestoreRequest) -> Result<VmInfo, ControlError>;
    /// A VM's counters.
    fn vm_metrics(&self, name: &str) -> Result<VmMetrics, ControlError>;
    /// Replaces the config of a VM that is not running (its name cannot change).
    fn update_vm(&self, name: &str, config: VmConfig) -> Result<VmInfo, ControlError>;
    /// Events from now on, until the receiver is dropped.
    fn subscribe(&self) -> std::sync::mpsc::Receiver<HostEvent>;
    /// Opens a one-shot listener for one incoming VM and returns its token.
    fn migrate_incoming(&self, _request: IncomingRequest) -> Result<IncomingInfo, ControlError> {
        Err(no_migration())
    }
    /// Starts sending a running VM to another host; returns at once.
    fn migrate_vm(
        &self,
        _name: &str,
        _request: MigrateRequest,
    ) -> Result<MigrationInfo, ControlError> {
        Err(no_migration())
    }
    /// A migration's progress.
    fn get_migration(&self, _id: &str) -> Result<MigrationInfo, ControlError> {
        Err(no_migration())
    }
    /// Cancels a migration that has not switched (the source VM runs on).
    fn cancel_migration(&self, _id: &str) -> Result<MigrationInfo, ControlError> {
        Err(no_migration())
    }
    /// A planned failover of a fault-tolerant pair this host is the primary of (`id`, its
    /// outgoing pairing): the secondary takes the VM over at a checkpoint with nothing lost,
    /// and this host's copy ends. Returns at once; the pairing's phase tells the outcome.
    fn failover_migration(&self, _id: &str) -> Result<MigrationInfo, ControlError> {
        Err(no_migration())
    }
    /// Every migration this host has run or runs, both directions, oldest first (for the
    /// counters at `/metrics`, CIM's migration jobs and the terminal's progress line).
    fn list_migrations(&self) -> Vec<MigrationInfo> {
        Vec::new()
    }
}

fn no_migration() -> ControlError {
    ControlError::Conflict("this host does not do live migration".into())
}
