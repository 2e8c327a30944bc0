//! The host's KVM: opening `/dev/kvm`, checking what lockstep needs, and telling which kind of
//! backend runs it (hardware virtualization, or PVM's software backend).

use std::fmt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};
use lockstep_api::HostLimits;
use thiserror::Error;

/// Capabilities lockstep cannot run without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::UserMemory, "user memory slots"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::ImmediateExit, "immediate exit"),
    (Cap::MpState, "MP state"),
    (Cap::AdjustClock, "KVM clock control"),
];

/// Why KVM cannot be used.
#[derive(Debug, Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and is this user allowed to use it?)")]
    Open(#[source] kvm_ioctls::Error),
    /// The kernel's KVM API is not the stable one.
    #[error("unsupported KVM API version {0} (12 expected)")]
    ApiVersion(i32),
    /// The host's KVM lacks a capability lockstep needs.
    #[error("this host's KVM lacks a capability lockstep needs: {0}")]
    MissingCap(&'static str),
    /// A system-wide KVM query failed.
    #[error("KVM {what}: {source}")]
    Query {
        /// What was asked.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Which implementation of KVM this host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmBackend {
    /// Intel VT-x (kvm_intel): guests run natively, any kernel boots.
    IntelVmx,
    /// AMD-V (kvm_amd): guests run natively, any kernel boots.
    AmdSvm,
    /// PVM (kvm_pvm), a software backend: guest CPL0 code is emulated, CPL3 code runs natively.
    /// Ordinary Linux kernels cannot boot; lockstep's PVM guest kernel can.
    Pvm,
    /// A KVM module lockstep does not recognise.
    Unknown,
}

impl KvmBackend {
    /// Looks at the loaded KVM modules.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    fn detect_in(modules: &Path) -> Self {
        if modules.join("kvm_pvm").exists() {
            KvmBackend::Pvm
        } else if modules.join("kvm_intel").exists() {
            KvmBackend::IntelVmx
        } else if modules.join("kvm_amd").exists() {
            KvmBackend::AmdSvm
        } else {
            KvmBackend::Unknown
        }
    }

    /// True when guest code runs on hardware virtualization extensions.
    pub fn is_hardware(self) -> bool {
        matches!(self, KvmBackend::IntelVmx | KvmBackend::AmdSvm)
    }

    /// A short machine-readable name: `vmx`, `svm`, `pvm` or `unknown`.
    pub fn short_name(self) -> &'static str {
        match self {
            KvmBackend::IntelVmx => "vmx",
            KvmBackend::AmdSvm => "svm",
            KvmBackend::Pvm => "pvm",
            KvmBackend::Unknown => "unknown",
        }
    }
}

impl fmt::Display for KvmBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmBackend::IntelVmx => "hardware KVM (Intel VT-x)",
            KvmBackend::AmdSvm => "hardware KVM (AMD-V)",
            KvmBackend::Pvm => "PVM (software KVM backend: guest kernel code is emulated)",
            KvmBackend::Unknown => "KVM (unrecognised backend)",
        })
    }
}

/// An open `/dev/kvm` that has everything lockstep needs, with the host-wide facts every VM
/// asks for read once.
pub struct Hypervisor {
    kvm: Kvm,
    backend: KvmBackend,
    supported_cpuid: kvm_bindings::CpuId,
    msr_list: Vec<u32>,
    /// MemTotal, read once: every VM start and metrics scrape needs it.
    memory_mib: Option<u64>,
    max_vcpus: u32,
}

impl Hypervisor {
    /// Opens `/dev/kvm` and checks its API version and capabilities.
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| KvmError::Query {
                what: "supported CPUID",
                source,
            })?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(|source| KvmError::Query {
                what: "MSR index list",
                source,
            })?
            .as_slice()
            .to_vec();
        let max_vcpus = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        Ok(Hypervisor {
            kvm,
            backend: KvmBackend::detect(),
            supported_cpuid,
            msr_list,
            memory_mib: host_memory_mib(),
            max_vcpus,
        })
    }

    /// The kvm-ioctls handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The CPUID entries KVM can give a guest.
    pub fn supported_cpuid(&self) -> &kvm_bindings::CpuId {
        &self.supported_cpuid
    }

    /// The MSRs KVM saves and restores for a vCPU.
    pub fn msr_list(&self) -> &[u32] {
        &self.msr_list
    }

    /// Which backend runs this host's KVM.
    pub fn backend(&self) -> KvmBackend {
        self.backend
    }

    /// What this host can give a VM: its memory and KVM's vCPU limit.
    pub fn host_limits(&self) -> HostLimits {
        HostLimits {
            mem_mib: self.memory_mib.unwrap_or(u64::MAX),
            max_vcpus: self.max_vcpus,
        }
    }

    /// The host's physical memory in MiB, if /proc/meminfo said.
    pub fn memory_mib(&self) -> Option<u64> {
        self.memory_mib
    }
}

/// The host's physical memory (MemTotal), in MiB.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total_kib(&meminfo).map(|kib| kib / 1024)
}

fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_total() {
        let text = "MemTotal:       24570548 kB\nMemFree:        23000000 kB\n";
        assert_eq!(parse_mem_total_kib(text), Some(24570548));
        assert_eq!(parse_mem_total_kib("nothing"), None);
    }

    #[test]
    fn detects_backend_from_modules() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        assert_eq!(KvmBackend::detect_in(dir.as_path()), KvmBackend::Unknown);
        std::fs::create_dir(dir.as_path().join("kvm_intel")).unwrap();
        assert_eq!(KvmBackend::detect_in(dir.as_path()), KvmBackend::IntelVmx);
        std::fs::create_dir(dir.as_path().join("kvm_pvm")).unwrap();
        assert_eq!(KvmBackend::detect_in(dir.as_path()), KvmBackend::Pvm);
        assert!(!KvmBackend::Pvm.is_hardware());
    }
}
