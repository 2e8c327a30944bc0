//! Extrinsic methods: a VM's RequestStateChange (DSP1057 state mapping) and the virtual
//! system management service's DefineSystem, DestroySystem, ModifySystemSettings,
//! ModifyResourceSettings and AddResourceSettings (DSP1042); and the jobs of the ones that wait
//! on a guest. The migration service's methods are in `migration.rs`, a fault-tolerant pair's
//! Failover in `redundancy.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use lockstep_api::control::{ControlError, ShutdownRequest, VmState};
use lockstep_api::VmConfig;

use crate::cimom::{Cimom, Params};
use crate::error::{CimFault, CimResult, CimStatus};
use crate::model::{self, ConfigChange, Snapshot};
use crate::value::{CimType, Instance, ObjectPath, Value};
use crate::xml::{request, Param, Target, XmlWriter};

/// How long a finished job stays visible.
pub const JOB_KEEP: Duration = Duration::from_secs(3600);
/// Most jobs remembered.
const MAX_JOBS: usize = 1000;

/// A job's state (CIM_ConcreteJob.JobState).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// 4 Running.
    Running,
    /// 7 Completed.
    Completed,
    /// 10 Exception.
    Exception,
}

impl JobState {
    /// JobState value.
    pub fn code(self) -> u16 {
        match self {
            JobState::Running => 4,
            JobState::Completed => 7,
            JobState::Exception => 10,
        }
    }

    /// Whether the job has ended.
    pub fn finished(self) -> bool {
        self != JobState::Running
    }

    /// OperationalStatus: OK (and Completed), or Error and Completed.
    pub fn operational_status(self) -> &'static [u16] {
        match self {
            JobState::Running => &[2],
            JobState::Completed => &[2, 17],
            JobState::Exception => &[6, 17],
        }
    }
}

/// One job.
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// Its number.
    pub id: u64,
    /// The method, e.g. `RequestStateChange(4)`.
    pub operation: String,
    /// What it does, in words.
    pub description: String,
    /// The VM it affects.
    pub vm: Option<String>,
    /// Its state.
    pub state: JobState,
    /// When it started.
    pub submitted: SystemTime,
    /// When it ended.
    pub finished: Option<SystemTime>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The jobs of asynchronous methods.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    list: Arc<Mutex<Vec<JobRecord>>>,
    /// Counts changes (a job started or ended), for cached responses.
    version: Arc<AtomicU64>,
}

impl Jobs {
    /// Changes so far.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The jobs, oldest first.
    pub fn list(&self) -> Vec<JobRecord> {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `work` on its own thread as a job and returns the job's number.
    pub fn start(
        &self,
        operation: String,
        description: String,
        vm: Option<String>,
        work: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> CimResult<u64> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
            let now = SystemTime::now();
            list.retain(|j| {
                j.finished
                    .is_none_or(|f| now.duration_since(f).unwrap_or_default() <= JOB_KEEP)
            });
            while list.len() >= MAX_JOBS {
                match list.iter().position(|j| j.state.finished()) {
                    Some(i) => {
                        list.remove(i);
                    }
                    None => {
                        return Err(CimFault::new(
                            CimStatus::ServerLimitsExceeded,
                            "too many jobs are running",
                        ))
                    }
                }
            }
            list.push(JobRecord {
                id,
                operation,
                description,
                vm,
                state: JobState::Running,
                submitted: now,
                finished: None,
                error: None,
            });
        }
        self.version.fetch_add(1, Ordering::AcqRel);
        let list = Arc::clone(&self.list);
        let version = Arc::clone(&self.version);
        std::thread::Builder::new()
            .name(format!("cim-job-{id}"))
            .spawn(move || {
                lockstep_seccomp::install(lockstep_seccomp::ThreadKind::Cim);
                let result = work();
                let mut list = list.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(job) = list.iter_mut().find(|j| j.id == id) {
                    job.finished = Some(SystemTime::now());
                    match result {
                        Ok(()) => job.state = JobState::Completed,
                        Err(e) => {
                            log::warn!("cim: job {id} ({}) failed: {e}", job.operation);
                            job.state = JobState::Exception;
                            job.error = Some(e);
                        }
                    }
                }
                version.fetch_add(1, Ordering::AcqRel);
            })
            .map_err(|e| {
                CimFault::new(CimStatus::Failed, format!("cannot start a job thread: {e}"))
            })?;
        Ok(id)
    }
}

/// A host's refusal as a CIM error.
pub(crate) fn host_fault(e: ControlError) -> CimFault {
    match e {
        ControlError::NotFound(m) => {
            CimFault::new(CimStatus::NotFound, format!("no VM named {m:?}"))
        }
        ControlError::BadRequest(m) => CimFault::new(CimStatus::InvalidParameter, m),
        ControlError::Conflict(m) | ControlError::Internal(m) => {
            CimFault::new(CimStatus::Failed, m)
        }
    }
}

/// Runs an extrinsic method and writes its return value and output parameters.
pub fn invoke(
    cimom: &Cimom,
    name: &str,
    namespace: &str,
    target: &Target,
    params: Params<'_>,
    w: &mut XmlWriter,
) -> CimResult<()> {
    if !model::namespace_exists(namespace) {
        return Err(CimFault::new(
            CimStatus::InvalidNamespace,
            "namespace does not exist; use root/cimv2",
        ));
    }
    let ns = model::canonical_namespace(namespace);
    let Target::Instance(path) = target else {
        return Err(CimFault::new(
            CimStatus::NotSupported,
            "static methods are not supported; call methods on an instance",
        ));
    };
    let mut path = path.clone();
    path.namespace = ns.into();
    let class = cimom.schema.class(&path.class).ok_or_else(|| {
        CimFault::new(
            CimStatus::InvalidClass,
            format!("no class named {}", path.class),
        )
    })?;
    let method = class.method(name).ok_or_else(|| {
        CimFault::new(
            CimStatus::MethodNotFound,
            format!(
                "{} has no method {}",
                class.name,
                name.chars().take(64).collect::<String>()
            ),
        )
    })?;
    let snap = Snapshot::new(&*cimom.host);
    let inst = model::get(cimom, &snap, &path)
        .ok_or_else(|| CimFault::new(CimStatus::NotFound, format!("no instance {path}")))?;
    let known: Vec<&str> = method.params.iter().map(|p| p.name.as_str()).collect();
    params.only(&known)?;
    let (ret, out) = match (inst.class.as_ref(), method.name.as_str()) {
        ("LKS_VirtualComputerSystem", "RequestStateChange") => {
            request_state_change(cimom, &inst, params)?
        }
        ("LKS_VirtualSystemManagementService", "DefineSystem") => define_system(cimom, params)?,
        ("LKS_VirtualSystemManagementService", "DestroySystem") => destroy_system(cimom, params)?,
        ("LKS_VirtualSystemManagementService", "ModifySystemSettings") => {
            modify_system_settings(cimom, params)?
        }
        ("LKS_VirtualSystemManagementService", "ModifyResourceSettings") => {
            modify_resource_settings(cimom, params, None)?
        }
        ("LKS_VirtualSystemManagementService", "AddResourceSettings") => {
            let vm =
                match params.get("AffectedConfiguration") {
                    Some(Param::Value(Value::Ref(p))) => vm_of_settings(p)?,
                    _ => return Err(CimFault::new(
                        CimStatus::InvalidParameter,
                        "AffectedConfiguration must reference a VM's LKS_VirtualSystemSettingData",
                    )),
                };
            modify_resource_settings(cimom, params, Some(vm))?
        }
        ("LKS_VirtualSystemMigrationService", "MigrateVirtualSystemToHost") => {
            crate::migration::migrate_to_host(cimom, params)?
        }
        ("LKS_VirtualSystemMigrationService", "CheckVirtualSystemIsMigratableToHost") => {
            crate::migration::check_migratable(cimom, params)?
        }
        ("LKS_VirtualSystemMigrationService", "PrepareIncomingMigration") => {
            crate::migration::prepare_incoming(cimom, params)?
        }
        ("LKS_RedundancySet", "Failover") => crate::redundancy::failover(cimom, &inst, params)?,
        (_, m) => {
            return Err(CimFault::new(
                CimStatus::MethodNotAvailable,
                format!("{m} is not available on {}", inst.class),
            ))
        }
    };
    w.param_value(None, &Value::UInt(ret.into(), CimType::UInt32), ns);
    for (n, v) in out {
        w.param_value(Some(n), &v, ns);
    }
    Ok(())
}

/// A method's return value and output parameters.
pub(crate) type MethodResult = CimResult<(u32, Vec<(&'static str, Value)>)>;

/// `ddddddddhhmmss.mmmmmm:000` to a duration.
fn parse_interval(text: &str) -> Option<Duration> {
    let t = text.trim();
    if t.len() != 25 || t.as_bytes().get(21) != Some(&b':') {
        return None;
    }
    let days: u64 = t.get(0..8)?.parse().ok()?;
    let h: u64 = t.get(8..10)?.parse().ok()?;
    let m: u64 = t.get(10..12)?.parse().ok()?;
    let s: u64 = t.get(12..14)?.parse().ok()?;
    Some(Duration::from_secs(days * 86_400 + h * 3600 + m * 60 + s))
}

fn request_state_change(cimom: &Cimom, inst: &Instance, params: Params<'_>) -> MethodResult {
    let vm = inst.get_str("Name").unwrap_or_default().to_string();
    let requested = match params.get("RequestedState") {
        Some(Param::Value(v)) => {
            v.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| {
                    CimFault::new(
                        CimStatus::InvalidParameter,
                        "RequestedState must be a uint16",
                    )
                })?
        }
        _ => {
            return Err(CimFault::new(
                CimStatus::InvalidParameter,
                "RequestedState is required",
            ))
        }
    };
    let timeout = match params.get("TimeoutPeriod") {
        Some(Param::Value(v)) => Some(v.as_str().and_then(parse_interval).ok_or_else(|| {
            CimFault::new(
                CimStatus::InvalidParameter,
                "TimeoutPeriod must be an interval (ddddddddhhmmss.mmmmmm:000)",
            )
        })?),
        _ => None,
    };
    let state = cimom.host.get_vm(&vm).map_err(host_fault)?.info.state;
    let host = Arc::clone(&cimom.host);
    const DONE: u32 = 0;
    const INVALID_TRANSITION: u32 = 4097;
    let done = |r: Result<_, ControlError>| -> MethodResult {
        match r {
            Ok(_) => {
                cimom.set_requested_state(&vm, requested);
                Ok((DONE, vec![]))
            }
            Err(ControlError::Conflict(m)) => {
                log::info!("cim: RequestStateChange({requested}) of {vm}: {m}");
                Ok((INVALID_TRANSITION, vec![]))
            }
            Err(e) => Err(host_fault(e)),
        }
    };
    use VmState::*;
    let stopped = matches!(state, Created | Stopped | Failed);
    match requested {
        // Enabled: boot a stopped VM, resume a paused one.
        2 => match state {
            Running => done(Ok(())),
            Paused => done(host.resume_vm(&vm).map(|_| ())),
            ShuttingDown => Ok((INVALID_TRANSITION, vec![])),
            _ => done(host.start_vm(&vm).map(|_| ())),
        },
        // Disabled: power off at once.
        3 if stopped => done(Ok(())),
        3 => done(
            host.shutdown_vm(
                &vm,
                ShutdownRequest {
                    timeout_s: None,
                    force: true,
                },
            )
            .map(|_| ()),
        ),
        // Shut Down: ask the guest and wait for it in a job.
        4 if stopped => done(Ok(())),
        4 if state == Running => shutdown_job(cimom, &vm, requested, timeout, false),
        // Quiesce: pause.
        9 if state == Paused => done(Ok(())),
        9 if state == Running => done(host.pause_vm(&vm).map(|_| ())),
        // Reboot: a graceful shut down, then boot again.
        10 if state == Running => shutdown_job(cimom, &vm, requested, timeout, true),
        // Reset: hard reset.
        11 if matches!(state, Running | Paused) => done(host.reset_vm(&vm).map(|_| ())),
        // The rest of the value map (offline, test, defer, transitions from the wrong state).
        4..=11 => Ok((INVALID_TRANSITION, vec![])),
        32768..=65535 => Ok((INVALID_TRANSITION, vec![])),
        _ => Ok((5, vec![])),
    }
}

/// Starts a job that asks `vm`'s guest to shut down within `timeout` and waits for it; for a
/// reboot, the job then boots the VM again. Returns Method Parameters Checked - Job Started.
fn shutdown_job(
    cimom: &Cimom,
    vm: &str,
    requested: u16,
    timeout: Option<Duration>,
    reboot: bool,
) -> MethodResult {
    let host = Arc::clone(&cimom.host);
    let name = vm.to_string();
    let timeout_s = timeout.map(|t| t.as_secs());
    let description = if reboot {
        format!("reboot of {vm}")
    } else {
        format!("graceful shut down of {vm}")
    };
    let id = cimom.jobs.start(
        format!("RequestStateChange({requested})"),
        description,
        Some(vm.to_string()),
        move || {
            let request = ShutdownRequest {
                timeout_s,
                force: false,
            };
            let shut_down = host.shutdown_vm(&name, request).map(|_| ());
            let done = if reboot {
                shut_down.and_then(|()| host.start_vm(&name).map(|_| ()))
            } else {
                shut_down
            };
            done.map_err(|e| e.to_string())
        },
    )?;
    cimom.set_requested_state(vm, requested);
    Ok((4096, vec![("Job", crate::model::job_ref(id))]))
}

/// An embedded instance parameter (sent as an embedded object or as its XML text).
fn embedded(v: &Value, what: &str) -> CimResult<Instance> {
    match v {
        Value::Embedded(i) => Ok((**i).clone()),
        Value::Str(s) => request::embedded_instance(s).map_err(|e| match e {
            request::ValueError::Cim(f) => f,
            request::ValueError::Invalid(m) => {
                CimFault::new(CimStatus::InvalidParameter, format!("{what}: {m}"))
            }
        }),
        _ => Err(CimFault::new(
            CimStatus::InvalidParameter,
            format!("{what} must be an embedded instance"),
        )),
    }
}

/// An embedded instance parameter, if given.
pub(crate) fn embedded_param(params: Params<'_>, name: &str) -> CimResult<Option<Instance>> {
    match params.get(name) {
        None | Some(Param::Null) => Ok(None),
        Some(Param::Value(v)) => embedded(v, name).map(Some),
        Some(_) => Err(CimFault::new(
            CimStatus::InvalidParameter,
            format!("{name} must be an embedded instance"),
        )),
    }
}

fn embedded_array(params: Params<'_>, name: &str) -> CimResult<Vec<Instance>> {
    match params.get(name) {
        None | Some(Param::Null) => Ok(Vec::new()),
        Some(Param::Value(Value::Array(_, items))) => {
            items.iter().map(|v| embedded(v, name)).collect()
        }
        Some(Param::Value(v)) => Ok(vec![embedded(v, name)?]),
        Some(_) => Err(CimFault::new(
            CimStatus::InvalidParameter,
            format!("{name} must be an array of embedded instances"),
        )),
    }
}

/// The VM named by a VSSD path (`InstanceID="LKS:<vm>"`).
fn vm_of_settings(path: &ObjectPath) -> CimResult<String> {
    path.key_str("InstanceID")
        .and_then(|id| id.strip_prefix("LKS:"))
        .filter(|vm| !vm.contains(':'))
        .map(str::to_string)
        .ok_or_else(|| {
            CimFault::new(
                CimStatus::InvalidParameter,
                format!("{path} is not a VM's virtual system settings"),
            )
        })
}

fn define_system(cimom: &Cimom, params: Params<'_>) -> MethodResult {
    let vssd = embedded_param(params, "SystemSettings")?.ok_or_else(|| {
        CimFault::new(
            CimStatus::InvalidParameter,
            "SystemSettings (an embedded LKS_VirtualSystemSettingData) is required",
        )
    })?;
    let rasds = embedded_array(params, "ResourceSettings")?;
    let base: Option<VmConfig> = match params.get("ReferenceConfiguration") {
        Some(Param::Value(Value::Ref(p))) => {
            let vm = vm_of_settings(p)?;
            Some(cimom.host.get_vm(&vm).map_err(host_fault)?.config)
        }
        None | Some(Param::Null) => None,
        Some(_) => {
            return Err(CimFault::new(
                CimStatus::InvalidParameter,
                "ReferenceConfiguration must be a reference",
            ))
        }
    };
    let config = model::config_from_embedded(&vssd, &rasds, base)?;
    let info = cimom.host.create_vm(config, false).map_err(host_fault)?;
    log::info!("cim: defined VM {}", info.name);
    Ok((
        0,
        vec![(
            "ResultingSystem",
            Value::Ref(Box::new(model::vm_path(&info.name))),
        )],
    ))
}

fn destroy_system(cimom: &Cimom, params: Params<'_>) -> MethodResult {
    let vm = match params.get("AffectedSystem") {
        Some(Param::Value(Value::Ref(p)))
            if p.class.eq_ignore_ascii_case("LKS_VirtualComputerSystem")
                || p.class.eq_ignore_ascii_case("CIM_ComputerSystem") =>
        {
            p.key_str("Name")
                .ok_or_else(|| {
                    CimFault::new(
                        CimStatus::InvalidParameter,
                        "AffectedSystem has no Name key",
                    )
                })?
                .to_string()
        }
        _ => {
            return Err(CimFault::new(
                CimStatus::InvalidParameter,
                "AffectedSystem must reference a LKS_VirtualComputerSystem",
            ))
        }
    };
    cimom.host.delete_vm(&vm).map_err(host_fault)?;
    cimom.element_names.set(&vm, None)?;
    log::info!("cim: destroyed VM {vm}");
    Ok((0, vec![]))
}

/// Writes a changed config back, mapping "it is running" to DSP1042's Invalid State (5).
fn update(cimom: &Cimom, vm: &str, config: VmConfig) -> CimResult<u32> {
    match cimom.host.update_vm(vm, config) {
        Ok(_) => Ok(0),
        Err(ControlError::Conflict(m)) => {
            log::info!("cim: cannot change {vm}: {m}");
            Ok(5)
        }
        Err(e) => Err(host_fault(e)),
    }
}

fn modify_system_settings(cimom: &Cimom, params: Params<'_>) -> MethodResult {
    let vssd = embedded_param(params, "SystemSettings")?
        .ok_or_else(|| CimFault::new(CimStatus::InvalidParameter, "SystemSettings is required"))?;
    let id = vssd.get_str("InstanceID").ok_or_else(|| {
        CimFault::new(
            CimStatus::InvalidParameter,
            "SystemSettings needs the InstanceID of the settings to change",
        )
    })?;
    let vm = vm_of_settings(&ObjectPath::new("", "").key("InstanceID", id))?;
    let mut config = cimom.host.get_vm(&vm).map_err(host_fault)?.config;
    let mut changed = false;
    if let Some(k) = vssd.get_str("KernelImagePath") {
        config.boot_source.kernel_image_path = k.into();
        changed = true;
    }
    if let Some(a) = vssd.get_str("KernelCommandLine") {
        config.boot_source.boot_args = Some(a.to_string());
        changed = true;
    }
    if let Some(i) = vssd.get_str("InitrdPath") {
        config.boot_source.initrd_path = (!i.is_empty()).then(|| i.into());
        changed = true;
    }
    if let Some(n) = vssd.get_str("ElementName") {
        cimom
            .element_names
            .set(&vm, (n != vm).then(|| n.to_string()))?;
    }
    let rc = if changed {
        update(cimom, &vm, config)?
    } else {
        0
    };
    Ok((rc, vec![]))
}

fn rasd_path(vm: &str, change: &ConfigChange) -> ObjectPath {
    match change {
        ConfigChange::Vcpus(_) => model::processor_rasd_path(vm),
        ConfigChange::MemoryMib(_) => model::memory_rasd_path(vm),
        ConfigChange::Drive(d) => model::disk_rasd_path(vm, &d.drive_id),
        ConfigChange::Nic(n) => model::nic_rasd_path(vm, &n.iface_id),
    }
}

fn modify_resource_settings(
    cimom: &Cimom,
    params: Params<'_>,
    vm_for_all: Option<String>,
) -> MethodResult {
    let rasds = embedded_array(params, "ResourceSettings")?;
    if rasds.is_empty() {
        return Err(CimFault::new(
            CimStatus::InvalidParameter,
            "ResourceSettings is empty",
        ));
    }
    // Group the changes by VM, so that each VM's config is written once.
    let mut per_vm: Vec<(String, Vec<ConfigChange>)> = Vec::new();
    for (i, rasd) in rasds.iter().enumerate() {
        let (vm, change) = model::rasd_to_config_change(rasd, i)?;
        let vm = vm_for_all.clone().or(vm).ok_or_else(|| {
            CimFault::new(
                CimStatus::InvalidParameter,
                "each RASD needs an InstanceID (LKS:<vm>:<kind>[:<id>]) naming its VM",
            )
        })?;
        match per_vm.iter_mut().find(|(v, _)| *v == vm) {
            Some((_, list)) => list.push(change),
            None => per_vm.push((vm, vec![change])),
        }
    }
    let mut resulting = Vec::new();
    for (vm, changes) in per_vm {
        let mut config = cimom.host.get_vm(&vm).map_err(host_fault)?.config;
        for change in changes {
            resulting.push(Value::Ref(Box::new(rasd_path(&vm, &change))));
            model::apply_change(&mut config, change);
        }
        let rc = update(cimom, &vm, config)?;
        if rc != 0 {
            return Ok((rc, vec![]));
        }
    }
    Ok((
        0,
        vec![(
            "ResultingResourceSettings",
            Value::Array(CimType::Reference, resulting),
        )],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(
            parse_interval("00000000000130.000000:000"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_interval("00000001000000.000000:000"),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(parse_interval("20261118072640.000000+000"), None);
    }

    #[test]
    fn reboot_is_a_job_that_shuts_down_and_boots_again() {
        let host = Arc::new(crate::fake_host::FakeHost::with_vms(1));
        let cimom = Cimom::new(host, "h".into(), None, Default::default()).unwrap();
        cimom.host.start_vm("vm000").unwrap();
        let vm = Instance::new("LKS_VirtualComputerSystem").with("Name", "vm000");
        let params = [(
            "RequestedState".to_string(),
            Param::Value(Value::from(10u16)),
        )];
        let (rc, out) = request_state_change(&cimom, &vm, Params(&params)).unwrap();
        assert_eq!((rc, out[0].0), (4096, "Job"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cimom.jobs.list()[0].state.finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the job did not finish"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let job = &cimom.jobs.list()[0];
        assert_eq!(job.state, JobState::Completed);
        assert_eq!(job.operation, "RequestStateChange(10)");
        assert_eq!(job.description, "reboot of vm000");
        let info = cimom.host.get_vm("vm000").unwrap().info;
        assert_eq!((info.state, info.boot_count), (VmState::Running, 2));
        assert_eq!(cimom.requested_states().get("vm000"), Some(&10));
    }
}
