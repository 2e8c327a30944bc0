//! The CPUID a vCPU reports: KVM's supported set, with the topology of this VM written in and
//! the hypervisor leaves (0x4000_0000 and up) passed through as KVM gives them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// How the VM's vCPUs are arranged: one package of `cores` cores with `threads` threads each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    /// Hardware threads per core (1, or 2 with SMT).
    pub threads_per_core: u32,
    /// Cores in the package.
    pub cores_per_package: u32,
}

impl CpuTopology {
    /// The topology for `vcpus` vCPUs, two threads a core when `smt` is asked for.
    pub fn new(vcpus: u32, smt: bool) -> Self {
        let threads_per_core = if smt && vcpus > 1 { 2 } else { 1 };
        CpuTopology {
            threads_per_core,
            cores_per_package: (vcpus / threads_per_core).max(1),
        }
    }

    /// Logical processors in the package.
    pub fn logical_per_package(&self) -> u32 {
        self.threads_per_core * self.cores_per_package
    }

    /// Bits of the APIC ID that number the thread inside its core.
    fn smt_shift(&self) -> u32 {
        ceil_log2(self.threads_per_core)
    }

    /// Bits of the APIC ID below the package number.
    fn package_shift(&self) -> u32 {
        self.smt_shift() + ceil_log2(self.cores_per_package)
    }

    /// APIC ID of the vCPU with this index. With one or two threads per core, numbering
    /// thread-first gives contiguous IDs that match the shifts above.
    pub fn apic_id(&self, cpu_index: u32) -> u32 {
        cpu_index
    }
}

fn ceil_log2(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// CPU vendor, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    Amd,
    Other,
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    match entries.iter().find(|e| e.function == 0) {
        // "GenuineIntel" / "AuthenticAMD" as EBX, EDX, ECX.
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e) => {
            Vendor::Intel
        }
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163) => Vendor::Amd,
        _ => Vendor::Other,
    }
}

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// The CPUID for vCPU `cpu_index`, derived from KVM's supported set.
pub fn vcpu_cpuid(supported: &CpuId, cpu_index: u32, topo: &CpuTopology) -> CpuId {
    let mut cpuid = supported.clone();
    let entries = cpuid.as_mut_slice();
    let vendor = vendor(entries);
    let apic_id = topo.apic_id(cpu_index);
    let logical = topo.logical_per_package();
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (logical.min(255) << 16) | ((apic_id & 0xff) << 24);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if logical > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 if vendor == Vendor::Intel && e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level <= 2 {
                    topo.threads_per_core
                } else {
                    logical
                };
                e.eax &= !((0xfff << 14) | (0x3f << 26));
                e.eax |= ((sharing - 1) & 0xfff) << 14;
                e.eax |= ((topo.cores_per_package - 1) & 0x3f) << 26;
            }
            0xb | 0x1f => {
                let (shift, count, level_type) = match e.index {
                    0 => (topo.smt_shift(), topo.threads_per_core, 1),
                    1 => (topo.package_shift(), logical, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (topo.package_shift() << 12) | ((logical - 1) & 0xff);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = ((topo.threads_per_core - 1) << 8) | (cpu_index / topo.threads_per_core);
                e.ecx = 0;
            }
            // Everything else, the hypervisor leaves included, stays as KVM reports it.
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn intel_base() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, [0x806f8, 0xff0f_0800, 0x7ffa_3223, 0x1f8b_fbff]),
            entry(4, 0, [0x3c00_4121, 0, 0, 0]),
            entry(4, 3, [0x3c03_c163, 0, 0, 0]),
            entry(0xb, 0, [9, 9, 9, 9]),
            entry(0xb, 1, [9, 9, 9, 9]),
            entry(0xb, 2, [9, 9, 9, 9]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_of_four_vcpus() {
        let topo = CpuTopology::new(4, false);
        let c = vcpu_cpuid(&intel_base(), 3, &topo);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "initial APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let l4 = find(&c, 4, 0);
        assert_eq!(l4.eax >> 26, 3, "cores per package - 1");
        assert_eq!((l4.eax >> 14) & 0xfff, 0, "L1 not shared");
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 3, "L3 shared by all");
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
        let end = find(&c, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = vcpu_cpuid(&intel_base(), 0, &CpuTopology::new(1, false));
        assert_eq!(find(&c, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!((find(&c, 1, 0).ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn smt_topology() {
        let topo = CpuTopology::new(6, true);
        assert_eq!(topo.threads_per_core, 2);
        assert_eq!(topo.cores_per_package, 3);
        let c = vcpu_cpuid(&intel_base(), 5, &topo);
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx), (1, 2));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx), (3, 6));
    }

    #[test]
    fn hypervisor_leaves_pass_through() {
        let base = intel_base();
        let c = vcpu_cpuid(&base, 1, &CpuTopology::new(2, false));
        assert_eq!(find(&c, 0x4000_0000, 0), find(&base, 0x4000_0000, 0));
    }

    #[test]
    fn log2() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(ceil_log2), [0, 1, 2, 2, 3, 3, 4]);
    }
}
