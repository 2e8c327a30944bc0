//! The instances this endpoint serves, built on demand from what the host reports through
//! `HostControl`: one provider per concrete class, each a function from a [`Snapshot`] of the
//! host to that class's instances.

mod devices;
mod interop;
mod migration;
mod redundancy;
mod settings;
mod systems;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::HashMap;

use lockstep_api::control::{HostControl, HostInfo, VmDetails, VmInfo, VmMetrics, VmState};
use lockstep_api::migration::MigrationInfo;

pub use interop::{INTEROP_NS, PROFILES};
pub use migration::{
    memory_of, migration_id_of, migration_job, migration_job_path, MIGRATION_JOB_CLASS,
    MIGRATION_SERVICE_CLASS, MIGRATION_SETTINGS_CLASS, MIGRATION_TYPE_LIVE,
};
pub use redundancy::{
    redundancy_set, redundancy_set_path, redundancy_status, REDUNDANCY_SET_CLASS,
    TYPE_OF_SET_SPARING,
};
pub use settings::{apply_change, config_from_embedded, rasd_to_config_change, ConfigChange};
pub(crate) use settings::{disk_rasd_path, memory_rasd_path, nic_rasd_path, processor_rasd_path};
pub use systems::{vm_path, VSMS_NAME};

/// A reference to job `id`.
pub fn job_ref(id: u64) -> Value {
    Value::Ref(Box::new(systems::job_path(id)))
}

use crate::cimom::Cimom;
use crate::value::{Instance, ObjectPath, Value};

/// The namespace of the host's model.
pub const CIMV2_NS: &str = "root/cimv2";
/// The host's computer system class.
pub(crate) const HOST_CLASS: &str = "LKS_HostComputerSystem";
/// A VM's computer system class.
pub(crate) const VM_CLASS: &str = "LKS_VirtualComputerSystem";

/// The host's data for one request, each part fetched the first time a provider needs it.
pub struct Snapshot<'a> {
    host: &'a dyn HostControl,
    info: OnceCell<HostInfo>,
    vms: OnceCell<Vec<VmInfo>>,
    details: OnceCell<Vec<VmDetails>>,
    metrics: OnceCell<HashMap<String, VmMetrics>>,
    migrations: OnceCell<Vec<MigrationInfo>>,
}

impl<'a> Snapshot<'a> {
    /// A snapshot that has fetched nothing yet.
    pub fn new(host: &'a dyn HostControl) -> Self {
        Snapshot {
            host,
            info: OnceCell::new(),
            vms: OnceCell::new(),
            details: OnceCell::new(),
            metrics: OnceCell::new(),
            migrations: OnceCell::new(),
        }
    }

    /// What was fetched, when it was only the host's report and the VM list (the inputs a
    /// cached response can be checked against); `None` once configs, counters or migrations
    /// were read.
    pub fn light_inputs(&self) -> Option<(Option<&HostInfo>, Option<&[VmInfo]>)> {
        if self.details.get().is_some()
            || self.metrics.get().is_some()
            || self.migrations.get().is_some()
        {
            return None;
        }
        Some((self.info.get(), self.vms.get().map(Vec::as_slice)))
    }

    /// The host's own report.
    pub fn info(&self) -> &HostInfo {
        self.info.get_or_init(|| self.host.host_info())
    }

    /// Every VM.
    pub fn vms(&self) -> &[VmInfo] {
        self.vms.get_or_init(|| self.host.list_vms())
    }

    /// Every VM with its config (VMs deleted meanwhile are left out).
    pub fn details(&self) -> &[VmDetails] {
        self.details.get_or_init(|| {
            self.vms()
                .iter()
                .filter_map(|vm| self.host.get_vm(&vm.name).ok())
                .collect()
        })
    }

    /// The host's migrations, oldest first.
    pub fn migrations(&self) -> &[MigrationInfo] {
        self.migrations.get_or_init(|| self.host.list_migrations())
    }

    /// Each VM's counters, by name.
    pub fn metrics(&self, vm: &str) -> Option<&VmMetrics> {
        self.metrics
            .get_or_init(|| {
                self.vms()
                    .iter()
                    .filter_map(|vm| self.host.vm_metrics(&vm.name).ok())
                    .map(|m| (m.name.clone(), m))
                    .collect()
            })
            .get(vm)
    }
}

/// Which namespace a provider's instances live in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Space {
    Cimv2,
    Interop,
    Both,
}

type Build = fn(&Cimom, &Snapshot<'_>, &str) -> Vec<Instance>;

/// A concrete class and how to build its instances (the namespace is passed to the builder).
struct Provider {
    class: &'static str,
    space: Space,
    build: Build,
}

const PROVIDERS: &[Provider] = &[
    Provider {
        class: "LKS_HostComputerSystem",
        space: Space::Cimv2,
        build: systems::host_system,
    },
    Provider {
        class: "LKS_VirtualComputerSystem",
        space: Space::Cimv2,
        build: systems::virtual_systems,
    },
    Provider {
        class: "LKS_HostedDependency",
        space: Space::Cimv2,
        build: systems::hosted_dependencies,
    },
    Provider {
        class: "LKS_EnabledLogicalElementCapabilities",
        space: Space::Cimv2,
        build: systems::vm_capabilities,
    },
    Provider {
        class: "LKS_ElementCapabilities",
        space: Space::Cimv2,
        build: systems::element_capabilities,
    },
    Provider {
        class: "LKS_VirtualSystemManagementService",
        space: Space::Cimv2,
        build: systems::management_service,
    },
    Provider {
        class: "LKS_VirtualSystemManagementCapabilities",
        space: Space::Cimv2,
        build: systems::management_capabilities,
    },
    Provider {
        class: "LKS_HostedService",
        space: Space::Cimv2,
        build: systems::hosted_service,
    },
    Provider {
        class: "LKS_ConcreteJob",
        space: Space::Cimv2,
        build: systems::jobs,
    },
    Provider {
        class: "LKS_AffectedJobElement",
        space: Space::Cimv2,
        build: systems::affected_job_elements,
    },
    Provider {
        class: "LKS_VirtualSystemMigrationService",
        space: Space::Cimv2,
        build: migration::migration_service,
    },
    Provider {
        class: "LKS_VirtualSystemMigrationCapabilities",
        space: Space::Cimv2,
        build: migration::migration_capabilities,
    },
    Provider {
        class: "LKS_VirtualSystemMigrationSettingData",
        space: Space::Cimv2,
        build: migration::migration_settings,
    },
    Provider {
        class: "LKS_MigrationJob",
        space: Space::Cimv2,
        build: migration::migration_jobs,
    },
    Provider {
        class: "LKS_ServiceAffectsElement",
        space: Space::Cimv2,
        build: migration::service_affects_element,
    },
    Provider {
        class: "LKS_RedundancySet",
        space: Space::Cimv2,
        build: redundancy::redundancy_sets,
    },
    Provider {
        class: "LKS_MemberOfCollection",
        space: Space::Cimv2,
        build: redundancy::members,
    },
    Provider {
        class: "LKS_HostedCollection",
        space: Space::Cimv2,
        build: redundancy::hosted_collections,
    },
    Provider {
        class: "LKS_VirtualSystemSettingData",
        space: Space::Cimv2,
        build: settings::system_settings,
    },
    Provider {
        class: "LKS_SettingsDefineState",
        space: Space::Cimv2,
        build: settings::settings_define_state,
    },
    Provider {
        class: "LKS_ElementSettingData",
        space: Space::Cimv2,
        build: settings::element_setting_data,
    },
    Provider {
        class: "LKS_ProcessorAllocationSettingData",
        space: Space::Cimv2,
        build: settings::processor_rasds,
    },
    Provider {
        class: "LKS_MemoryAllocationSettingData",
        space: Space::Cimv2,
        build: settings::memory_rasds,
    },
    Provider {
        class: "LKS_StorageAllocationSettingData",
        space: Space::Cimv2,
        build: settings::storage_rasds,
    },
    Provider {
        class: "LKS_EthernetPortAllocationSettingData",
        space: Space::Cimv2,
        build: settings::ethernet_rasds,
    },
    Provider {
        class: "LKS_VirtualSystemSettingDataComponent",
        space: Space::Cimv2,
        build: settings::settings_components,
    },
    Provider {
        class: "LKS_Processor",
        space: Space::Cimv2,
        build: devices::processors,
    },
    Provider {
        class: "LKS_Memory",
        space: Space::Cimv2,
        build: devices::memories,
    },
    Provider {
        class: "LKS_LogicalDisk",
        space: Space::Cimv2,
        build: devices::disks,
    },
    Provider {
        class: "LKS_EthernetPort",
        space: Space::Cimv2,
        build: devices::ethernet_ports,
    },
    Provider {
        class: "LKS_SystemDevice",
        space: Space::Cimv2,
        build: devices::system_devices,
    },
    Provider {
        class: "LKS_ResourcePool",
        space: Space::Cimv2,
        build: devices::pools,
    },
    Provider {
        class: "LKS_HostedResourcePool",
        space: Space::Cimv2,
        build: devices::hosted_pools,
    },
    Provider {
        class: "LKS_ElementAllocatedFromPool",
        space: Space::Cimv2,
        build: devices::allocated_from_pool,
    },
    Provider {
        class: "LKS_Namespace",
        space: Space::Interop,
        build: interop::namespaces,
    },
    Provider {
        class: "LKS_ObjectManager",
        space: Space::Interop,
        build: interop::object_manager,
    },
    Provider {
        class: "LKS_NamespaceInManager",
        space: Space::Interop,
        build: interop::namespace_in_manager,
    },
    Provider {
        class: "LKS_RegisteredProfile",
        space: Space::Interop,
        build: interop::registered_profiles,
    },
    Provider {
        class: "LKS_ReferencedProfile",
        space: Space::Interop,
        build: interop::referenced_profiles,
    },
    Provider {
        class: "LKS_ElementConformsToProfile",
        space: Space::Both,
        build: interop::conforms_to_profile,
    },
];

/// Whether this endpoint serves `namespace`.
pub fn namespace_exists(namespace: &str) -> bool {
    crate::value::namespace_eq(namespace, CIMV2_NS)
        || crate::value::namespace_eq(namespace, INTEROP_NS)
}

/// The canonical spelling of a served namespace.
pub fn canonical_namespace(namespace: &str) -> &'static str {
    if crate::value::namespace_eq(namespace, INTEROP_NS) {
        INTEROP_NS
    } else {
        CIMV2_NS
    }
}

fn in_space(space: Space, namespace: &str) -> bool {
    match space {
        Space::Both => true,
        Space::Cimv2 => crate::value::namespace_eq(namespace, CIMV2_NS),
        Space::Interop => crate::value::namespace_eq(namespace, INTEROP_NS),
    }
}

/// The concrete classes with instances in `namespace` that are `class` or derive from it.
pub fn provided_classes(cimom: &Cimom, namespace: &str, class: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = PROVIDERS
        .iter()
        .filter(|p| in_space(p.space, namespace) && cimom.schema.is_a(p.class, class))
        .map(|p| p.class)
        .collect();
    if crate::value::namespace_eq(namespace, INTEROP_NS) {
        out.extend(
            crate::indications::STORED_CLASSES
                .iter()
                .filter(|c| cimom.schema.is_a(c, class)),
        );
    }
    out
}

/// The instances of one concrete class in `namespace`.
pub fn instances_of(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    namespace: &str,
    class: &str,
) -> Vec<Instance> {
    let ns = canonical_namespace(namespace);
    if let Some(p) = PROVIDERS
        .iter()
        .find(|p| p.class.eq_ignore_ascii_case(class))
    {
        if in_space(p.space, ns) {
            return (p.build)(cimom, snap, ns);
        }
        return Vec::new();
    }
    if ns == INTEROP_NS {
        return cimom.indications.instances(class);
    }
    Vec::new()
}

/// Every instance in `namespace` of `class` and (if `deep`) its subclasses.
pub fn enumerate(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    namespace: &str,
    class: &str,
) -> Vec<Instance> {
    provided_classes(cimom, namespace, class)
        .into_iter()
        .flat_map(|c| instances_of(cimom, snap, namespace, c))
        .collect()
}

/// The instance at `path` (whose namespace is set), if there is one.
pub fn get(cimom: &Cimom, snap: &Snapshot<'_>, path: &ObjectPath) -> Option<Instance> {
    instances_of(cimom, snap, &path.namespace, &path.class)
        .into_iter()
        .find(|i| i.path.as_ref().is_some_and(|p| p.same_instance(path)))
}

/// Starts an instance whose path has `keys`; the keys are also its first properties.
pub(crate) fn keyed(
    ns: &'static str,
    class: &'static str,
    keys: Vec<(&'static str, Value)>,
) -> Instance {
    let mut inst = Instance::new(class);
    let mut path = ObjectPath::new(ns, class);
    for (name, value) in keys {
        path.keys.push(crate::value::KeyBinding {
            name: Cow::Borrowed(name),
            value: value.clone(),
        });
        inst.props.push((Cow::Borrowed(name), value));
    }
    inst.path = Some(path);
    inst
}

/// Starts the instance at `path`: its keys, in order, are also its first properties.
pub(crate) fn keyed_at(path: ObjectPath) -> Instance {
    let mut inst = Instance::new(path.class.clone());
    inst.props
        .extend(path.keys.iter().map(|k| (k.name.clone(), k.value.clone())));
    inst.path = Some(path);
    inst
}

/// The state of an element that is always on and well (the host, its services): Enabled
/// (2), RequestedState Not Applicable (12), EnabledDefault Enabled, HealthState OK (5) and
/// OperationalStatus OK.
pub(crate) fn always_enabled(inst: Instance) -> Instance {
    inst.with("EnabledState", 2u16)
        .with("RequestedState", 12u16)
        .with("EnabledDefault", 2u16)
        .with("HealthState", 5u16)
        .with("OperationalStatus", Value::u16_array(&[2]))
}

/// DSP1057's view of a VM state: EnabledState, OperationalStatus and HealthState.
pub fn enabled_state(state: VmState) -> (u16, u16, u16) {
    match state {
        VmState::Running => (2, 2, 5),
        VmState::Paused => (9, 2, 5),
        VmState::ShuttingDown => (4, 2, 5),
        VmState::Created | VmState::Stopped => (3, 2, 5),
        // Failed: defined and not running, in error.
        VmState::Failed => (3, 6, 20),
    }
}

/// A CIM datetime (`yyyymmddhhmmss.mmmmmm+000`) for a moment in UTC.
pub fn cim_datetime(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}.{:06}+000",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// A CIM interval (`ddddddddhhmmss.mmmmmm:000`).
pub fn cim_interval(d: std::time::Duration) -> String {
    let s = d.as_secs();
    format!(
        "{:08}{:02}{:02}{:02}.{:06}:000",
        s / 86_400,
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(cim_datetime(t), "20261118110640.000000+000");
        assert_eq!(
            cim_interval(std::time::Duration::from_millis(90_061_500)),
            "00000001010101.500000:000"
        );
    }
}
