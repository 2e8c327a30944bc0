//! The interop namespace (DSP1033 profile registration): the object manager, the namespaces,
//! the registered profiles and which instances conform to each, so that a client such as
//! pywbem's `WBEMServer` finds every profile's central instances.

use super::devices::{device_paths, pool_path, POOLS};
use super::systems::{host_path, vm_path};
use super::{always_enabled, keyed, keyed_at, Snapshot, CIMV2_NS, HOST_CLASS};
use crate::cimom::Cimom;
use crate::value::{Instance, ObjectPath, Value};

/// The interop namespace.
pub const INTEROP_NS: &str = "root/interop";
const OM_CLASS: &str = "LKS_ObjectManager";
const OM_NAME: &str = "lockstep-cimom";

/// A registered profile: id, name, version, and the profile that references it (if any).
pub struct Profile {
    /// Short id, used in InstanceID `LKS:profile:<id>`.
    pub id: &'static str,
    /// RegisteredName.
    pub name: &'static str,
    /// RegisteredVersion.
    pub version: &'static str,
    /// The autonomous profile that scopes this one.
    pub scoped_by: Option<&'static str>,
}

/// The DMTF profiles this endpoint implements.
pub const PROFILES: &[Profile] = &[
    Profile {
        id: "DSP1033",
        name: "Profile Registration",
        version: "1.0.0",
        scoped_by: None,
    },
    Profile {
        id: "DSP1042",
        name: "System Virtualization",
        version: "1.0.0",
        scoped_by: None,
    },
    Profile {
        id: "DSP1057",
        name: "Virtual System",
        version: "1.0.0",
        scoped_by: Some("DSP1042"),
    },
    Profile {
        id: "DSP1052",
        name: "Computer System",
        version: "1.0.0",
        scoped_by: None,
    },
    Profile {
        id: "DSP1022",
        name: "CPU",
        version: "1.0.0",
        scoped_by: Some("DSP1052"),
    },
    Profile {
        id: "DSP1026",
        name: "System Memory",
        version: "1.0.0",
        scoped_by: Some("DSP1052"),
    },
    Profile {
        id: "DSP1041",
        name: "Resource Allocation",
        version: "1.1.0",
        scoped_by: Some("DSP1042"),
    },
    Profile {
        id: "DSP1044",
        name: "Processor Resource Virtualization",
        version: "1.0.0",
        scoped_by: Some("DSP1042"),
    },
    Profile {
        id: "DSP1045",
        name: "Memory Resource Virtualization",
        version: "1.0.0",
        scoped_by: Some("DSP1042"),
    },
    Profile {
        id: "DSP1047",
        name: "Storage Resource Virtualization",
        version: "1.0.0",
        scoped_by: Some("DSP1042"),
    },
    Profile {
        id: "DSP1050",
        name: "Ethernet Port Resource Virtualization",
        version: "1.0.0",
        scoped_by: Some("DSP1042"),
    },
    Profile {
        id: "DSP1081",
        name: "Virtual System Migration",
        version: "1.0.0",
        scoped_by: Some("DSP1042"),
    },
];

fn profile_path(id: &str) -> ObjectPath {
    ObjectPath::new(INTEROP_NS, "LKS_RegisteredProfile")
        .key("InstanceID", format!("LKS:profile:{id}"))
}

fn om_path(cimom: &Cimom) -> ObjectPath {
    ObjectPath::new(INTEROP_NS, OM_CLASS)
        .key("CreationClassName", OM_CLASS)
        .key("Name", OM_NAME)
        .key("SystemCreationClassName", HOST_CLASS)
        .key("SystemName", cimom.hostname.as_str())
}

pub(super) fn object_manager(cimom: &Cimom, _snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let manager = keyed_at(om_path(cimom))
        .with("ElementName", "lockstep")
        .with(
            "Description",
            format!("lockstep CIM object manager {}", env!("CARGO_PKG_VERSION")),
        )
        .with("GatherStatisticalData", false);
    vec![always_enabled(manager).with("Started", true)]
}

fn namespace_path(cimom: &Cimom, name: &str) -> ObjectPath {
    ObjectPath::new(INTEROP_NS, "LKS_Namespace")
        .key("CreationClassName", "LKS_Namespace")
        .key("Name", name)
        .key("ObjectManagerCreationClassName", OM_CLASS)
        .key("ObjectManagerName", OM_NAME)
        .key("SystemCreationClassName", HOST_CLASS)
        .key("SystemName", cimom.hostname.as_str())
}

pub(super) fn namespaces(cimom: &Cimom, _snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    [INTEROP_NS, CIMV2_NS]
        .into_iter()
        .map(|name| {
            keyed_at(namespace_path(cimom, name))
                .with("ElementName", name)
                // ClassInfo 2: CIM; ClassType 2: CIM.
                .with("ClassInfo", 2u16)
                .with("ClassType", 2u16)
                .with("ClassTypeVersion", "2.41.0")
        })
        .collect()
}

pub(super) fn namespace_in_manager(
    cimom: &Cimom,
    _snap: &Snapshot<'_>,
    _ns: &str,
) -> Vec<Instance> {
    [INTEROP_NS, CIMV2_NS]
        .into_iter()
        .map(|name| {
            keyed(
                INTEROP_NS,
                "LKS_NamespaceInManager",
                vec![
                    ("Antecedent", om_path(cimom).into()),
                    ("Dependent", namespace_path(cimom, name).into()),
                ],
            )
        })
        .collect()
}

pub(super) fn registered_profiles(
    _cimom: &Cimom,
    _snap: &Snapshot<'_>,
    _ns: &str,
) -> Vec<Instance> {
    PROFILES
        .iter()
        .map(|p| {
            keyed_at(profile_path(p.id))
                .with("ElementName", p.name)
                .with("Caption", format!("{} ({})", p.name, p.id))
                // RegisteredOrganization 2: DMTF.
                .with("RegisteredOrganization", 2u16)
                .with("RegisteredName", p.name)
                .with("RegisteredVersion", p.version)
                // AdvertiseTypes 2: Not Advertised (no SLP).
                .with("AdvertiseTypes", Value::u16_array(&[2]))
                .with("SpecificationType", 4u16)
        })
        .collect()
}

pub(super) fn referenced_profiles(
    _cimom: &Cimom,
    _snap: &Snapshot<'_>,
    _ns: &str,
) -> Vec<Instance> {
    PROFILES
        .iter()
        .filter_map(|p| {
            let scope = p.scoped_by?;
            // DMTF direction: Antecedent is the referenced (component) profile, Dependent the
            // referencing (scoping) one.
            Some(keyed(
                INTEROP_NS,
                "LKS_ReferencedProfile",
                vec![
                    ("Antecedent", profile_path(p.id).into()),
                    ("Dependent", profile_path(scope).into()),
                ],
            ))
        })
        .collect()
}

/// Each profile's central instances.
fn central_instances(cimom: &Cimom, snap: &Snapshot<'_>, id: &str) -> Vec<ObjectPath> {
    let vms = || {
        snap.vms()
            .iter()
            .map(|vm| vm_path(&vm.name))
            .collect::<Vec<_>>()
    };
    match id {
        "DSP1033" => vec![om_path(cimom)],
        "DSP1042" => vec![host_path(cimom)],
        "DSP1057" => vms(),
        "DSP1052" => {
            let mut all = vec![host_path(cimom)];
            all.extend(vms());
            all
        }
        "DSP1022" => device_paths(snap, "LKS_Processor"),
        "DSP1026" => device_paths(snap, "LKS_Memory"),
        "DSP1041" => POOLS.iter().map(|&(kind, _, _)| pool_path(kind)).collect(),
        "DSP1044" => vec![pool_path("processor")],
        "DSP1045" => vec![pool_path("memory")],
        "DSP1047" => vec![pool_path("storage")],
        "DSP1050" => vec![pool_path("ethernet")],
        "DSP1081" => vec![super::migration::migration_service_path(cimom)],
        _ => Vec::new(),
    }
}

/// ElementConformsToProfile lives in both namespaces, so that a client can navigate from a
/// profile in the interop namespace or from a central instance in root/cimv2.
pub(super) fn conforms_to_profile(cimom: &Cimom, snap: &Snapshot<'_>, ns: &str) -> Vec<Instance> {
    let ns: &'static str = super::canonical_namespace(ns);
    let mut out = Vec::new();
    for p in PROFILES {
        for central in central_instances(cimom, snap, p.id) {
            out.push(keyed(
                ns,
                "LKS_ElementConformsToProfile",
                vec![
                    ("ConformantStandard", profile_path(p.id).into()),
                    ("ManagedElement", central.into()),
                ],
            ));
        }
    }
    out
}
