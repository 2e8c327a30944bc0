//! lockstep's virtual machine monitor core: KVM, guest memory, vCPUs, boot and the device
//! manager, for x86-64 hosts with hardware KVM or PVM.

pub mod boot;
pub mod console;
pub mod device_manager;
pub mod device_state;
pub mod event_loop;
pub mod exit;
pub mod ft;
pub mod host;
mod host_paths;
pub mod kvm;
pub mod memory;
pub mod migration;
pub mod vcpu;
pub mod vm;
pub mod x86_64;

pub use exit::ExitReason;
pub use kvm::{Hypervisor, KvmBackend};
/// Private files, folders and sockets (0600/0700 whatever the umask); see the api crate.
pub use lockstep_api::private_fs;
pub use vm::{ConsoleInput, Vm, VmError};
