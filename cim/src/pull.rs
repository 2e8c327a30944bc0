//! The pull operations (DSP0200 5.4): an Open* operation computes the whole result, returns up
//! to MaxObjectCount of it and keeps the rest in an enumeration context that Pull* operations
//! drain. Contexts expire after their OperationTimeout of inactivity; their number is bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::assoc;
use crate::cimom::{Cimom, Params};
use crate::error::{CimFault, CimResult, CimStatus};
use crate::model::Snapshot;
use crate::ops::{self, InstanceShape};
use crate::value::{Instance, ObjectPath};
use crate::xml::XmlWriter;

/// Inactivity allowed when the client gives no OperationTimeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest OperationTimeout accepted.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Most objects returned by one Open or Pull, whatever MaxObjectCount asks.
const MAX_PER_RESPONSE: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Instances with paths (PullInstancesWithPath).
    WithPath,
    /// Paths (PullInstancePaths).
    Paths,
    /// Instances without paths (PullInstances, from OpenQueryInstances).
    Plain,
}

struct Context {
    namespace: String,
    kind: Kind,
    items: VecDeque<Item>,
    shape: InstanceShape,
    timeout: Duration,
    expires: Instant,
}

enum Item {
    Inst(Instance),
    Path(ObjectPath),
}

/// The open enumeration contexts.
pub struct Contexts {
    map: Mutex<HashMap<String, Context>>,
    max: usize,
}

impl Contexts {
    /// No contexts; at most `max` open at once.
    pub fn new(max: usize) -> Contexts {
        Contexts {
            map: Mutex::new(HashMap::new()),
            max,
        }
    }
}

fn new_context_id() -> String {
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a pull operation.
pub fn operation(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &'static str,
    name: &str,
    params: Params<'_>,
    w: &mut XmlWriter,
) -> CimResult<()> {
    match name {
        "PullInstancesWithPath" => pull(cimom, ns, params, w, Kind::WithPath),
        "PullInstancePaths" => pull(cimom, ns, params, w, Kind::Paths),
        "PullInstances" => pull(cimom, ns, params, w, Kind::Plain),
        "CloseEnumeration" => close(cimom, ns, params),
        "EnumerationCount" => Err(CimFault::new(
            CimStatus::NotSupported,
            "EnumerationCount is not supported",
        )),
        _ => open(cimom, snap, ns, name, params, w),
    }
}

fn common_checks(params: Params<'_>, filter_allowed: bool) -> CimResult<(Duration, u32)> {
    if params.bool("ContinueOnError", false)? {
        return Err(CimFault::new(
            CimStatus::ContinuationOnErrorNotSupported,
            "ContinueOnError is not supported",
        ));
    }
    if !filter_allowed
        && (params.string("FilterQuery")?.is_some()
            || params.string("FilterQueryLanguage")?.is_some())
    {
        return Err(CimFault::new(
            CimStatus::FilteredEnumerationNotSupported,
            "filtered enumerations are not supported; use ExecQuery or OpenQueryInstances",
        ));
    }
    let timeout = match params.u32("OperationTimeout")? {
        None => DEFAULT_TIMEOUT,
        Some(0) => {
            return Err(CimFault::new(
                CimStatus::InvalidOperationTimeout,
                "an OperationTimeout of 0 (never) is not accepted",
            ))
        }
        Some(s) if Duration::from_secs(s.into()) > MAX_TIMEOUT => {
            return Err(CimFault::new(
                CimStatus::InvalidOperationTimeout,
                format!(
                    "OperationTimeout {s} is above the {} s this server allows",
                    MAX_TIMEOUT.as_secs()
                ),
            ))
        }
        Some(s) => Duration::from_secs(s.into()),
    };
    let max = params.u32("MaxObjectCount")?.unwrap_or(0);
    Ok((timeout, max))
}

/// The items of an Open*Instances result, or of an Open*InstancePaths one (`paths`).
fn instance_items(insts: Vec<Instance>, paths: bool) -> (Vec<Item>, Kind) {
    if paths {
        let paths = insts.into_iter().filter_map(|i| i.path).map(Item::Path);
        (paths.collect(), Kind::Paths)
    } else {
        (insts.into_iter().map(Item::Inst).collect(), Kind::WithPath)
    }
}

fn open(
    cimom: &Cimom,
    snap: &Snapshot<'_>,
    ns: &'static str,
    name: &str,
    params: Params<'_>,
    w: &mut XmlWriter,
) -> CimResult<()> {
    let (items, kind): (Vec<Item>, Kind) = match name {
        "OpenEnumerateInstances" | "OpenEnumerateInstancePaths" => {
            params.only(&[
                "ClassName",
                "DeepInheritance",
                "IncludeClassOrigin",
                "PropertyList",
                "FilterQueryLanguage",
                "FilterQuery",
                "OperationTimeout",
                "ContinueOnError",
                "MaxObjectCount",
                "LocalOnly",
                "IncludeQualifiers",
            ])?;
            let class = ops::class_param(cimom, params, "ClassName", CimStatus::InvalidClass)?;
            let deep = params.bool("DeepInheritance", true)?;
            let insts = ops::enumerate(cimom, snap, ns, class, deep, false);
            instance_items(insts, name == "OpenEnumerateInstancePaths")
        }
        "OpenAssociatorInstances" | "OpenAssociatorInstancePaths" => {
            params.only(&[
                "InstanceName",
                "AssocClass",
                "ResultClass",
                "Role",
                "ResultRole",
                "IncludeClassOrigin",
                "PropertyList",
                "FilterQueryLanguage",
                "FilterQuery",
                "OperationTimeout",
                "ContinueOnError",
                "MaxObjectCount",
            ])?;
            let object = ops::instance_param(params, "InstanceName", ns)?;
            let f = ops::filters(params, true)?;
            let paths = assoc::associator_paths(cimom, snap, ns, &object, &f)?;
            if name == "OpenAssociatorInstances" {
                instance_items(assoc::fetch(cimom, snap, &paths), false)
            } else {
                (paths.into_iter().map(Item::Path).collect(), Kind::Paths)
            }
        }
        "OpenReferenceInstances" | "OpenReferenceInstancePaths" => {
            params.only(&[
                "InstanceName",
                "ResultClass",
                "Role",
                "IncludeClassOrigin",
                "PropertyList",
                "FilterQueryLanguage",
                "FilterQuery",
                "OperationTimeout",
                "ContinueOnError",
                "MaxObjectCount",
            ])?;
            let object = ops::instance_param(params, "InstanceName", ns)?;
            let f = ops::filters(params, false)?;
            let insts = assoc::references(cimom, snap, ns, &object, &f)?;
            instance_items(insts, name == "OpenReferenceInstancePaths")
        }
        "OpenQueryInstances" => {
            params.only(&[
                "FilterQuery",
                "FilterQueryLanguage",
                "ReturnQueryResultClass",
                "OperationTimeout",
                "ContinueOnError",
                "MaxObjectCount",
            ])?;
            if params.bool("ReturnQueryResultClass", false)? {
                return Err(CimFault::new(
                    CimStatus::NotSupported,
                    "ReturnQueryResultClass is not supported",
                ));
            }
            let language = params.string("FilterQueryLanguage")?.ok_or_else(|| {
                CimFault::new(
                    CimStatus::InvalidParameter,
                    "FilterQueryLanguage is required",
                )
            })?;
            let query = params.string("FilterQuery")?.ok_or_else(|| {
                CimFault::new(CimStatus::InvalidParameter, "FilterQuery is required")
            })?;
            let insts = ops::run_query(cimom, snap, ns, language, query)?;
            (insts.into_iter().map(Item::Inst).collect(), Kind::Plain)
        }
        other => {
            return Err(CimFault::new(
                CimStatus::NotSupported,
                format!("{other} is not supported"),
            ))
        }
    };
    // OpenQueryInstances carries its query in FilterQuery; the other Open operations refuse one.
    let (timeout, max) = common_checks(params, kind == Kind::Plain)?;
    let mut ctx = Context {
        namespace: ns.to_string(),
        kind,
        items: items.into(),
        shape: InstanceShape::from_params(params)?,
        timeout,
        expires: Instant::now() + timeout,
    };
    write_batch(cimom, w, &mut ctx, max as usize);
    finish(cimom, w, ctx)
}

/// Writes up to `max` items of the context as IRETURNVALUE.
fn write_batch(cimom: &Cimom, w: &mut XmlWriter, ctx: &mut Context, max: usize) {
    let n = max.min(MAX_PER_RESPONSE).min(ctx.items.len());
    let shape = ctx.shape.shape();
    w.raw("<IRETURNVALUE>");
    for item in ctx.items.drain(..n) {
        match (ctx.kind, item) {
            // Query results (Plain) come from whole instances, so each still has the path of the
            // instance it was selected from; sending it (as ExecQuery does) lets clients such as
            // pywbemcli sort and show them.
            (Kind::WithPath | Kind::Plain, Item::Inst(inst)) => match &inst.path {
                Some(path) => {
                    w.raw("<VALUE.INSTANCEWITHPATH>");
                    w.instance_path(path);
                    w.instance(&inst, &shape, Some(&cimom.schema));
                    w.raw("</VALUE.INSTANCEWITHPATH>");
                }
                None if ctx.kind == Kind::Plain => w.instance(&inst, &shape, Some(&cimom.schema)),
                None => {}
            },
            (_, Item::Path(p)) => w.instance_path(&p),
            (Kind::Paths, Item::Inst(inst)) => {
                if let Some(p) = &inst.path {
                    w.instance_path(p);
                }
            }
        }
    }
    w.raw("</IRETURNVALUE>");
}

/// Stores the context if anything is left, and writes EnumerationContext and EndOfSequence.
fn finish(cimom: &Cimom, w: &mut XmlWriter, mut ctx: Context) -> CimResult<()> {
    let ended = ctx.items.is_empty();
    let id = if ended {
        None
    } else {
        let mut map = cimom.pulls.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, c| c.expires > now);
        if map.len() >= cimom.pulls.max {
            return Err(CimFault::new(
                CimStatus::ServerLimitsExceeded,
                format!(
                    "{} enumerations are open; close some or let them time out",
                    map.len()
                ),
            ));
        }
        let id = new_context_id();
        ctx.expires = now + ctx.timeout;
        map.insert(id.clone(), ctx);
        Some(id)
    };
    match &id {
        Some(id) => {
            w.raw("<PARAMVALUE NAME=\"EnumerationContext\" PARAMTYPE=\"string\"><VALUE>")
                .text(id)
                .raw("</VALUE></PARAMVALUE>");
        }
        None => {
            w.raw("<PARAMVALUE NAME=\"EnumerationContext\" PARAMTYPE=\"string\"/>");
        }
    }
    w.raw("<PARAMVALUE NAME=\"EndOfSequence\" PARAMTYPE=\"boolean\"><VALUE>")
        .raw(if ended { "TRUE" } else { "FALSE" })
        .raw("</VALUE></PARAMVALUE>");
    Ok(())
}

fn take_context(cimom: &Cimom, ns: &str, params: Params<'_>) -> CimResult<Context> {
    let id = params.string("EnumerationContext")?.ok_or_else(|| {
        CimFault::new(
            CimStatus::InvalidParameter,
            "EnumerationContext is required",
        )
    })?;
    let mut map = cimom.pulls.map.lock().unwrap_or_else(|p| p.into_inner());
    let ctx = map.remove(id).ok_or_else(|| {
        CimFault::new(
            CimStatus::InvalidEnumerationContext,
            "no such enumeration context (closed, finished or timed out)",
        )
    })?;
    if ctx.expires <= Instant::now() {
        return Err(CimFault::new(
            CimStatus::InvalidEnumerationContext,
            "the enumeration context timed out",
        ));
    }
    if !crate::value::namespace_eq(&ctx.namespace, ns) {
        map.insert(id.to_string(), ctx);
        return Err(CimFault::new(
            CimStatus::InvalidEnumerationContext,
            "the enumeration context belongs to another namespace",
        ));
    }
    Ok(ctx)
}

fn pull(
    cimom: &Cimom,
    ns: &'static str,
    params: Params<'_>,
    w: &mut XmlWriter,
    kind: Kind,
) -> CimResult<()> {
    params.only(&["EnumerationContext", "MaxObjectCount"])?;
    let max = params
        .u32("MaxObjectCount")?
        .ok_or_else(|| CimFault::new(CimStatus::InvalidParameter, "MaxObjectCount is required"))?;
    let mut ctx = take_context(cimom, ns, params)?;
    if ctx.kind != kind {
        // The context is closed: DSP0200 treats a mismatched pull as fatal to it.
        return Err(CimFault::new(
            CimStatus::InvalidEnumerationContext,
            "this enumeration context was opened for another kind of pull",
        ));
    }
    write_batch(cimom, w, &mut ctx, max as usize);
    finish(cimom, w, ctx)
}

fn close(cimom: &Cimom, ns: &'static str, params: Params<'_>) -> CimResult<()> {
    params.only(&["EnumerationContext"])?;
    take_context(cimom, ns, params).map(|_| ())
}
