//! A vCPU's complete architectural state as KVM holds it, for snapshots, migration and FT.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a vCPU's state could not be read or written.
#[derive(Debug, Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took or gave fewer MSRs than asked.
    #[error("KVM {what} {done} of {wanted} MSRs (first missing: {missing:#x})")]
    Msrs {
        /// Get or set.
        what: &'static str,
        /// How many went through.
        done: usize,
        /// How many were asked for.
        wanted: usize,
        /// The first one that did not.
        missing: u32,
    },
    /// The saved state is malformed.
    #[error("saved vCPU state: {0}")]
    Malformed(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// Everything about one vCPU that the guest can observe.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (and APIC ID).
    pub index: u32,
    /// CPUID as set.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR in KVM's index list.
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Running, halted, or waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// MSRs whose value depends on others being restored first; they are set last.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

impl VcpuState {
    /// Reads the state of a vCPU that is not running. `msr_list` is KVM's MSR index list.
    pub fn save(index: u32, fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("get CPUID"))?;
        let mut msrs = Msrs::from_entries(
            &msr_list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| VcpuStateError::Malformed(format!("MSR list: {e:?}")))?;
        let done = fd.get_msrs(&mut msrs).map_err(kvm("get MSRs"))?;
        if done != msr_list.len() {
            return Err(VcpuStateError::Msrs {
                what: "gave",
                done,
                wanted: msr_list.len(),
                missing: msr_list[done],
            });
        }
        Ok(VcpuState {
            index,
            cpuid: cpuid.as_slice().to_vec(),
            msrs: msrs.as_slice().to_vec(),
            regs: fd.get_regs().map_err(kvm("get regs"))?,
            sregs: fd.get_sregs().map_err(kvm("get sregs"))?,
            xsave: fd.get_xsave().map_err(kvm("get XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("get XCRs"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("get debug regs"))?,
            lapic: fd.get_lapic().map_err(kvm("get LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(kvm("get MP state"))?,
            events: fd.get_vcpu_events().map_err(kvm("get vCPU events"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Writes the state into a vCPU that is not running. The order matters: CPUID before
    /// anything that checks features, the LAPIC before its deadline MSR, events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|e| VcpuStateError::Malformed(format!("CPUID: {e:?}")))?;
        // Setting a CPUID makes KVM rebuild the vCPU's model (about 100 us under PVM, a tenth
        // of a live migration's pause): a vCPU given this CPUID already (a migration's
        // destination builds its vCPUs with it) keeps it.
        let current = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).ok();
        if current.as_ref().map(|c| c.as_slice()) != Some(cpuid.as_slice()) {
            fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        }
        if let Some(khz) = self.tsc_khz {
            // Hosts without TSC scaling refuse a different frequency; the guest then sees the
            // host's, which is what migration between equal hosts gives anyway.
            if fd.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = fd.set_tsc_khz(khz) {
                    log::warn!(
                        "vCPU {}: cannot set the saved TSC frequency {khz} kHz: {e}",
                        self.index
                    );
                }
            }
        }
        fd.set_sregs(&self.sregs).map_err(kvm("set sregs"))?;
        fd.set_regs(&self.regs).map_err(kvm("set regs"))?;
        // SAFETY: the XSAVE area was read from a vCPU of the same kind with KVM_GET_XSAVE.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("set XCRs"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("set debug regs"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("set LAPIC"))?;
        let (early, late): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = self
            .msrs
            .iter()
            .partition(|m| m.index != MSR_IA32_TSC_DEADLINE);
        for batch in [early, late] {
            if batch.is_empty() {
                continue;
            }
            let msrs = Msrs::from_entries(&batch)
                .map_err(|e| VcpuStateError::Malformed(format!("MSRs: {e:?}")))?;
            let done = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
            if done != batch.len() {
                return Err(VcpuStateError::Msrs {
                    what: "took",
                    done,
                    wanted: batch.len(),
                    missing: batch[done].index,
                });
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set MP state"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("set vCPU events"))?;
        Ok(())
    }
}
