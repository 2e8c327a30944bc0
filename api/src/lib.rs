//! lockstep's configuration types: the Firecracker-compatible VM config JSON and its validation.
//! Also the control plane: the `HostControl` interface, lockstep's HTTP/JSON API and a
//! Firecracker-compatible API on top of it, and Prometheus metrics.

pub mod config;
pub mod control;
pub mod devices;
mod error;
pub mod firecracker;
pub mod host_config;
pub mod http;
pub mod metrics;
pub mod migration;
#[cfg(any(test, feature = "openapi-check"))]
pub mod openapi_check;
pub mod private_fs;

pub use config::{
    BootProtocol, BootSource, FirecrackerExtras, HostLimits, HugePages, MachineConfig,
    SerialConfig, VmConfig, MAX_CMDLINE_LEN, MAX_VCPUS, MIN_MEM_MIB,
};
pub use devices::{
    parse_mac, CacheType, DriveConfig, EntropyConfig, IoEngine, NetConfig, VsockConfig,
    MAX_VIRTIO_DEVICES,
};
pub use error::ConfigError;
pub use host_config::{HostConfig, HostVm};
