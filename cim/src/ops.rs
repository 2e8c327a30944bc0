//! The intrinsic operations (DSP0200 5.3): class and instance reads, associations, queries,
//! instance creation and deletion (indication subscriptions), modification (ElementName), and
//! the pull operations (delegated to `pull`).

use crate::assoc::{self, Filters};
use crate::cimom::{Cimom, Params};
use crate::error::{CimFault, CimResult, CimStatus};
use crate::model::{self, Snapshot};
use crate::query::{Language, Query};
use crate::schema::Class;
use crate::value::{Instance, ObjectPath, Value};
use crate::xml::{Param, Shape, XmlWriter};

/// Intrinsic operations whose responses depend only on the inputs `cache` compares (the host's
/// VM list and report, and the state kept here), so that a response may be reused.
const CACHEABLE: &[&str] = &[
    "GetClass",
    "EnumerateClasses",
    "EnumerateClassNames",
    "GetInstance",
    "EnumerateInstances",
    "EnumerateInstanceNames",
    "Associators",
    "AssociatorNames",
    "References",
    "ReferenceNames",
    "ExecQuery",
];

/// The pull operations, all answered by `pull::operation`.
const PULL: &[&str] = &[
    "OpenEnumerateInstances",
    "OpenEnumerateInstancePaths",
    "OpenAssociatorInstances",
    "OpenAssociatorInstancePaths",
    "OpenReferenceInstances",
    "OpenReferenceInstancePaths",
    "OpenQueryInstances",
    "PullInstancesWithPath",
    "PullInstancePaths",
    "PullInstances",
    "CloseEnumeration",
    "EnumerationCount",
];

/// Whether a response to intrinsic operation `name` may be reused while its inputs are unchanged.
pub fn is_cacheable(name: &str) -> bool {
    CACHEABLE.contains(&name)
}

/// Whether intrinsic operation `name` only reads: it asks the host for reports and never waits
/// on a VM. (EnumerationCount, which is refused, is not counted.)
pub fn is_read(name: &str) -> bool {
    is_cacheable(name)
        || name == "GetProperty"
        || (PULL.contains(&name) && name != "EnumerationCount")
}

/// Runs an intrinsic operation, writing its IRETURNVALUE (and output parameters) into `w`.
pub fn intrinsic(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    name: &str,
    namespace: &str,
    params: Params<'_>,
    w: &mut XmlWriter,
) -> CimResult<()> {
    if !model::namespace_exists(namespace) {
        return Err(CimFault::new(
            CimStatus::InvalidNamespace,
            format!(
                "namespace {:?} does not exist here; use root/cimv2 or root/interop",
                namespace.chars().take(64).collect::<String>()
            ),
        ));
    }
    let ns = model::canonical_namespace(namespace);
    match name {
        "GetClass" => get_class(cimom, params, w),
        "EnumerateClasses" => enumerate_classes(cimom, params, w, false),
        "EnumerateClassNames" => enumerate_classes(cimom, params, w, true),
        "GetInstance" => get_instance(cimom, snap, ns, params, w),
        "EnumerateInstances" => enumerate_instances(cimom, snap, ns, params, w, false),
        "EnumerateInstanceNames" => enumerate_instances(cimom, snap, ns, params, w, true),
        "Associators" => associators(cimom, snap, ns, params, w, false),
        "AssociatorNames" => associators(cimom, snap, ns, params, w, true),
        "References" => references(cimom, snap, ns, params, w, false),
        "ReferenceNames" => references(cimom, snap, ns, params, w, true),
        "ExecQuery" => exec_query(cimom, snap, ns, params, w),
        "CreateInstance" => create_instance(cimom, ns, params, w),
        "DeleteInstance" => delete_instance(cimom, ns, params),
        "ModifyInstance" => modify_instance(cimom, snap, ns, params),
        _ if PULL.contains(&name) => crate::pull::operation(cimom, snap, ns, name, params, w),
        "GetProperty" => get_property(cimom, snap, ns, params, w),
        "CreateClass"
        | "ModifyClass"
        | "DeleteClass"
        | "SetProperty"
        | "GetQualifier"
        | "SetQualifier"
        | "DeleteQualifier"
        | "EnumerateQualifiers" => Err(CimFault::new(
            CimStatus::NotSupported,
            format!("{name} is not supported: the classes are fixed"),
        )),
        other => Err(CimFault::new(
            CimStatus::NotSupported,
            format!(
                "no intrinsic method named {}",
                other.chars().take(64).collect::<String>()
            ),
        )),
    }
}

/// The class named `name`, or a fault with status `not_found`.
fn class_named<'s>(cimom: &'s Cimom, name: &str, not_found: CimStatus) -> CimResult<&'s Class> {
    cimom.schema.class(name).ok_or_else(|| {
        CimFault::new(
            not_found,
            format!(
                "no class named {}",
                name.chars().take(256).collect::<String>()
            ),
        )
    })
}

/// The class a required parameter names, or CIM_ERR_INVALID_CLASS / NOT_FOUND.
pub fn class_param<'s>(
    cimom: &'s Cimom,
    params: Params<'_>,
    name: &str,
    not_found: CimStatus,
) -> CimResult<&'s Class> {
    let class = params
        .class_name(name)?
        .ok_or_else(|| CimFault::new(CimStatus::InvalidParameter, format!("{name} is required")))?;
    class_named(cimom, class, not_found)
}

/// The PropertyList and IncludeClassOrigin parameters that shape the instances an operation
/// returns, owned so that an enumeration context can keep them between pulls.
pub struct InstanceShape {
    property_list: Option<Vec<String>>,
    class_origin: bool,
}

impl InstanceShape {
    /// Reads both parameters (IncludeClassOrigin is false when absent).
    pub fn from_params(params: Params<'_>) -> CimResult<InstanceShape> {
        Ok(InstanceShape {
            property_list: params.property_list()?,
            class_origin: params.bool("IncludeClassOrigin", false)?,
        })
    }

    /// The writer's view of it.
    pub fn shape(&self) -> Shape<'_> {
        Shape {
            property_list: self.property_list.as_deref(),
            class_origin: self.class_origin,
            ..Shape::default()
        }
    }
}

fn get_class(cimom: &Cimom, params: Params<'_>, w: &mut XmlWriter) -> CimResult<()> {
    params.only(&[
        "ClassName",
        "LocalOnly",
        "IncludeQualifiers",
        "IncludeClassOrigin",
        "PropertyList",
    ])?;
    let class = class_param(cimom, params, "ClassName", CimStatus::NotFound)?;
    let list = params.property_list()?;
    let shape = Shape {
        property_list: list.as_deref(),
        class_origin: params.bool("IncludeClassOrigin", false)?,
        qualifiers: params.bool("IncludeQualifiers", true)?,
        local_only: params.bool("LocalOnly", true)?,
    };
    w.raw("<IRETURNVALUE>");
    w.class(class, &shape);
    w.raw("</IRETURNVALUE>");
    Ok(())
}

fn enumerate_classes(
    cimom: &Cimom,
    params: Params<'_>,
    w: &mut XmlWriter,
    names_only: bool,
) -> CimResult<()> {
    params.only(&[
        "ClassName",
        "DeepInheritance",
        "LocalOnly",
        "IncludeQualifiers",
        "IncludeClassOrigin",
    ])?;
    let root = match params.class_name("ClassName")? {
        Some(c) => Some(
            class_named(cimom, c, CimStatus::InvalidClass)?
                .name
                .as_str(),
        ),
        None => None,
    };
    let deep = params.bool("DeepInheritance", false)?;
    let classes: Vec<&Class> = match (root, deep) {
        (Some(r), true) => cimom.schema.descendants(r).into_iter().skip(1).collect(),
        (None, true) => cimom.schema.classes().iter().collect(),
        (r, false) => cimom.schema.subclasses(r),
    };
    let shape = Shape {
        property_list: None,
        class_origin: params.bool("IncludeClassOrigin", false)?,
        qualifiers: params.bool("IncludeQualifiers", true)?,
        local_only: params.bool("LocalOnly", true)?,
    };
    w.raw("<IRETURNVALUE>");
    for c in classes {
        if names_only {
            w.raw("<CLASSNAME").attr("NAME", &c.name).raw("/>");
        } else {
            w.class(c, &shape);
        }
    }
    w.raw("</IRETURNVALUE>");
    Ok(())
}

/// The instance path a parameter names, with the namespace filled in.
pub fn instance_param(params: Params<'_>, name: &str, ns: &'static str) -> CimResult<ObjectPath> {
    let path = match params.get(name) {
        Some(Param::InstanceName(p)) => p.clone(),
        Some(Param::Value(Value::Ref(p))) => (**p).clone(),
        _ => {
            return Err(CimFault::new(
                CimStatus::InvalidParameter,
                format!("{name} must be an instance name"),
            ))
        }
    };
    Ok(path.or_namespace(ns))
}

/// As `instance_param`, for the operations that DSP0200 also allows on a class: a class name
/// is refused as not supported rather than as invalid.
fn path_param(params: Params<'_>, name: &str, ns: &'static str) -> CimResult<ObjectPath> {
    if let Some(Param::ClassName(_)) = params.get(name) {
        return Err(CimFault::new(
            CimStatus::NotSupported,
            format!("{name}: operations on classes (rather than instances) are not supported"),
        ));
    }
    instance_param(params, name, ns)
}

fn get_instance(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &'static str,
    params: Params<'_>,
    w: &mut XmlWriter,
) -> CimResult<()> {
    params.only(&[
        "InstanceName",
        "LocalOnly",
        "IncludeQualifiers",
        "IncludeClassOrigin",
        "PropertyList",
    ])?;
    let path = path_param(params, "InstanceName", ns)?;
    let class = cimom.schema.class(&path.class).ok_or_else(|| {
        CimFault::new(
            CimStatus::InvalidClass,
            format!("no class named {}", path.class),
        )
    })?;
    let inst = model::get(cimom, snap, &path)
        .ok_or_else(|| CimFault::new(CimStatus::NotFound, format!("no instance {path}")))?;
    let shape = InstanceShape::from_params(params)?;
    let local_only = params.bool("LocalOnly", false)?;
    let inst = if local_only {
        local_properties(class, inst)
    } else {
        inst
    };
    w.raw("<IRETURNVALUE>");
    w.instance(&inst, &shape.shape(), Some(&cimom.schema));
    w.raw("</IRETURNVALUE>");
    Ok(())
}

/// Keeps the properties `class` itself declares (LocalOnly, when a client asks for it).
fn local_properties(class: &Class, mut inst: Instance) -> Instance {
    inst.props.retain(|(n, _)| {
        class
            .property(n)
            .is_some_and(|p| p.class_origin.eq_ignore_ascii_case(&class.name) || !p.propagated)
    });
    inst
}

/// Keeps the properties declared in `class` (DeepInheritance false).
fn class_properties(class: &Class, mut inst: Instance) -> Instance {
    inst.props.retain(|(n, _)| class.property(n).is_some());
    inst
}

/// Instances of `class` in `ns` shaped by the enumeration flags (shared with the pull operations).
pub fn enumerate(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &str,
    class: &Class,
    deep: bool,
    local_only: bool,
) -> Vec<Instance> {
    let mut insts = model::enumerate(cimom, snap, ns, &class.name);
    if !deep {
        insts = insts
            .into_iter()
            .map(|i| class_properties(class, i))
            .collect();
    }
    if local_only {
        insts = insts
            .into_iter()
            .map(|i| local_properties(class, i))
            .collect();
    }
    insts
}

fn enumerate_instances(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &'static str,
    params: Params<'_>,
    w: &mut XmlWriter,
    names_only: bool,
) -> CimResult<()> {
    params.only(&[
        "ClassName",
        "LocalOnly",
        "DeepInheritance",
        "IncludeQualifiers",
        "IncludeClassOrigin",
        "PropertyList",
    ])?;
    let class = class_param(cimom, params, "ClassName", CimStatus::InvalidClass)?;
    w.raw("<IRETURNVALUE>");
    if names_only {
        for inst in model::enumerate(cimom, snap, ns, &class.name) {
            if let Some(p) = &inst.path {
                w.instance_name(p);
            }
        }
    } else {
        // LocalOnly is honoured only when a client sets it explicitly: DSP0200 deprecates it
        // for instances and clients that leave it out expect every property.
        let local_only = matches!(params.get("LocalOnly"), Some(Param::Value(_)))
            && params.bool("LocalOnly", false)?;
        let deep = params.bool("DeepInheritance", true)?;
        let requested = InstanceShape::from_params(params)?;
        let shape = requested.shape();
        for inst in enumerate(cimom, snap, ns, class, deep, local_only) {
            let Some(path) = &inst.path else { continue };
            w.raw("<VALUE.NAMEDINSTANCE>");
            w.instance_name(path);
            w.instance(&inst, &shape, Some(&cimom.schema));
            w.raw("</VALUE.NAMEDINSTANCE>");
        }
    }
    w.raw("</IRETURNVALUE>");
    Ok(())
}

/// Reads the association filters from the parameters.
pub fn filters<'a>(params: Params<'a>, with_assoc: bool) -> CimResult<Filters<'a>> {
    Ok(Filters {
        assoc_class: if with_assoc {
            params.class_name("AssocClass")?
        } else {
            None
        },
        result_class: params.class_name("ResultClass")?,
        role: params.string("Role")?.filter(|s| !s.is_empty()),
        result_role: if with_assoc {
            params.string("ResultRole")?.filter(|s| !s.is_empty())
        } else {
            None
        },
    })
}

/// `VALUE.OBJECTWITHPATH` for each instance.
pub fn write_objects_with_path(
    cimom: &Cimom,
    w: &mut XmlWriter,
    insts: &[Instance],
    shape: &Shape<'_>,
) {
    for inst in insts {
        let Some(path) = &inst.path else { continue };
        w.raw("<VALUE.OBJECTWITHPATH>");
        w.instance_path(path);
        w.instance(inst, shape, Some(&cimom.schema));
        w.raw("</VALUE.OBJECTWITHPATH>");
    }
}

fn associators(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &'static str,
    params: Params<'_>,
    w: &mut XmlWriter,
    names_only: bool,
) -> CimResult<()> {
    params.only(&[
        "ObjectName",
        "AssocClass",
        "ResultClass",
        "Role",
        "ResultRole",
        "IncludeQualifiers",
        "IncludeClassOrigin",
        "PropertyList",
    ])?;
    let object = path_param(params, "ObjectName", ns)?;
    let f = filters(params, true)?;
    let paths = assoc::associator_paths(cimom, snap, ns, &object, &f)?;
    w.raw("<IRETURNVALUE>");
    if names_only {
        for p in &paths {
            w.object_path(p);
        }
    } else {
        let shape = InstanceShape::from_params(params)?;
        let insts = assoc::fetch(cimom, snap, &paths);
        write_objects_with_path(cimom, w, &insts, &shape.shape());
    }
    w.raw("</IRETURNVALUE>");
    Ok(())
}

fn references(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &'static str,
    params: Params<'_>,
    w: &mut XmlWriter,
    names_only: bool,
) -> CimResult<()> {
    params.only(&[
        "ObjectName",
        "ResultClass",
        "Role",
        "IncludeQualifiers",
        "IncludeClassOrigin",
        "PropertyList",
    ])?;
    let object = path_param(params, "ObjectName", ns)?;
    let f = filters(params, false)?;
    let insts = assoc::references(cimom, snap, ns, &object, &f)?;
    w.raw("<IRETURNVALUE>");
    if names_only {
        for p in insts.iter().filter_map(|i| i.path.as_ref()) {
            w.object_path(p);
        }
    } else {
        let shape = InstanceShape::from_params(params)?;
        write_objects_with_path(cimom, w, &insts, &shape.shape());
    }
    w.raw("</IRETURNVALUE>");
    Ok(())
}

/// Runs a query: the matching instances, projected to the selected properties.
pub fn run_query(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &str,
    language: &str,
    text: &str,
) -> CimResult<Vec<Instance>> {
    let language = Language::parse(language)?;
    let query = Query::parse(language, text)?;
    let class = class_named(cimom, &query.class, CimStatus::InvalidQuery)?;
    let is_a = |c: &str, a: &str| cimom.schema.is_a(c, a);
    Ok(model::enumerate(cimom, snap, ns, &class.name)
        .into_iter()
        .filter(|i| query.matches(i, &is_a))
        .map(|i| query.project(i))
        .collect())
}

fn exec_query(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &'static str,
    params: Params<'_>,
    w: &mut XmlWriter,
) -> CimResult<()> {
    params.only(&["QueryLanguage", "Query"])?;
    let language = params
        .string("QueryLanguage")?
        .ok_or_else(|| CimFault::new(CimStatus::InvalidParameter, "QueryLanguage is required"))?;
    let text = params
        .string("Query")?
        .ok_or_else(|| CimFault::new(CimStatus::InvalidParameter, "Query is required"))?;
    let insts = run_query(cimom, snap, ns, language, text)?;
    w.raw("<IRETURNVALUE>");
    write_objects_with_path(cimom, w, &insts, &Shape::default());
    w.raw("</IRETURNVALUE>");
    Ok(())
}

fn create_instance(
    cimom: &Cimom,
    ns: &'static str,
    params: Params<'_>,
    w: &mut XmlWriter,
) -> CimResult<()> {
    params.only(&["NewInstance"])?;
    let inst = match params.get("NewInstance") {
        Some(Param::Instance(i)) => i.clone(),
        Some(Param::NamedInstance(_, i)) => i.clone(),
        _ => {
            return Err(CimFault::new(
                CimStatus::InvalidParameter,
                "NewInstance must be an instance",
            ))
        }
    };
    if ns != model::INTEROP_NS {
        return Err(CimFault::new(
            CimStatus::NotSupported,
            "instances are created only for indication subscriptions, in root/interop; define VMs with CIM_VirtualSystemManagementService.DefineSystem",
        ));
    }
    let path = cimom.indications.create(cimom, inst)?;
    w.raw("<IRETURNVALUE>");
    w.instance_name(&path);
    w.raw("</IRETURNVALUE>");
    Ok(())
}

fn delete_instance(cimom: &Cimom, ns: &'static str, params: Params<'_>) -> CimResult<()> {
    params.only(&["InstanceName"])?;
    let path = path_param(params, "InstanceName", ns)?;
    if ns != model::INTEROP_NS
        || !crate::indications::STORED_CLASSES
            .iter()
            .any(|c| c.eq_ignore_ascii_case(&path.class))
    {
        return Err(CimFault::new(
            CimStatus::NotSupported,
            "only indication filters, listener destinations and subscriptions can be deleted; remove VMs with DestroySystem",
        ));
    }
    cimom.indications.delete(&path)
}

fn modify_instance(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &'static str,
    params: Params<'_>,
) -> CimResult<()> {
    params.only(&["ModifiedInstance", "IncludeQualifiers", "PropertyList"])?;
    let (path, inst) = match params.get("ModifiedInstance") {
        Some(Param::NamedInstance(p, i)) => (p.clone(), i.clone()),
        _ => {
            return Err(CimFault::new(
                CimStatus::InvalidParameter,
                "ModifiedInstance must be a named instance",
            ))
        }
    };
    let list = params.property_list()?;
    let changed: Vec<&(std::borrow::Cow<'static, str>, Value)> = inst
        .props
        .iter()
        .filter(|(n, _)| {
            list.as_ref()
                .is_none_or(|l| l.iter().any(|p| p.eq_ignore_ascii_case(n)))
        })
        .collect();
    let full = path.or_namespace(ns);
    let current = model::get(cimom, snap, &full)
        .ok_or_else(|| CimFault::new(CimStatus::NotFound, format!("no instance {full}")))?;
    if !current
        .class
        .eq_ignore_ascii_case("LKS_VirtualComputerSystem")
    {
        return Err(CimFault::new(
            CimStatus::NotSupported,
            format!(
                "{} instances cannot be modified; only a VM's ElementName can",
                current.class
            ),
        ));
    }
    let vm = full.key_str("Name").unwrap_or_default().to_string();
    for (name, value) in changed {
        if name.eq_ignore_ascii_case("ElementName") {
            let text = value.as_str().map(str::to_string);
            if text.as_ref().is_some_and(|t| t.len() > 256) {
                return Err(CimFault::new(
                    CimStatus::InvalidParameter,
                    "ElementName is longer than 256 characters",
                ));
            }
            cimom.element_names.set(&vm, text.filter(|t| *t != vm))?;
        } else if current.get(name) != Some(value) {
            return Err(CimFault::new(
                CimStatus::NotSupported,
                format!("property {name} is not writable; only ElementName is"),
            ));
        }
    }
    Ok(())
}

fn get_property(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &'static str,
    params: Params<'_>,
    w: &mut XmlWriter,
) -> CimResult<()> {
    params.only(&["InstanceName", "PropertyName"])?;
    let path = path_param(params, "InstanceName", ns)?;
    let prop = params
        .string("PropertyName")?
        .ok_or_else(|| CimFault::new(CimStatus::InvalidParameter, "PropertyName is required"))?;
    let inst = model::get(cimom, snap, &path)
        .ok_or_else(|| CimFault::new(CimStatus::NotFound, format!("no instance {path}")))?;
    let class = cimom.schema.class(&inst.class);
    if class.is_some_and(|c| c.property(prop).is_none()) {
        return Err(CimFault::new(
            CimStatus::NoSuchProperty,
            format!("{} has no property {prop}", inst.class),
        ));
    }
    w.raw("<IRETURNVALUE>");
    match inst.get(prop) {
        Some(Value::Array(_, items)) => {
            w.raw("<VALUE.ARRAY>");
            for v in items {
                w.raw("<VALUE>").text(&v.to_text()).raw("</VALUE>");
            }
            w.raw("</VALUE.ARRAY>");
        }
        Some(Value::Ref(r)) => w.value_reference(r, ns),
        Some(v) => {
            w.raw("<VALUE>").text(&v.to_text()).raw("</VALUE>");
        }
        None => {}
    }
    w.raw("</IRETURNVALUE>");
    Ok(())
}
