//! The host and its VMs as computer systems (DSP1052, DSP1057), their capabilities, the
//! virtual system management service (DSP1042) and its jobs.

use super::{
    always_enabled, enabled_state, keyed, keyed_at, Snapshot, CIMV2_NS, HOST_CLASS, VM_CLASS,
};
use crate::cimom::Cimom;
use crate::value::{Instance, ObjectPath, Value};

/// Name of the one management service.
pub const VSMS_NAME: &str = "lockstep-vsms";

/// The host system's path.
pub fn host_path(cimom: &Cimom) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, HOST_CLASS)
        .key("CreationClassName", HOST_CLASS)
        .key("Name", cimom.hostname.as_str())
}

/// A VM's path.
pub fn vm_path(name: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, VM_CLASS)
        .key("CreationClassName", VM_CLASS)
        .key("Name", name)
}

fn vm_caps_path(name: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_EnabledLogicalElementCapabilities")
        .key("InstanceID", format!("LKS:{name}:capabilities"))
}

/// The management service's path.
pub fn vsms_path(cimom: &Cimom) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_VirtualSystemManagementService")
        .key("CreationClassName", "LKS_VirtualSystemManagementService")
        .key("Name", VSMS_NAME)
        .key("SystemCreationClassName", HOST_CLASS)
        .key("SystemName", cimom.hostname.as_str())
}

fn vsms_caps_path() -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_VirtualSystemManagementCapabilities")
        .key("InstanceID", "LKS:vsms:capabilities")
}

/// A job's path.
pub fn job_path(id: u64) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_ConcreteJob").key("InstanceID", format!("LKS:job:{id}"))
}

pub(super) fn host_system(cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let info = snap.info();
    let inst = keyed_at(host_path(cimom))
        .with("ElementName", cimom.hostname.as_str())
        .with("Caption", "lockstep host")
        .with(
            "Description",
            format!(
                "lockstep {} on KVM ({})",
                info.version, info.kvm_backend_description
            ),
        )
        .with("NameFormat", "IP");
    vec![always_enabled(inst).with("Dedicated", Value::u16_array(&[0]))]
}

pub(super) fn virtual_systems(cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let names = cimom.element_names.snapshot();
    let requested = cimom.requested_states();
    snap.vms()
        .iter()
        .map(|vm| {
            let (enabled, op, health) = enabled_state(vm.state);
            let element_name = names
                .get(&vm.name)
                .cloned()
                .unwrap_or_else(|| vm.name.clone());
            keyed_at(vm_path(&vm.name))
                .with("ElementName", element_name)
                .with("Caption", Value::from_static("lockstep microVM"))
                .with("NameFormat", Value::from_static("Other"))
                .with("EnabledState", enabled)
                .with(
                    "RequestedState",
                    requested.get(&vm.name).copied().unwrap_or(12),
                )
                .with("EnabledDefault", 3u16)
                .with("HealthState", health)
                .with("OperationalStatus", Value::u16_array(&[op]))
                .with("Dedicated", Value::u16_array(&[0]))
                .with_opt(
                    "StatusDescriptions",
                    vm.exit_reason.as_ref().map(|r| Value::str_array(&[r])),
                )
        })
        .collect()
}

pub(super) fn hosted_dependencies(cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let host = host_path(cimom);
    snap.vms()
        .iter()
        .map(|vm| {
            keyed(
                CIMV2_NS,
                "LKS_HostedDependency",
                vec![
                    ("Antecedent", host.clone().into()),
                    ("Dependent", vm_path(&vm.name).into()),
                ],
            )
        })
        .collect()
}

pub(super) fn vm_capabilities(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    snap.vms()
        .iter()
        .map(|vm| {
            keyed_at(vm_caps_path(&vm.name))
                .with("ElementName", format!("{} capabilities", vm.name))
                .with(
                    "RequestedStatesSupported",
                    Value::u16_array(&[2, 3, 4, 9, 10, 11]),
                )
                .with("ElementNameEditSupported", true)
                .with("MaxElementNameLen", 256u16)
        })
        .collect()
}

pub(super) fn element_capabilities(cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let mut out: Vec<Instance> = snap
        .vms()
        .iter()
        .map(|vm| {
            keyed(
                CIMV2_NS,
                "LKS_ElementCapabilities",
                vec![
                    ("ManagedElement", vm_path(&vm.name).into()),
                    ("Capabilities", vm_caps_path(&vm.name).into()),
                ],
            )
            .with("Characteristics", Value::u16_array(&[2]))
        })
        .collect();
    out.push(
        keyed(
            CIMV2_NS,
            "LKS_ElementCapabilities",
            vec![
                ("ManagedElement", vsms_path(cimom).into()),
                ("Capabilities", vsms_caps_path().into()),
            ],
        )
        .with("Characteristics", Value::u16_array(&[2])),
    );
    out.push(super::migration::migration_element_capabilities(cimom));
    out
}

pub(super) fn management_service(cimom: &Cimom, _snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let service = keyed_at(vsms_path(cimom))
        .with("ElementName", "lockstep virtual system management service");
    vec![always_enabled(service).with("Started", true)]
}

pub(super) fn management_capabilities(
    _cimom: &Cimom,
    _snap: &Snapshot<'_>,
    _ns: &str,
) -> Vec<Instance> {
    vec![keyed_at(vsms_caps_path())
        .with(
            "ElementName",
            "lockstep virtual system management capabilities",
        )
        .with(
            "VirtualSystemTypesSupported",
            Value::str_array(&["lockstep-microvm"]),
        )
        // DefineSystem, DestroySystem, ModifyResourceSettings, ModifySystemSettings, AddResourceSettings.
        .with(
            "SynchronousMethodsSupported",
            Value::u16_array(&[2, 3, 5, 6, 10]),
        )
        .with("AsynchronousMethodsSupported", Value::u16_array(&[]))
        // Virtual system state changes (CIM_InstModification of EnabledState).
        .with("IndicationsSupported", Value::u16_array(&[4]))]
}

pub(super) fn hosted_service(cimom: &Cimom, _snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    vec![
        keyed(
            CIMV2_NS,
            "LKS_HostedService",
            vec![
                ("Antecedent", host_path(cimom).into()),
                ("Dependent", vsms_path(cimom).into()),
            ],
        ),
        super::migration::hosted_migration_service(cimom),
    ]
}

pub(super) fn jobs(cimom: &Cimom, _snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    cimom
        .jobs
        .list()
        .into_iter()
        .map(|job| {
            let mut inst = keyed_at(job_path(job.id))
                .with("Name", job.operation.clone())
                .with("ElementName", job.operation.clone())
                .with("Description", job.description.clone())
                .with("JobState", job.state.code())
                .with(
                    "PercentComplete",
                    if job.state.finished() { 100u16 } else { 0u16 },
                )
                .with("DeleteOnCompletion", false)
                .with(
                    "TimeSubmitted",
                    Value::DateTime(super::cim_datetime(job.submitted)),
                )
                .with(
                    "StartTime",
                    Value::DateTime(super::cim_datetime(job.submitted)),
                )
                .with(
                    "TimeBeforeRemoval",
                    Value::DateTime(super::cim_interval(crate::methods::JOB_KEEP)),
                )
                .with(
                    "OperationalStatus",
                    Value::u16_array(job.state.operational_status()),
                );
            if let Some(end) = job.finished {
                inst = inst
                    .with(
                        "TimeOfLastStateChange",
                        Value::DateTime(super::cim_datetime(end)),
                    )
                    .with(
                        "ElapsedTime",
                        Value::DateTime(super::cim_interval(
                            end.duration_since(job.submitted).unwrap_or_default(),
                        )),
                    );
            }
            if let Some(err) = &job.error {
                inst = inst
                    .with("ErrorCode", 4u16)
                    .with("ErrorDescription", err.clone());
            }
            inst
        })
        .collect()
}

pub(super) fn affected_job_elements(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    _ns: &str,
) -> Vec<Instance> {
    let mut out: Vec<Instance> = cimom
        .jobs
        .list()
        .into_iter()
        .filter_map(|job| {
            let vm = job.vm.as_deref()?;
            Some(
                keyed(
                    CIMV2_NS,
                    "LKS_AffectedJobElement",
                    vec![
                        ("AffectedElement", vm_path(vm).into()),
                        ("AffectingElement", job_path(job.id).into()),
                    ],
                )
                .with("ElementEffects", Value::u16_array(&[5])),
            )
        })
        .collect();
    out.extend(super::migration::affected_by_migrations(snap));
    out
}
