//! A VM arriving by live migration: built from its config before its memory arrives (KVM VM,
//! fresh guest memory with its slots, devices), filled while pages stream, and finished from the
//! machine state at the switch. Dropping an unfinished one removes it and any serial log it made.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use lockstep_api::VmConfig;

use super::snapshot::files::CreatedFiles;
use super::snapshot::{MachineSnapshot, SnapshotError};
use super::{
    attach_virtio_devices, create_vcpus, drive_files, host_cpuid, new_kvm_vm, open_serial_output,
    Vm, VmError,
};
use crate::console::ConsoleClient;
use crate::device_manager::DeviceManager;
use crate::exit::ExitSignal;
use crate::kvm::Hypervisor;
use crate::memory::{self, GuestMemoryMmap};

/// What a same-host source handed over: guest memory (its memfds mapped), the taps of the
/// network interfaces in config order, and the vsock device's listener.
#[derive(Debug)]
pub struct HandedOver {
    /// Guest memory.
    pub memory: GuestMemoryMmap,
    /// One tap per network interface, in config order.
    pub taps: Vec<std::fs::File>,
    /// The vsock listener, when the VM has a vsock device.
    pub vsock: Option<std::fs::File>,
}

/// Checks an arriving VM's config as a new VM's; when its vsock listener is `vsock_handed`
/// over, its socket file exists already (the listener is checked when the device takes it).
pub fn validate(
    config: &VmConfig,
    limits: &lockstep_api::HostLimits,
    vsock_handed: bool,
) -> Result<(), lockstep_api::ConfigError> {
    if !vsock_handed {
        return config.validate(limits);
    }
    let mut without = config.clone();
    without.vsock = None;
    without.validate(limits)
}

/// A VM being received.
pub struct IncomingVm {
    config: VmConfig,
    // Declared before `memory`: KVM lets go of the slots before the memory is unmapped.
    vcpus: Vec<crate::vcpu::Vcpu>,
    msr_list: Arc<Vec<u32>>,
    devices: DeviceManager,
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    console_client: Option<ConsoleClient>,
    created: CreatedFiles,
}

fn incompatible(why: impl Into<String>) -> VmError {
    SnapshotError::Incompatible {
        path: "migration stream".into(),
        why: why.into(),
    }
    .into()
}

impl IncomingVm {
    /// Checks `config` against the host and builds the VM: the KVM VM, guest memory (zeroed, or
    /// the memory a same-host source `handed` over) and its slots, the devices (on the taps and
    /// vsock listener handed over, if any), the serial output and the vCPUs (their state comes
    /// at the switch, so that the switch only sets state).
    pub fn prepare(
        hv: &Hypervisor,
        config: &VmConfig,
        handed: Option<HandedOver>,
    ) -> Result<IncomingVm, VmError> {
        validate(
            config,
            &hv.host_limits(),
            handed.as_ref().is_some_and(|h| h.vsock.is_some()),
        )?;
        let machine = &config.machine_config;
        if machine.huge_pages != lockstep_api::HugePages::None {
            return Err(incompatible("VMs on huge pages cannot migrate yet"));
        }
        let mut created = CreatedFiles::default();
        if let Some(log) = &config.serial.output_path {
            created.note_if_new(log);
        }
        let vm_fd = new_kvm_vm(hv)?;
        let (memory, taps, vsock) = match handed {
            Some(h) => (h.memory, h.taps, h.vsock),
            None => (
                memory::create_guest_memory(machine.mem_size_mib << 20, false)?,
                Vec::new(),
                None,
            ),
        };
        memory::register_memory_slots(&vm_fd, &memory, machine.track_dirty_pages)?;
        let mut devices = DeviceManager::new(vm_fd.clone(), memory.clone())?;
        let ids = config.network_interfaces.iter().map(|i| i.iface_id.clone());
        devices.use_passed_taps(ids.zip(taps).collect());
        devices.use_passed_vsock(vsock);
        attach_virtio_devices(&mut devices, config)?;
        let (serial_out, console_client) = open_serial_output(config)?;
        devices.add_serial(serial_out)?;
        let (vcpus, msr_list) = create_vcpus(hv, &vm_fd, &devices, config)?;
        // The CPUID the source gave its vCPUs, if it runs on a host like this one: the switch
        // then need not set it (it sets whatever the state holds, if that differs).
        for (vcpu, cpuid) in vcpus.iter().zip(host_cpuid(hv, &vcpus, config)) {
            vcpu.set_cpuid(&cpuid)?;
        }
        Ok(IncomingVm {
            config: config.clone(),
            vcpus,
            msr_list,
            devices,
            vm_fd,
            memory,
            console_client,
            created,
        })
    }

    /// The VM's config (as placed on this host).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// True when the VM has a vsock device.
    pub fn has_vsock(&self) -> bool {
        self.config.vsock.is_some()
    }

    /// Takes the open connections a same-host source handed over at the switch: the vsock
    /// device adopts its connections when [`IncomingVm::finish`] loads its state (the guest
    /// sees no reset), and the console client is the console's from the start.
    pub fn adopt_connections(&mut self, handed: crate::migration::HandedConnections) {
        if !self.devices.use_handed_connections(handed.vsock) {
            log::debug!("vsock connections handed over to a VM without a vsock device");
        }
        match (&self.console_client, handed.console) {
            (Some(client), Some(stream)) => {
                let mut slot = client.lock().unwrap_or_else(|p| p.into_inner());
                slot.stream = Some(stream);
                slot.handed_input = handed.console_input;
            }
            (None, Some(_)) => log::info!("the console client handed over has no console here"),
            _ => {}
        }
    }

    /// Guest memory, to be filled from the stream.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Loads the machine state (already decoded and checked by
    /// [`super::snapshot::decode_and_check`]) into the devices, vCPUs and KVM VM: the VM is
    /// ready to run. The files made for it (a new serial log) come along: dropped, they go
    /// (the VM never ran here); kept once it runs.
    pub fn finish(self, snapshot: &MachineSnapshot) -> Result<(Vm, CreatedFiles), VmError> {
        let config = self.config;
        if snapshot.regions != memory::region_layout(&self.memory) {
            return Err(incompatible("the state's memory regions are not the VM's"));
        }
        if snapshot.vcpus.len() != config.machine_config.vcpu_count as usize {
            return Err(incompatible("the state's vCPU count is not the config's"));
        }
        self.devices
            .restore_state(&snapshot.devices, &self.memory)
            .map_err(incompatible)?;
        let vcpus = self.vcpus;
        for (vcpu, state) in vcpus.iter().zip(&snapshot.vcpus) {
            state
                .restore(vcpu.fd())
                .map_err(|e| incompatible(format!("vCPU {}: {e}", vcpu.index())))?;
        }
        snapshot
            .vm
            .restore(&self.vm_fd)
            .map_err(|e| incompatible(e.to_string()))?;
        let backing = drive_files(&config);
        let vm = Vm {
            config,
            vcpus,
            vm_fd: self.vm_fd,
            memory: self.memory,
            devices: self.devices,
            entry: None,
            exit: Arc::new(ExitSignal::new().map_err(|e| VmError::EventLoop(e.to_string()))?),
            msr_list: self.msr_list,
            console_client: self.console_client,
            backing,
        };
        Ok((vm, self.created))
    }
}
