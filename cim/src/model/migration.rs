//! Live migration as DSP1081 models it: the migration service, its capabilities, the default
//! migration settings, and one job per migration in the host's registry (both directions,
//! whichever endpoint started it), with their associations.

use lockstep_api::migration::{MigrationDirection, MigrationInfo, MigrationPhase};

use super::systems::{host_path, vm_path};
use super::{always_enabled, keyed, keyed_at, Snapshot, CIMV2_NS, HOST_CLASS};
use crate::cimom::Cimom;
use crate::value::{CimType, Instance, ObjectPath, Value};

/// Name of the one migration service.
pub const MIGRATION_SERVICE_NAME: &str = "lockstep-migration";
/// The migration service's class.
pub const MIGRATION_SERVICE_CLASS: &str = "LKS_VirtualSystemMigrationService";
/// The migration settings' class.
pub const MIGRATION_SETTINGS_CLASS: &str = "LKS_VirtualSystemMigrationSettingData";
/// The migration jobs' class.
pub const MIGRATION_JOB_CLASS: &str = "LKS_MigrationJob";
/// MigrationType Live, the one supported.
pub const MIGRATION_TYPE_LIVE: u16 = 2;

/// The migration service's path.
pub fn migration_service_path(cimom: &Cimom) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, MIGRATION_SERVICE_CLASS)
        .key("CreationClassName", MIGRATION_SERVICE_CLASS)
        .key("Name", MIGRATION_SERVICE_NAME)
        .key("SystemCreationClassName", HOST_CLASS)
        .key("SystemName", cimom.hostname.as_str())
}

/// The migration capabilities' path.
pub fn migration_caps_path() -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_VirtualSystemMigrationCapabilities")
        .key("InstanceID", "LKS:migration:capabilities")
}

/// The default migration settings' path.
pub fn migration_defaults_path() -> ObjectPath {
    ObjectPath::new(CIMV2_NS, MIGRATION_SETTINGS_CLASS).key("InstanceID", "LKS:migration:defaults")
}

/// Migration `id`'s job path.
pub fn migration_job_path(id: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, MIGRATION_JOB_CLASS).key("InstanceID", format!("LKS:migration:{id}"))
}

/// The migration id in a migration job's path, if it is one.
pub fn migration_id_of(path: &ObjectPath) -> Option<&str> {
    if !path.class.eq_ignore_ascii_case(MIGRATION_JOB_CLASS) {
        return None;
    }
    path.key_str("InstanceID")?.strip_prefix("LKS:migration:")
}

pub(super) fn migration_service(cimom: &Cimom, _snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let service = keyed_at(migration_service_path(cimom))
        .with("ElementName", "lockstep live migration service");
    vec![always_enabled(service).with("Started", true)]
}

pub(super) fn migration_capabilities(
    _cimom: &Cimom,
    _snap: &Snapshot<'_>,
    _ns: &str,
) -> Vec<Instance> {
    vec![keyed_at(migration_caps_path())
        .with("ElementName", "lockstep live migration capabilities")
        // CheckVirtualSystemIsMigratableToHost answers at once.
        .with("SynchronousMethodsSupported", Value::u16_array(&[4]))
        // MigrateVirtualSystemToHost returns a job.
        .with("AsynchronousMethodsSupported", Value::u16_array(&[2]))
        // IPv4 dotted decimal and IPv6 text (each with its :PORT).
        .with("DestinationHostFormatsSupported", Value::u16_array(&[3, 4]))
        .with(
            "MigrationTypesSupported",
            Value::u16_array(&[MIGRATION_TYPE_LIVE]),
        )]
}

pub(super) fn migration_settings(_cimom: &Cimom, _snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    vec![keyed_at(migration_defaults_path())
        .with("ElementName", "lockstep live migration defaults")
        .with("MigrationType", MIGRATION_TYPE_LIVE)
        // TCP; unix:/path destinations are IPC (6).
        .with("TransportType", 5u16)
        .with("BandwidthUnit", "byte / second * 2^20")
        .with("MaxDowntime", 20u64)
        .with("PrecopyTimeout", 60u64)
        .with("AutoConverge", false)]
}

/// The job's JobState and OperationalStatus in a phase.
fn job_state(phase: MigrationPhase) -> (u16, &'static [u16]) {
    match phase {
        // Running, OK.
        MigrationPhase::Listening
        | MigrationPhase::Handshake
        | MigrationPhase::Precopy
        | MigrationPhase::Switching
        | MigrationPhase::Protecting
        | MigrationPhase::Standby => (4, &[2]),
        // Completed; OK and Completed.
        MigrationPhase::Completed => (7, &[2, 17]),
        // Exception; Error and Completed.
        MigrationPhase::Failed => (10, &[6, 17]),
        // Terminated; Stopped and Completed.
        MigrationPhase::Cancelled => (8, &[10, 17]),
    }
}

/// One migration as a job; `memory_bytes` is the VM's memory when this host knows it.
pub fn migration_job(m: &MigrationInfo, memory_bytes: Option<u64>) -> Instance {
    let (state, status) = job_state(m.phase);
    let method = match m.direction {
        MigrationDirection::Outgoing => "MigrateVirtualSystemToHost",
        MigrationDirection::Incoming => "PrepareIncomingMigration",
    };
    let real = |x: f64| Value::Real(x, CimType::Real64);
    let elapsed = std::time::Duration::from_secs_f64(m.elapsed_ms.max(0.0) / 1e3);
    let mut inst = keyed_at(migration_job_path(&m.id))
        .with("Name", method)
        .with(
            "ElementName",
            format!("migration {} ({}) of {}", m.id, m.direction.name(), m.vm),
        )
        .with(
            "Description",
            match m.direction {
                MigrationDirection::Outgoing => format!("{} sent to another host", m.vm),
                MigrationDirection::Incoming => format!("{} received from another host", m.vm),
            },
        )
        .with("JobState", state)
        .with("OperationalStatus", Value::u16_array(status))
        .with("PercentComplete", m.percent_complete(memory_bytes))
        .with("DeleteOnCompletion", false)
        .with("ElapsedTime", Value::DateTime(super::cim_interval(elapsed)))
        .with("MigrationID", m.id.clone())
        .with("Direction", m.direction.name())
        .with("SystemName", m.vm.clone())
        .with("Phase", m.phase.name())
        .with("Round", m.round)
        .with("BytesTransferred", m.bytes)
        .with("LinkRate", real(m.link_rate_mib_s))
        .with("ExpectedDowntime", real(m.expected_downtime_ms))
        .with_opt("Downtime", m.downtime_ms.map(real))
        .with(
            "ThrottlePercent",
            u16::try_from(m.throttle_percent).unwrap_or(100),
        );
    if let Some(error) = &m.error {
        // ErrorCode 4: Failed (CIM_ERR_FAILED).
        inst = inst
            .with("ErrorCode", 4u16)
            .with("ErrorDescription", error.clone());
    }
    inst
}

pub(super) fn migration_jobs(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    snap.migrations()
        .iter()
        .map(|m| migration_job(m, memory_of(snap, &m.vm)))
        .collect()
}

/// A VM's memory, bytes, when it is on this host.
pub fn memory_of(snap: &Snapshot<'_>, vm: &str) -> Option<u64> {
    snap.vms()
        .iter()
        .find(|v| v.name == vm)
        .map(|v| v.mem_size_mib << 20)
}

/// The migration jobs' AffectedJobElement: each job to its VM while the VM is on this host.
pub(super) fn affected_by_migrations(snap: &Snapshot<'_>) -> Vec<Instance> {
    snap.migrations()
        .iter()
        .filter(|m| snap.vms().iter().any(|v| v.name == m.vm))
        .map(|m| {
            keyed(
                CIMV2_NS,
                "LKS_AffectedJobElement",
                vec![
                    ("AffectedElement", vm_path(&m.vm).into()),
                    ("AffectingElement", migration_job_path(&m.id).into()),
                ],
            )
            .with("ElementEffects", Value::u16_array(&[5]))
        })
        .collect()
}

/// The service on its host (for LKS_HostedService).
pub(super) fn hosted_migration_service(cimom: &Cimom) -> Instance {
    keyed(
        CIMV2_NS,
        "LKS_HostedService",
        vec![
            ("Antecedent", host_path(cimom).into()),
            ("Dependent", migration_service_path(cimom).into()),
        ],
    )
}

/// The service to its capabilities (for LKS_ElementCapabilities).
pub(super) fn migration_element_capabilities(cimom: &Cimom) -> Instance {
    keyed(
        CIMV2_NS,
        "LKS_ElementCapabilities",
        vec![
            ("ManagedElement", migration_service_path(cimom).into()),
            ("Capabilities", migration_caps_path().into()),
        ],
    )
    .with("Characteristics", Value::u16_array(&[2]))
}

/// The service to its default settings (for LKS_ElementSettingData).
pub(super) fn migration_element_settings(cimom: &Cimom) -> Instance {
    keyed(
        CIMV2_NS,
        "LKS_ElementSettingData",
        vec![
            ("ManagedElement", migration_service_path(cimom).into()),
            ("SettingData", migration_defaults_path().into()),
        ],
    )
    .with("IsDefault", 1u16)
    .with("IsCurrent", 2u16)
}

/// The service and each VM it can move.
pub(super) fn service_affects_element(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    _ns: &str,
) -> Vec<Instance> {
    let service = migration_service_path(cimom);
    snap.vms()
        .iter()
        .map(|vm| {
            keyed(
                CIMV2_NS,
                "LKS_ServiceAffectsElement",
                vec![
                    ("AffectedElement", vm_path(&vm.name).into()),
                    ("AffectingElement", service.clone().into()),
                ],
            )
            // Manages.
            .with("ElementEffects", Value::u16_array(&[5]))
        })
        .collect()
}
