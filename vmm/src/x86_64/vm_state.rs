//! VM-wide state KVM holds in the kernel: the two PICs, the IOAPIC, the PIT and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::vcpu_state::VcpuStateError;

/// The in-kernel irqchip, timer and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock (guest time in ns).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock_ns", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

fn get_chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, VcpuStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm(what))?;
    Ok(chip)
}

impl VmState {
    /// Reads the state with every vCPU stopped.
    pub fn save(vm: &VmFd) -> Result<VmState, VcpuStateError> {
        Ok(VmState {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "get master PIC")?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "get slave PIC")?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "get IOAPIC")?,
            pit: vm.get_pit2().map_err(kvm("get PIT"))?,
            clock: vm.get_clock().map_err(kvm("get clock"))?,
        })
    }

    /// Writes the state into a VM whose vCPUs have not run since it was created or paused.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VcpuStateError> {
        vm.set_irqchip(&self.pic_master)
            .map_err(kvm("set master PIC"))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(kvm("set slave PIC"))?;
        vm.set_irqchip(&self.ioapic).map_err(kvm("set IOAPIC"))?;
        vm.set_pit2(&self.pit).map_err(kvm("set PIT"))?;
        // The guest's clock carries on from the value it had when saved. No flags: with
        // KVM_CLOCK_REALTIME (which KVM_GET_CLOCK reports) KVM would add the wall-clock time that
        // passed since `realtime`, and a restored guest would see its clock leap forward.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("set clock"))
    }
}
