//! lockstep's configuration types: the Firecracker-compatible VM config JSON and its validation.
//! The HTTP control API will live here too.

pub mod config;
mod error;

pub use config::{
    BootProtocol, BootSource, CacheType, DriveConfig, EntropyConfig, HostLimits, HugePages,
    IoEngine, MachineConfig, SerialConfig, VmConfig, MAX_CMDLINE_LEN, MAX_VCPUS,
    MAX_VIRTIO_DEVICES, MIN_MEM_MIB,
};
pub use error::ConfigError;
