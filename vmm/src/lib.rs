//! lockstep's virtual machine monitor core: KVM, guest memory, vCPUs, boot and the device
//! manager, for x86-64 hosts with hardware KVM or PVM.

pub mod boot;
pub mod console;
pub mod device_manager;
pub mod device_state;
pub mod event_loop;
pub mod exit;
pub mod host;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
pub mod x86_64;

pub use exit::ExitReason;
pub use kvm::{Hypervisor, KvmBackend};
pub use vm::{ConsoleInput, Vm, VmError};
