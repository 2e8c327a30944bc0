//! Association traversal for Associators, AssociatorNames, References and ReferenceNames, with
//! the AssocClass / ResultClass / Role / ResultRole filters (DSP0200 5.3.2.7-10).

use crate::cimom::Cimom;
use crate::error::{CimFault, CimResult, CimStatus};
use crate::model::{self, Snapshot};
use crate::value::{namespace_eq, Instance, ObjectPath, Value};

/// The filters of an association operation.
#[derive(Debug, Default)]
pub struct Filters<'a> {
    /// Only associations of this class (or a subclass).
    pub assoc_class: Option<&'a str>,
    /// Only results of this class (or a subclass).
    pub result_class: Option<&'a str>,
    /// The source object must play this role.
    pub role: Option<&'a str>,
    /// The result must play this role.
    pub result_role: Option<&'a str>,
}

fn check_class(cimom: &Cimom, name: Option<&str>) -> CimResult<()> {
    if let Some(n) = name {
        if cimom.schema.class(n).is_none() {
            return Err(CimFault::new(
                CimStatus::InvalidParameter,
                format!("no class named {n}"),
            ));
        }
    }
    Ok(())
}

/// The association instances in `namespace` that reference `object` in an allowed role.
pub fn references(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    namespace: &str,
    object: &ObjectPath,
    filters: &Filters<'_>,
) -> CimResult<Vec<Instance>> {
    check_class(cimom, filters.assoc_class)?;
    check_class(cimom, filters.result_class)?;
    if cimom.schema.class(&object.class).is_none() {
        return Err(CimFault::new(
            CimStatus::InvalidParameter,
            format!("no class named {}", object.class),
        ));
    }
    let root = filters.assoc_class.unwrap_or("");
    let classes: Vec<&'static str> = all_provided(cimom, namespace)
        .into_iter()
        .filter(|c| cimom.schema.class(c).is_some_and(|cl| cl.association))
        .filter(|c| root.is_empty() || cimom.schema.is_a(c, root))
        .collect();
    let mut out = Vec::new();
    for class in classes {
        for inst in model::instances_of(cimom, snap, namespace, class) {
            let hit = inst.props.iter().any(|(name, v)| {
                matches!(v, Value::Ref(r) if refers_to(r, object, namespace))
                    && filters
                        .role
                        .is_none_or(|role| role.eq_ignore_ascii_case(name))
            });
            // References filters by ResultClass on the association itself.
            if hit
                && filters
                    .result_class
                    .is_none_or(|rc| cimom.schema.is_a(class, rc))
            {
                out.push(inst);
            }
        }
    }
    Ok(out)
}

/// The objects associated with `object`: paths, deduplicated, in discovery order.
pub fn associator_paths(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    namespace: &str,
    object: &ObjectPath,
    filters: &Filters<'_>,
) -> CimResult<Vec<ObjectPath>> {
    let assoc_filters = Filters {
        result_class: None,
        ..*filters
    };
    let mut out: Vec<ObjectPath> = Vec::new();
    for assoc in references(cimom, snap, namespace, object, &assoc_filters)? {
        // The role the source plays in this instance.
        let source_role = assoc.props.iter().find_map(|(n, v)| match v {
            Value::Ref(r)
                if refers_to(r, object, namespace)
                    && filters.role.is_none_or(|role| role.eq_ignore_ascii_case(n)) =>
            {
                Some(n.clone())
            }
            _ => None,
        });
        for (name, v) in &assoc.props {
            let Value::Ref(r) = v else { continue };
            if Some(name) == source_role.as_ref() {
                continue;
            }
            if filters
                .result_role
                .is_some_and(|rr| !rr.eq_ignore_ascii_case(name))
            {
                continue;
            }
            if filters
                .result_class
                .is_some_and(|rc| !cimom.schema.is_a(&r.class, rc))
            {
                continue;
            }
            let path = (**r)
                .clone()
                .or_namespace(model::canonical_namespace(namespace));
            if !out.iter().any(|p| p.same_instance(&path)) {
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// The instances at `paths`, fetched class by class.
pub fn fetch(cimom: &Cimom, snap: &Snapshot<'_>, paths: &[ObjectPath]) -> Vec<Instance> {
    let mut groups: Vec<(String, String, Vec<Instance>)> = Vec::new();
    let mut out = Vec::new();
    for path in paths {
        let ns = model::canonical_namespace(&path.namespace).to_string();
        let idx = match groups
            .iter()
            .position(|(n, c, _)| *n == ns && c.eq_ignore_ascii_case(&path.class))
        {
            Some(i) => i,
            None => {
                let insts = model::instances_of(cimom, snap, &ns, &path.class);
                groups.push((ns, path.class.to_string(), insts));
                groups.len() - 1
            }
        };
        if let Some(inst) = groups[idx]
            .2
            .iter()
            .find(|i| i.path.as_ref().is_some_and(|p| p.same_instance(path)))
        {
            out.push(inst.clone());
        }
    }
    out
}

fn refers_to(r: &ObjectPath, object: &ObjectPath, context_ns: &str) -> bool {
    if !r.same_instance(object) {
        return false;
    }
    // A reference without a namespace is in the association's namespace.
    let r_ns = if r.namespace.is_empty() {
        context_ns
    } else {
        &r.namespace
    };
    let o_ns = if object.namespace.is_empty() {
        context_ns
    } else {
        &object.namespace
    };
    namespace_eq(r_ns, o_ns)
}

fn all_provided(cimom: &Cimom, namespace: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    for root in [
        "CIM_Dependency",
        "CIM_Component",
        "CIM_ElementCapabilities",
        "CIM_ElementSettingData",
        "CIM_SettingsDefineState",
        "CIM_AffectedJobElement",
        "CIM_ServiceAffectsElement",
        "CIM_MemberOfCollection",
        "CIM_ElementConformsToProfile",
        "CIM_AbstractIndicationSubscription",
    ] {
        for c in model::provided_classes(cimom, namespace, root) {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}
