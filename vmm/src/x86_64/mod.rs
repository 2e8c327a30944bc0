//! The x86-64 machine: memory layout, CPUID, MSRs, boot registers, MP table and boot info.

pub mod boot_info;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod vcpu_state;
pub mod vm_state;
