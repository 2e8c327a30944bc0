//! The bodies of Firecracker's API that lockstep's config types do not already cover, with
//! Firecracker's field names (its `firecracker.yaml`). Unknown fields are refused, as
//! Firecracker refuses them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `PUT /actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// The actions Firecracker offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `PATCH /vm`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VmStatePatch {
    pub state: RunState,
}

/// The states `PATCH /vm` can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum RunState {
    Paused,
    Resumed,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotCreateParams {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
    /// Older Firecracker releases took a target snapshot version; accepted and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    pub version: Option<String>,
}

/// Full or diff snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    /// The older way to name the memory file.
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated name of `track_dirty_pages`; lockstep always tracks dirty pages.
    #[serde(default)]
    #[allow(dead_code)]
    pub enable_diff_snapshots: Option<bool>,
    /// lockstep always tracks dirty pages.
    #[serde(default)]
    #[allow(dead_code)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<serde_json::Value>,
    #[serde(default)]
    pub vsock_override: Option<serde_json::Value>,
    #[serde(default)]
    pub clock_realtime: bool,
}

/// Where a snapshot's memory comes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MemoryBackend {
    pub backend_type: BackendType,
    pub backend_path: PathBuf,
}

/// File or userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum BackendType {
    File,
    Uffd,
}

/// `PUT /logger`: accepted for compatibility; lockstep logs through the host's own log.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Logger {
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    #[serde(default)]
    #[allow(dead_code)]
    pub level: Option<LogLevel>,
    #[serde(default)]
    #[allow(dead_code)]
    pub show_level: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    pub show_log_origin: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    pub module: Option<String>,
}

/// Firecracker's log levels (it reads them case-insensitively; these are its spellings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum LogLevel {
    #[serde(alias = "error", alias = "ERROR")]
    Error,
    #[serde(alias = "warning", alias = "WARNING", alias = "Warn", alias = "warn")]
    Warning,
    #[serde(alias = "info", alias = "INFO")]
    Info,
    #[serde(alias = "debug", alias = "DEBUG")]
    Debug,
    #[serde(alias = "trace", alias = "TRACE")]
    Trace,
    #[serde(alias = "off", alias = "OFF")]
    Off,
}

/// `PUT /metrics`: where `FlushMetrics` appends the VM's counters, one JSON object a line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsConfig {
    pub metrics_path: PathBuf,
}

/// `PUT /serial`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SerialDevice {
    #[serde(default)]
    pub serial_out_path: Option<PathBuf>,
    #[serde(default)]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `GET /`.
#[derive(Debug, Serialize)]
pub(crate) struct InstanceInfo {
    pub id: String,
    pub state: &'static str,
    pub vmm_version: &'static str,
    pub app_name: &'static str,
}

/// `GET /version`.
#[derive(Debug, Serialize)]
pub(crate) struct FirecrackerVersion {
    pub firecracker_version: &'static str,
}

/// Every error reply.
#[derive(Debug, Serialize)]
pub(crate) struct Fault<'a> {
    pub fault_message: &'a str,
}
