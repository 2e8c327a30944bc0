//! Model-specific registers set on each vCPU before its first run.

use kvm_bindings::{kvm_msr_entry, Msrs};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, write-back by default.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSR values a vCPU starts with, limited to those `supported` (KVM's MSR index list) has.
pub fn boot_msrs(supported: &[u32]) -> Msrs {
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    // At most eleven entries: far below the FAM limit.
    Msrs::from_entries(&entries).expect("a handful of MSR entries fit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_supported_msrs_are_set() {
        let msrs = boot_msrs(&[MSR_IA32_TSC, MSR_MTRR_DEF_TYPE, 0x10a]);
        let idx: Vec<u32> = msrs.as_slice().iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![MSR_IA32_TSC, MSR_MTRR_DEF_TYPE]);
        assert_eq!(msrs.as_slice()[1].data, MTRR_ENABLE_WB);
    }
}
