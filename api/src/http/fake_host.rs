//! A [`HostControl`] for tests: VMs are entries in a map with a state, following the host's
//! rules for which operation is allowed in which state. It records every call, and every
//! operation on a VM named `broken` fails with an internal error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::control::{
    ControlError, DeviceMetrics, HostControl, HostEvent, HostInfo, RestoreRequest, ShutdownRequest,
    SnapshotInfo, SnapshotRequest, VmDetails, VmInfo, VmMetrics, VmState,
};
use crate::migration::{
    IncomingInfo, IncomingRequest, MigrateRequest, MigrationDirection, MigrationInfo,
    MigrationPhase,
};
use crate::VmConfig;

struct FakeVm {
    config: VmConfig,
    state: VmState,
    boot_count: u64,
}

/// The fake host.
#[derive(Default)]
pub(crate) struct FakeHost {
    vms: Mutex<BTreeMap<String, FakeVm>>,
    calls: Mutex<Vec<String>>,
}

impl FakeHost {
    /// The calls made so far, e.g. `create_vm(web, start=true)`.
    pub(crate) fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// The config a VM was defined with.
    pub(crate) fn config(&self, name: &str) -> Option<VmConfig> {
        self.vms
            .lock()
            .unwrap()
            .get(name)
            .map(|vm| vm.config.clone())
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    /// Every operation on a VM named `broken` fails inside the host.
    fn check_broken(name: &str) -> Result<(), ControlError> {
        if name == "broken" {
            return Err(ControlError::Internal(
                "cannot create the VM: KVM said no".into(),
            ));
        }
        Ok(())
    }

    fn info(name: &str, vm: &FakeVm) -> VmInfo {
        VmInfo {
            name: name.to_string(),
            state: vm.state,
            vcpus: vm.config.machine_config.vcpu_count,
            mem_size_mib: vm.config.machine_config.mem_size_mib,
            exit_reason: (vm.state == VmState::Stopped).then(|| "stopped by request".into()),
            serial_log: Some(PathBuf::from(format!(
                "/var/lib/lockstep/{name}/serial.log"
            ))),
            console_socket: None,
            firecracker_socket: None,
            boot_count: vm.boot_count,
        }
    }

    /// Moves a VM from one of `from` to `to`, or says why it cannot.
    fn transition(
        &self,
        name: &str,
        from: &[VmState],
        to: VmState,
    ) -> Result<VmInfo, ControlError> {
        FakeHost::check_broken(name)?;
        let mut vms = self.vms.lock().unwrap();
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        if !from.contains(&vm.state) {
            return Err(ControlError::Conflict(format!(
                "VM {name:?} is {:?}",
                vm.state
            )));
        }
        if to == VmState::Running && vm.state != VmState::Paused {
            vm.boot_count += 1;
        }
        vm.state = to;
        Ok(FakeHost::info(name, vm))
    }
}

const STOPPED: [VmState; 3] = [VmState::Created, VmState::Stopped, VmState::Failed];
const LIVE: [VmState; 2] = [VmState::Running, VmState::Paused];

impl HostControl for FakeHost {
    fn host_info(&self) -> HostInfo {
        HostInfo {
            version: "0.1.0".into(),
            kvm_backend: "vmx".into(),
            kvm_backend_description: "Intel VT-x".into(),
            mem_mib: 16384,
            cpus: 8,
            vm_count: self.vms.lock().unwrap().len(),
        }
    }

    fn list_vms(&self) -> Vec<VmInfo> {
        let vms = self.vms.lock().unwrap();
        vms.iter().map(|(n, vm)| FakeHost::info(n, vm)).collect()
    }

    fn create_vm(&self, config: VmConfig, start: bool) -> Result<VmInfo, ControlError> {
        let name = config
            .name
            .clone()
            .ok_or_else(|| ControlError::BadRequest("name: a VM on a host needs a name".into()))?;
        self.record(format!("create_vm({name}, start={start})"));
        FakeHost::check_broken(&name)?;
        let mut vms = self.vms.lock().unwrap();
        if vms.contains_key(&name) {
            return Err(ControlError::Conflict(format!(
                "a VM named {name:?} exists already"
            )));
        }
        let vm = FakeVm {
            config,
            state: if start {
                VmState::Running
            } else {
                VmState::Created
            },
            boot_count: u64::from(start),
        };
        let info = FakeHost::info(&name, &vm);
        vms.insert(name, vm);
        Ok(info)
    }

    fn get_vm(&self, name: &str) -> Result<VmDetails, ControlError> {
        FakeHost::check_broken(name)?;
        let vms = self.vms.lock().unwrap();
        let vm = vms
            .get(name)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        Ok(VmDetails {
            info: FakeHost::info(name, vm),
            config: vm.config.clone(),
        })
    }

    fn start_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        self.record(format!("start_vm({name})"));
        self.transition(name, &STOPPED, VmState::Running)
    }

    fn pause_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        self.record(format!("pause_vm({name})"));
        self.transition(name, &[VmState::Running], VmState::Paused)
    }

    fn resume_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        self.record(format!("resume_vm({name})"));
        self.transition(name, &[VmState::Paused], VmState::Running)
    }

    fn shutdown_vm(&self, name: &str, request: ShutdownRequest) -> Result<VmInfo, ControlError> {
        self.record(format!(
            "shutdown_vm({name}, timeout_s={:?}, force={})",
            request.timeout_s, request.force
        ));
        self.transition(name, &LIVE, VmState::Stopped)
    }

    fn reset_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        self.record(format!("reset_vm({name})"));
        self.transition(name, &LIVE, VmState::Running)
    }

    fn delete_vm(&self, name: &str) -> Result<(), ControlError> {
        self.record(format!("delete_vm({name})"));
        FakeHost::check_broken(name)?;
        self.vms
            .lock()
            .unwrap()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| ControlError::NotFound(name.to_string()))
    }

    fn snapshot_vm(
        &self,
        name: &str,
        request: SnapshotRequest,
    ) -> Result<SnapshotInfo, ControlError> {
        self.record(format!(
            "snapshot_vm({name}, {:?}, {:?})",
            request.state_path, request.memory_path
        ));
        FakeHost::check_broken(name)?;
        let vms = self.vms.lock().unwrap();
        let vm = vms
            .get(name)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        if !LIVE.contains(&vm.state) {
            return Err(ControlError::Conflict(format!(
                "VM {name:?} is not running"
            )));
        }
        let dir = PathBuf::from(format!("/var/lib/lockstep/{name}"));
        Ok(SnapshotInfo {
            state_path: request
                .state_path
                .unwrap_or_else(|| dir.join("snapshot.state")),
            memory_path: request
                .memory_path
                .unwrap_or_else(|| dir.join("snapshot.mem")),
            state_bytes: 4096,
            memory_bytes: vm.config.machine_config.mem_size_mib << 20,
            duration_ms: 12.5,
        })
    }

    fn restore_vm(&self, request: RestoreRequest) -> Result<VmInfo, ControlError> {
        self.record(format!(
            "restore_vm({:?}, {:?}, {:?}, resume={})",
            request.state_path, request.memory_path, request.name, request.resume
        ));
        if !request.state_path.is_absolute() {
            return Err(ControlError::BadRequest(format!(
                "cannot open {}: No such file or directory",
                request.state_path.display()
            )));
        }
        let name = request.name.unwrap_or_else(|| "restored".into());
        FakeHost::check_broken(&name)?;
        let text = format!(r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "name": "{name}"}}"#);
        let config =
            VmConfig::from_json(&text).map_err(|e| ControlError::Internal(e.to_string()))?;
        let mut vms = self.vms.lock().unwrap();
        if vms.contains_key(&name) {
            return Err(ControlError::Conflict(format!(
                "a VM named {name:?} exists already"
            )));
        }
        let state = if request.resume {
            VmState::Running
        } else {
            VmState::Paused
        };
        let vm = FakeVm {
            config,
            state,
            boot_count: 1,
        };
        let info = FakeHost::info(&name, &vm);
        vms.insert(name, vm);
        Ok(info)
    }

    fn vm_metrics(&self, name: &str) -> Result<VmMetrics, ControlError> {
        FakeHost::check_broken(name)?;
        let vms = self.vms.lock().unwrap();
        let vm = vms
            .get(name)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        let running = LIVE.contains(&vm.state);
        let devices = if running {
            vm.config
                .drives
                .iter()
                .map(|d| DeviceMetrics {
                    kind: "block".into(),
                    id: Some(d.drive_id.clone()),
                    counters: [
                        ("read_bytes".to_string(), 4096),
                        ("requests".to_string(), 8),
                    ]
                    .into(),
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(VmMetrics {
            name: name.to_string(),
            vcpu: if running {
                [("exits".to_string(), 100), ("mmio_exits".to_string(), 40)].into()
            } else {
                BTreeMap::new()
            },
            devices,
        })
    }

    fn update_vm(&self, name: &str, mut config: VmConfig) -> Result<VmInfo, ControlError> {
        self.record(format!("update_vm({name})"));
        FakeHost::check_broken(name)?;
        if config.name.as_deref().is_some_and(|n| n != name) {
            return Err(ControlError::BadRequest(format!(
                "name: a VM cannot be renamed (from {name:?})"
            )));
        }
        config.name = Some(name.to_string());
        let mut vms = self.vms.lock().unwrap();
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        if !STOPPED.contains(&vm.state) {
            return Err(ControlError::Conflict(format!(
                "VM {name:?} is {:?}; stop it to change its settings",
                vm.state
            )));
        }
        vm.config = config;
        Ok(FakeHost::info(name, vm))
    }

    fn subscribe(&self) -> std::sync::mpsc::Receiver<HostEvent> {
        // No events: the sender is dropped at once, so the receiver sees the end.
        std::sync::mpsc::channel().1
    }

    fn migrate_incoming(&self, request: IncomingRequest) -> Result<IncomingInfo, ControlError> {
        FakeHost::check_broken(&request.name)?;
        self.record(format!("migrate_incoming({})", request.name));
        if self.vms.lock().unwrap().contains_key(&request.name) {
            return Err(ControlError::Conflict("a VM by that name exists".into()));
        }
        Ok(IncomingInfo {
            id: "2".into(),
            listen: request.listen,
            token: "00".repeat(32),
        })
    }

    fn migrate_vm(
        &self,
        name: &str,
        request: MigrateRequest,
    ) -> Result<MigrationInfo, ControlError> {
        FakeHost::check_broken(name)?;
        self.record(format!("migrate_vm({name}, {})", request.destination));
        let vms = self.vms.lock().unwrap();
        let vm = vms
            .get(name)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        if vm.state != VmState::Running {
            return Err(ControlError::Conflict("the VM is not running".into()));
        }
        Ok(fake_migration("1", name, MigrationPhase::Handshake))
    }

    /// Migration `1` is under way, `done` has ended, `broken` fails, others do not exist.
    fn get_migration(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        FakeHost::check_broken(id)?;
        match id {
            "1" => Ok(fake_migration(id, "db", MigrationPhase::Precopy)),
            "done" => Ok(fake_migration(id, "db", MigrationPhase::Completed)),
            _ => Err(ControlError::NotFound(format!("migration {id}"))),
        }
    }

    fn cancel_migration(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        let info = self.get_migration(id)?;
        if info.phase == MigrationPhase::Completed {
            return Err(ControlError::Conflict("it has ended".into()));
        }
        Ok(info)
    }

    fn failover_migration(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        let info = self.get_migration(id)?;
        if info.phase == MigrationPhase::Completed {
            return Err(ControlError::Conflict("it has ended".into()));
        }
        Ok(fake_migration(id, "db", MigrationPhase::Protecting))
    }

    fn list_migrations(&self) -> Vec<MigrationInfo> {
        vec![fake_migration("1", "db", MigrationPhase::Precopy)]
    }
}

fn fake_migration(id: &str, vm: &str, phase: MigrationPhase) -> MigrationInfo {
    MigrationInfo {
        id: id.into(),
        direction: MigrationDirection::Outgoing,
        vm: vm.into(),
        phase,
        round: 1,
        bytes: 4096,
        pages: 1,
        dirty_rate_mib_s: 0.5,
        link_rate_mib_s: 100.0,
        expected_downtime_ms: 1.0,
        remaining_bytes: 0,
        throttle_percent: 0,
        downtime_ms: (phase == MigrationPhase::Completed).then_some(2.0),
        elapsed_ms: 10.0,
        error: None,
        ft: None,
    }
}
