//! lockstep's configuration types: the Firecracker-compatible VM config JSON and its validation.
//! The HTTP control API will live here too.

pub mod config;
pub mod control;
pub mod devices;
mod error;
pub mod host_config;

pub use config::{
    BootProtocol, BootSource, HostLimits, HugePages, MachineConfig, SerialConfig, VmConfig,
    MAX_CMDLINE_LEN, MAX_VCPUS, MIN_MEM_MIB,
};
pub use devices::{
    parse_mac, CacheType, DriveConfig, EntropyConfig, IoEngine, NetConfig, VsockConfig,
    MAX_VIRTIO_DEVICES,
};
pub use error::ConfigError;
pub use host_config::{HostConfig, HostVm};
