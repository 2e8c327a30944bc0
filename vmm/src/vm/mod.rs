//! One VM: its KVM VM, memory, loaded guest, devices and vCPUs, built from a config. Running it
//! is [`runner`]'s job.

pub mod incoming;
mod runner;
pub mod snapshot;

pub use runner::{
    ConsoleInput, ControlError, ControlReceiver, MigrationAccess, OutputCommand, RunOptions,
    RunState, VmCommand, VmControl, VmReply,
};
pub use snapshot::{SnapshotError, SnapshotPaths, SnapshotStats};

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use lockstep_api::{ConfigError, VmConfig};
use lockstep_devices::virtio::block::{BlockConfig, CacheType};
use lockstep_devices::virtio::net::NetConfig;
use lockstep_devices::virtio::vsock::VsockConfig;
use thiserror::Error;

use crate::boot::{self, BootError};
use crate::console::{self, ConsoleClient, ConsoleTee};
use crate::device_manager::{DeviceCounters, DeviceError, DeviceManager};
use crate::exit::ExitSignal;
use crate::kvm::{Hypervisor, KvmError};
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::vcpu::{Vcpu, VcpuError};
use crate::x86_64::boot_info::{self, BootInfoError};
use crate::x86_64::cpuid::{vcpu_cpuid, CpuTopology};
use crate::x86_64::layout::KVM_TSS_ADDRESS;
use crate::x86_64::mptable::{write_mptable, MpTableError};
use crate::x86_64::msr::boot_msrs;
use crate::x86_64::regs::{setup_boot_vcpu, setup_lapic, BootEntry, RegsError};
use lockstep_devices::metrics::Counters;

/// Why a VM could not be built or run.
#[derive(Debug, Error)]
pub enum VmError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The guest's kernel, initrd or command line cannot be used.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The serial output file could not be opened.
    #[error("serial.output_path: cannot open {path}: {source}")]
    SerialOutput {
        /// The path asked for.
        path: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// KVM is unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A VM-wide KVM call failed.
    #[error("KVM {what}: {source}")]
    KvmSetup {
        /// The call.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot information could not be written.
    #[error("cannot write boot information: {0}")]
    BootInfo(#[source] BootInfoError),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// Boot registers could not be set.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A device could not be set up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The event loop failed.
    #[error("VM event loop: {0}")]
    EventLoop(String),
    /// A snapshot could not be used.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl VmError {
    /// True when the error is the config's fault (bad value, unusable file) rather than the
    /// host's or the VMM's.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            VmError::Config(_)
                | VmError::Boot(_)
                | VmError::SerialOutput { .. }
                | VmError::Device(DeviceError::Backend { .. } | DeviceError::NoSlot(_))
                | VmError::Snapshot(_)
        )
    }
}

fn kvm_setup(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

/// Handles on a VM's counters, valid for as long as the VM lives.
#[derive(Clone)]
pub struct VmCounters {
    /// One per vCPU.
    pub vcpus: Vec<Arc<dyn Counters>>,
    /// One per device.
    pub devices: Vec<DeviceCounters>,
}

/// A VM built from a config and ready to run.
pub struct Vm {
    config: VmConfig,
    // Declared before `memory` so KVM lets go of the memory slots before they are unmapped.
    vcpus: Vec<Vcpu>,
    devices: DeviceManager,
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    entry: Option<BootEntry>,
    exit: Arc<ExitSignal>,
    msr_list: Arc<Vec<u32>>,
    console_client: Option<ConsoleClient>,
    /// Files the VM reads while it runs, which a snapshot must never overwrite.
    backing: Vec<snapshot::files::BackingFile>,
}

impl Vm {
    /// Builds the VM: checks the config against the host, sets up KVM and memory, loads the
    /// guest, and creates devices and vCPUs. Nothing outside the process changes until every
    /// check has passed; the last step opens the serial output file.
    pub fn create(hv: &Hypervisor, config: &VmConfig) -> Result<Vm, VmError> {
        config.validate(&hv.host_limits())?;
        for notice in config.firecracker.notices() {
            log::info!("{}: {notice}", config.display_name());
        }
        let machine = &config.machine_config;
        let vm_fd = new_kvm_vm(hv)?;
        let mem_bytes = machine.mem_size_mib << 20;
        let huge = machine.huge_pages == lockstep_api::HugePages::Hugetlbfs2M;
        let memory = memory::create_guest_memory(mem_bytes, huge)?;
        memory::register_memory_slots(&vm_fd, &memory, machine.track_dirty_pages)?;

        let source = &config.boot_source;
        let kernel = boot::load_kernel(&memory, &source.kernel_image_path, source.boot_protocol)?;
        let initrd = source
            .initrd_path
            .as_deref()
            .map(|p| boot::load_initrd(&memory, p, &kernel))
            .transpose()?;

        let mut devices = DeviceManager::new(vm_fd.clone(), memory.clone())?;
        let mut cmdline_extra = attach_virtio_devices(&mut devices, config)?;
        cmdline_extra.extend(devices.cmdline_entries());
        let cmdline_len =
            boot::write_cmdline(&memory, source.boot_args.as_deref(), &cmdline_extra)?;
        let e820 = boot_info::e820_map(mem_bytes);
        match kernel.entry {
            BootEntry::Linux64(_) => {
                boot_info::write_zero_page(&memory, kernel.setup_header, cmdline_len, initrd, &e820)
            }
            BootEntry::Pvh(_) => boot_info::write_pvh_start_info(&memory, initrd, &e820),
        }
        .map_err(VmError::BootInfo)?;
        let topology = CpuTopology::new(machine.vcpu_count, machine.smt);
        write_mptable(&memory, &topology, machine.vcpu_count)?;

        // Last, once every check has passed: the serial output file.
        let (serial_out, console_client) = open_serial_output(config)?;
        devices.add_serial(serial_out)?;

        let (vcpus, msr_list) = create_vcpus(hv, &vm_fd, &devices, config)?;
        configure_vcpus_for_boot(hv, &vcpus, config, &msr_list)?;
        // Other vCPUs wait for INIT/SIPI from the boot vCPU, as on real hardware.
        setup_boot_vcpu(vcpus[0].fd(), &memory, kernel.entry)?;
        let backing = drive_files(config);

        Ok(Vm {
            config: config.clone(),
            vcpus,
            vm_fd,
            memory,
            devices,
            entry: Some(kernel.entry),
            exit: Arc::new(ExitSignal::new().map_err(|e| VmError::EventLoop(e.to_string()))?),
            msr_list,
            console_client,
            backing,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        self.config.display_name()
    }

    /// How the boot vCPU enters the kernel (none for a restored VM).
    pub fn boot_entry(&self) -> Option<BootEntry> {
        self.entry
    }

    /// Where the VM's counters can be read while it runs: each vCPU's, and each device's.
    pub fn counters(&self) -> VmCounters {
        VmCounters {
            vcpus: self
                .vcpus
                .iter()
                .map(|v| v.metrics().clone() as Arc<dyn Counters>)
                .collect(),
            devices: self.devices.counters(),
        }
    }

    /// The config the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Where the VM's end is recorded; signal it to stop the VM from outside.
    pub fn exit_signal(&self) -> &Arc<ExitSignal> {
        &self.exit
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// A same-host migration switched: the socket files handed over are this VM's now (until
    /// then, dropping it leaves them to the source).
    pub fn own_passed_sockets(&self) {
        self.devices.own_passed_sockets();
    }

    /// The VM's devices (live migration flushes drives and announces interfaces).
    pub(crate) fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Files the VM reads while it runs (its drives' images, the memory file a restored VM
    /// maps): overwriting one would change the guest's disk or memory under it.
    pub fn backing_files(&self) -> &[snapshot::files::BackingFile] {
        &self.backing
    }
}

/// The drive images of `config` as they are now, identified by device and inode.
fn drive_files(config: &VmConfig) -> Vec<snapshot::files::BackingFile> {
    config
        .drives
        .iter()
        .filter_map(|drive| {
            let id = snapshot::files::FileId::of_path(&drive.path_on_host)?;
            Some(snapshot::files::BackingFile {
                role: format!("disk image of drive {:?}", drive.drive_id),
                path: drive.path_on_host.clone(),
                id,
            })
        })
        .collect()
}

/// A KVM VM with the in-kernel irqchip and PIT.
fn new_kvm_vm(hv: &Hypervisor) -> Result<Arc<VmFd>, VmError> {
    let vm_fd = hv.kvm().create_vm().map_err(kvm_setup("create VM"))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_setup("set TSS address"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_setup("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_setup("create PIT"))?;
    Ok(Arc::new(vm_fd))
}

/// The serial output and, with a console socket, the handle through which its client gets the
/// output too.
type SerialOutput = (Box<dyn std::io::Write + Send>, Option<ConsoleClient>);

/// Opens the serial output named by the config (stdout when none).
fn open_serial_output(config: &VmConfig) -> Result<SerialOutput, VmError> {
    let out_path = config.serial.output_path.as_deref();
    let sink = console::open_output(out_path).map_err(|source| VmError::SerialOutput {
        path: out_path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "stdout".into()),
        source,
    })?;
    Ok(match config.serial.console_socket {
        Some(_) => {
            let (tee, client) = ConsoleTee::new(sink);
            (Box::new(tee), Some(client))
        }
        None => (sink, None),
    })
}

/// Creates the vCPUs, wired to the device buses; returns them with KVM's MSR index list. A boot
/// then configures them ([`configure_vcpus_for_boot`]); a restore sets their saved state.
fn create_vcpus(
    hv: &Hypervisor,
    vm_fd: &VmFd,
    devices: &DeviceManager,
    config: &VmConfig,
) -> Result<(Vec<Vcpu>, Arc<Vec<u32>>), VmError> {
    let buses = Arc::new(devices.buses().clone());
    let mut vcpus = Vec::with_capacity(config.machine_config.vcpu_count as usize);
    for index in 0..config.machine_config.vcpu_count {
        let fd = vm_fd
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "create vCPU",
                source,
            })?;
        let reset_line = devices
            .reset_line()
            .map_err(|e| VmError::EventLoop(e.to_string()))?;
        vcpus.push(Vcpu::new(index, fd, buses.clone(), reset_line));
    }
    Ok((vcpus, Arc::new(hv.msr_list().to_vec())))
}

/// Gives fresh vCPUs their CPUID (this VM's topology), boot MSRs and LAPIC wiring.
fn configure_vcpus_for_boot(
    hv: &Hypervisor,
    vcpus: &[Vcpu],
    config: &VmConfig,
    msr_list: &[u32],
) -> Result<(), VmError> {
    let msrs = boot_msrs(msr_list);
    for (vcpu, cpuid) in vcpus.iter().zip(host_cpuid(hv, vcpus, config)) {
        vcpu.configure(&cpuid, &msrs)?;
        setup_lapic(vcpu.fd())?;
    }
    Ok(())
}

/// The CPUID this host gives each of the VM's vCPUs (its topology).
fn host_cpuid(hv: &Hypervisor, vcpus: &[Vcpu], config: &VmConfig) -> Vec<kvm_bindings::CpuId> {
    let machine = &config.machine_config;
    let topology = CpuTopology::new(machine.vcpu_count, machine.smt);
    vcpus
        .iter()
        .map(|vcpu| vcpu_cpuid(hv.supported_cpuid(), vcpu.index(), &topology))
        .collect()
}

/// Adds the config's drives (the root device first, so it is /dev/vda), network interfaces,
/// vsock and entropy devices;
/// returns the command-line parameters they need (`root=...`).
fn attach_virtio_devices(
    devices: &mut DeviceManager,
    config: &VmConfig,
) -> Result<Vec<String>, VmError> {
    let mut params = Vec::new();
    let mut order: Vec<usize> = (0..config.drives.len()).collect();
    order.sort_by_key(|&i| !config.drives[i].is_root_device);
    for i in order {
        let drive = &config.drives[i];
        let block = BlockConfig {
            drive_id: drive.drive_id.clone(),
            path: drive.path_on_host.clone(),
            read_only: drive.is_read_only,
            cache: match drive.cache_type {
                lockstep_api::CacheType::Unsafe => CacheType::Unsafe,
                lockstep_api::CacheType::Writeback => CacheType::Writeback,
            },
        };
        devices.add_block(&block, &format!("drives[{i}]"))?;
        if drive.is_root_device {
            let root = match &drive.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_string(),
            };
            params.push(root);
            params.push(if drive.is_read_only { "ro" } else { "rw" }.to_string());
        }
    }
    for (i, iface) in config.network_interfaces.iter().enumerate() {
        let net = NetConfig {
            iface_id: iface.iface_id.clone(),
            host_dev_name: iface.host_dev_name.clone(),
            guest_mac: iface.mac(),
        };
        devices.add_net(&net, &format!("network-interfaces[{i}]"))?;
    }
    if let Some(vsock) = &config.vsock {
        devices.add_vsock(&VsockConfig {
            guest_cid: vsock.guest_cid,
            uds_path: vsock.uds_path.clone(),
        })?;
    }
    if config.entropy.is_some() {
        devices.add_rng()?;
    }
    Ok(params)
}
