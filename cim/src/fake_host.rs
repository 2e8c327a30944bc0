//! An in-memory `HostControl` for tests and benchmarks: VMs that change state on command and
//! report it to subscribers, with no KVM behind them. A graceful shut down takes a little while,
//! as a guest's would. Migrations happen at once: a VM sent with the token of a listener this
//! same fake host opened completes (and stays here); any other token fails as the handshake
//! would. Fault-tolerant pairings are added by hand ([`FakeHost::add_ft_pairing`]); a planned
//! failover of a primary's pairing is recorded ([`FakeHost::failovers`]) and ends its copy at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

use lockstep_api::control::{
    ControlError, DeviceMetrics, HostControl, HostEvent, HostInfo, RestoreRequest, ShutdownRequest,
    SnapshotInfo, SnapshotRequest, VmDetails, VmInfo, VmMetrics, VmState,
};
use lockstep_api::migration::{
    FtRedundancy, FtStatus, IncomingInfo, IncomingRequest, MigrateRequest, MigrationDirection,
    MigrationInfo, MigrationPhase,
};
use lockstep_api::VmConfig;

/// A fake host.
pub struct FakeHost {
    vms: Mutex<BTreeMap<String, VmDetails>>,
    subscribers: Mutex<Vec<Sender<HostEvent>>>,
    /// Migrations and the tokens of the incoming ones.
    migrations: Mutex<Vec<(MigrationInfo, Option<String>)>>,
    /// The pairings asked for a planned failover, by migration id, in order.
    failovers: Mutex<Vec<String>>,
    /// How long a graceful shut down takes.
    pub guest_shutdown: Duration,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost {
            vms: Mutex::new(BTreeMap::new()),
            subscribers: Mutex::new(Vec::new()),
            migrations: Mutex::new(Vec::new()),
            failovers: Mutex::new(Vec::new()),
            guest_shutdown: Duration::from_millis(300),
        }
    }
}

/// A small VM config named `name`.
pub fn sample_config(name: &str, vcpus: u32, mem_mib: u64) -> VmConfig {
    let mut c = VmConfig::from_json(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "/boot/vmlinux-{name}"}}, "name": "{name}",
            "drives": [{{"drive_id": "rootfs", "path_on_host": "/var/lib/images/{name}.ext4", "is_root_device": true}}],
            "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap-{name}", "guest_mac": "06:00:ac:10:00:02"}}]}}"#
    ))
    .unwrap_or_else(|e| panic!("sample config: {e}"));
    c.machine_config.vcpu_count = vcpus;
    c.machine_config.mem_size_mib = mem_mib;
    c
}

impl FakeHost {
    /// A host with `n` stopped VMs, `vm000`, `vm001`, ...
    pub fn with_vms(n: usize) -> FakeHost {
        let host = FakeHost::default();
        for i in 0..n {
            let name = format!("vm{i:03}");
            let _ = host.create_vm(
                sample_config(&name, 1 + (i % 4) as u32, 128 * (1 + (i % 4) as u64)),
                false,
            );
        }
        host
    }

    /// Records a fault-tolerant pairing of `vm` on this host, fully redundant: as the primary
    /// (`role` `primary`: outgoing, protecting) or the secondary (incoming, standby) of pair
    /// `pair`. Returns its migration id.
    pub fn add_ft_pairing(&self, vm: &str, role: &str, pair: &str) -> String {
        let (direction, phase) = if role == "primary" {
            (MigrationDirection::Outgoing, MigrationPhase::Protecting)
        } else {
            (MigrationDirection::Incoming, MigrationPhase::Standby)
        };
        let id = self.add_migration(direction, vm, phase, None).id;
        self.update_migration(&id, |m| {
            m.bytes = 1 << 20;
            m.ft = Some(FtStatus {
                role: role.into(),
                pair: pair.into(),
                epoch: 120,
                committed_epoch: Some(119),
                since_commit_ms: Some(20.0),
                pause_p50_ms: 2.5,
                pause_p99_ms: 7.0,
                replication_mib_s: 3.0,
                arbiter_epoch: 1,
                redundancy: FtRedundancy::Full,
            });
        });
        id
    }

    /// Sets a pairing's redundancy, as the FT core does at every change.
    pub fn set_ft_redundancy(&self, id: &str, redundancy: FtRedundancy) {
        self.update_migration(id, |m| {
            if let Some(ft) = m.ft.as_mut() {
                ft.redundancy = redundancy;
            }
        });
    }

    /// The pairings asked for a planned failover, by migration id, in order.
    pub fn failovers(&self) -> Vec<String> {
        self.failovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes migration `id` in place; returns it afterwards.
    fn update_migration(
        &self,
        id: &str,
        change: impl FnOnce(&mut MigrationInfo),
    ) -> Option<MigrationInfo> {
        let mut all = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        let (m, _) = all.iter_mut().find(|(m, _)| m.id == id)?;
        change(m);
        Some(m.clone())
    }

    /// Records a migration; returns it.
    fn add_migration(
        &self,
        direction: MigrationDirection,
        vm: &str,
        phase: MigrationPhase,
        token: Option<String>,
    ) -> MigrationInfo {
        let mut all = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        let info = MigrationInfo {
            elapsed_ms: 1.0,
            ..MigrationInfo::new((all.len() + 1).to_string(), direction, vm, phase)
        };
        all.push((info.clone(), token));
        info
    }

    fn emit(&self, event: HostEvent) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| s.send(event.clone()).is_ok());
    }

    fn set_state(
        &self,
        name: &str,
        allowed: &[VmState],
        to: VmState,
    ) -> Result<VmInfo, ControlError> {
        let (previous, info) = {
            let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
            let vm = vms
                .get_mut(name)
                .ok_or_else(|| ControlError::NotFound(name.into()))?;
            let previous = vm.info.state;
            if !allowed.contains(&previous) {
                return Err(ControlError::Conflict(format!("{name} is {previous:?}")));
            }
            vm.info.state = to;
            if to == VmState::Running && previous != VmState::Paused {
                vm.info.boot_count += 1;
            }
            (previous, vm.info.clone())
        };
        if previous != to {
            self.emit(HostEvent::VmStateChanged {
                name: name.into(),
                previous,
                current: to,
            });
        }
        Ok(info)
    }
}

fn validate(config: &VmConfig) -> Result<String, ControlError> {
    let name = config
        .name
        .clone()
        .ok_or_else(|| ControlError::BadRequest("a VM on a host needs a name".into()))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ControlError::BadRequest(format!(
            "{name:?} is not a valid VM name"
        )));
    }
    let m = &config.machine_config;
    if m.vcpu_count == 0 || m.vcpu_count > 32 {
        return Err(ControlError::BadRequest(format!(
            "machine-config.vcpu_count: {} is out of range",
            m.vcpu_count
        )));
    }
    if m.mem_size_mib < 16 {
        return Err(ControlError::BadRequest(format!(
            "machine-config.mem_size_mib: {} is too small",
            m.mem_size_mib
        )));
    }
    Ok(name)
}

impl HostControl for FakeHost {
    fn host_info(&self) -> HostInfo {
        HostInfo {
            version: "0.1.0-fake".into(),
            kvm_backend: "unknown".into(),
            kvm_backend_description: "fake host for tests".into(),
            mem_mib: 24 * 1024,
            cpus: 2,
            vm_count: self.vms.lock().map(|v| v.len()).unwrap_or(0),
        }
    }

    fn list_vms(&self) -> Vec<VmInfo> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.values().map(|d| d.info.clone()).collect()
    }

    fn create_vm(&self, config: VmConfig, start: bool) -> Result<VmInfo, ControlError> {
        let name = validate(&config)?;
        {
            let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
            if vms.contains_key(&name) {
                return Err(ControlError::Conflict(format!(
                    "a VM named {name:?} exists"
                )));
            }
            let info = VmInfo {
                name: name.clone(),
                state: VmState::Created,
                vcpus: config.machine_config.vcpu_count,
                mem_size_mib: config.machine_config.mem_size_mib,
                exit_reason: None,
                serial_log: Some(PathBuf::from(format!(
                    "/var/lib/lockstep/{name}/serial.log"
                ))),
                console_socket: None,
                firecracker_socket: None,
                boot_count: 0,
            };
            vms.insert(name.clone(), VmDetails { info, config });
        }
        self.emit(HostEvent::VmCreated { name: name.clone() });
        if start {
            return self.start_vm(&name);
        }
        self.get_vm(&name).map(|d| d.info)
    }

    fn get_vm(&self, name: &str) -> Result<VmDetails, ControlError> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))
    }

    fn start_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        self.set_state(
            name,
            &[VmState::Created, VmState::Stopped, VmState::Failed],
            VmState::Running,
        )
    }

    fn pause_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        self.set_state(name, &[VmState::Running], VmState::Paused)
    }

    fn resume_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        self.set_state(name, &[VmState::Paused], VmState::Running)
    }

    fn shutdown_vm(&self, name: &str, request: ShutdownRequest) -> Result<VmInfo, ControlError> {
        if request.force {
            return self.set_state(
                name,
                &[VmState::Running, VmState::Paused, VmState::ShuttingDown],
                VmState::Stopped,
            );
        }
        self.set_state(name, &[VmState::Running], VmState::ShuttingDown)?;
        std::thread::sleep(self.guest_shutdown);
        self.set_state(name, &[VmState::ShuttingDown], VmState::Stopped)
    }

    fn reset_vm(&self, name: &str) -> Result<VmInfo, ControlError> {
        self.set_state(name, &[VmState::Running, VmState::Paused], VmState::Running)
    }

    fn delete_vm(&self, name: &str) -> Result<(), ControlError> {
        let removed = self
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if removed.is_none() {
            return Err(ControlError::NotFound(name.into()));
        }
        self.emit(HostEvent::VmDeleted { name: name.into() });
        Ok(())
    }

    fn snapshot_vm(
        &self,
        name: &str,
        _request: SnapshotRequest,
    ) -> Result<SnapshotInfo, ControlError> {
        Err(ControlError::Internal(format!(
            "{name}: the fake host takes no snapshots"
        )))
    }

    fn restore_vm(&self, _request: RestoreRequest) -> Result<VmInfo, ControlError> {
        Err(ControlError::Internal(
            "the fake host restores no snapshots".into(),
        ))
    }

    fn vm_metrics(&self, name: &str) -> Result<VmMetrics, ControlError> {
        let d = self.get_vm(name)?;
        let boots = d.info.boot_count;
        let mut devices = Vec::new();
        for drive in &d.config.drives {
            devices.push(DeviceMetrics {
                kind: "block".into(),
                id: Some(drive.drive_id.clone()),
                counters: [
                    ("reads", 10 * boots),
                    ("writes", 3 * boots),
                    ("bytes_read", 40960 * boots),
                    ("bytes_written", 12288 * boots),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            });
        }
        for nic in &d.config.network_interfaces {
            devices.push(DeviceMetrics {
                kind: "net".into(),
                id: Some(nic.iface_id.clone()),
                counters: [
                    ("rx_frames", 5 * boots),
                    ("tx_frames", 7 * boots),
                    ("rx_bytes", 500 * boots),
                    ("tx_bytes", 700 * boots),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            });
        }
        Ok(VmMetrics {
            name: name.into(),
            vcpu: BTreeMap::new(),
            devices,
        })
    }

    fn update_vm(&self, name: &str, config: VmConfig) -> Result<VmInfo, ControlError> {
        let new_name = validate(&config)?;
        if new_name != name {
            return Err(ControlError::BadRequest("a VM's name cannot change".into()));
        }
        {
            let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
            let vm = vms
                .get_mut(name)
                .ok_or_else(|| ControlError::NotFound(name.into()))?;
            if matches!(
                vm.info.state,
                VmState::Running | VmState::Paused | VmState::ShuttingDown
            ) {
                return Err(ControlError::Conflict(format!(
                    "{name} is running; stop it first"
                )));
            }
            vm.info.vcpus = config.machine_config.vcpu_count;
            vm.info.mem_size_mib = config.machine_config.mem_size_mib;
            vm.config = config;
        }
        self.emit(HostEvent::VmModified { name: name.into() });
        self.get_vm(name).map(|d| d.info)
    }

    fn subscribe(&self) -> Receiver<HostEvent> {
        let (tx, rx) = mpsc::channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    fn migrate_incoming(&self, request: IncomingRequest) -> Result<IncomingInfo, ControlError> {
        if request.listen.is_empty() || request.name.is_empty() {
            return Err(ControlError::BadRequest(
                "listen and name are required".into(),
            ));
        }
        if self
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&request.name)
        {
            return Err(ControlError::Conflict(format!(
                "a VM named {:?} exists already",
                request.name
            )));
        }
        let n = self
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        let token = format!("fake-token-{n}");
        let info = self.add_migration(
            MigrationDirection::Incoming,
            &request.name,
            MigrationPhase::Listening,
            Some(token.clone()),
        );
        let listen = request.listen.replace(":0", ":45678");
        Ok(IncomingInfo {
            id: info.id,
            listen,
            token,
        })
    }

    fn migrate_vm(
        &self,
        name: &str,
        request: MigrateRequest,
    ) -> Result<MigrationInfo, ControlError> {
        let state = self.get_vm(name)?.info.state;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(ControlError::Conflict(format!(
                "VM {name:?} is not running"
            )));
        }
        let mut all = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        let listener = all.iter_mut().find(|(m, token)| {
            m.phase == MigrationPhase::Listening && token.as_deref() == Some(&request.token)
        });
        let (phase, error) = match listener {
            Some((incoming, _)) => {
                incoming.phase = MigrationPhase::Completed;
                (MigrationPhase::Completed, None)
            }
            None => (
                MigrationPhase::Failed,
                Some("the destination: authentication failed".to_string()),
            ),
        };
        drop(all);
        let mut info = self.add_migration(MigrationDirection::Outgoing, name, phase, None);
        let mut all = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((m, _)) = all.iter_mut().find(|(m, _)| m.id == info.id) {
            m.error = error;
            m.bytes = 4096;
            m.downtime_ms = (phase == MigrationPhase::Completed).then_some(1.5);
            info = m.clone();
        }
        Ok(info)
    }

    fn get_migration(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        self.migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(m, _)| m.id == id)
            .map(|(m, _)| m.clone())
            .ok_or_else(|| ControlError::NotFound(format!("migration {id}")))
    }

    /// Like the real host: only the primary side of a protected pairing can fail over. The
    /// call is recorded and the primary's copy ends at once (phase completed, redundancy lost).
    fn failover_migration(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        let info = self.get_migration(id)?;
        if info.phase != MigrationPhase::Protecting
            || info.direction != MigrationDirection::Outgoing
        {
            return Err(ControlError::Conflict(format!(
                "migration {id} is not the primary side of a protected pair ({})",
                info.phase.name()
            )));
        }
        self.failovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
        self.update_migration(id, |m| {
            m.phase = MigrationPhase::Completed;
            if let Some(ft) = m.ft.as_mut() {
                ft.redundancy = FtRedundancy::Lost;
            }
        })
        .ok_or_else(|| ControlError::NotFound(format!("migration {id}")))
    }

    fn list_migrations(&self) -> Vec<MigrationInfo> {
        self.migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(m, _)| m.clone())
            .collect()
    }
}
