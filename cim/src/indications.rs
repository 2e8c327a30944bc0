//! Indication subscriptions (DSP1054 as pywbem's subscription manager uses them): filters,
//! CIM-XML listener destinations and subscriptions created in root/interop, and delivery of
//! CIM_InstModification (EnabledState changes), CIM_InstCreation and CIM_InstDeletion of VMs,
//! CIM_InstModification of a migration job when it ends, and CIM_InstModification of a
//! fault-tolerant pair's set (LKS_RedundancySet) when its RedundancyStatus changes
//! (CIM_InstCreation when a pairing starts) (the host's migration registry, looked at twice a
//! second), to each subscribed listener by ExportIndication, retried while the listener is down.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use lockstep_api::control::HostEvent;

use crate::cimom::Cimom;
use crate::error::{CimFault, CimResult, CimStatus};
use crate::model::{self, Snapshot, CIMV2_NS, INTEROP_NS};
use crate::query::{Language, Query};
use crate::value::{Instance, KeyBinding, ObjectPath, Value};
use crate::xml::XmlWriter;

/// The classes whose instances clients create and delete.
pub const STORED_CLASSES: [&str; 3] = [
    "CIM_IndicationFilter",
    "CIM_ListenerDestinationCIMXML",
    "CIM_IndicationSubscription",
];

/// Delays between delivery attempts to a listener that does not answer.
const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];
/// Indications queued for one listener beyond which new ones are dropped.
const MAX_QUEUED: usize = 1000;

/// The stored instances and the delivery workers.
pub struct Indications {
    stored: Mutex<Vec<Instance>>,
    max: usize,
    workers: Mutex<HashMap<String, Sender<Vec<u8>>>>,
    queued: Arc<Mutex<HashMap<String, usize>>>,
    sequence: AtomicU64,
    stop: Arc<AtomicBool>,
    /// Counts creations and deletions, for cached responses.
    version: AtomicU64,
}

fn param(msg: impl Into<String>) -> CimFault {
    CimFault::new(CimStatus::InvalidParameter, msg)
}

impl Indications {
    /// No subscriptions; at most `max` instances of each stored class.
    pub fn new(max: usize) -> Indications {
        Indications {
            stored: Mutex::new(Vec::new()),
            max,
            workers: Mutex::new(HashMap::new()),
            queued: Arc::new(Mutex::new(HashMap::new())),
            sequence: AtomicU64::new(0),
            stop: Arc::new(AtomicBool::new(false)),
            version: AtomicU64::new(0),
        }
    }

    /// Changes so far.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The stored instances of exactly `class`.
    pub fn instances(&self, class: &str) -> Vec<Instance> {
        self.stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|i| i.class.eq_ignore_ascii_case(class))
            .cloned()
            .collect()
    }

    /// Checks and stores a new filter, destination or subscription; returns its path.
    pub fn create(&self, cimom: &Cimom, inst: Instance) -> CimResult<ObjectPath> {
        let class_name = STORED_CLASSES
            .iter()
            .find(|c| c.eq_ignore_ascii_case(&inst.class))
            .copied()
            .ok_or_else(|| {
                CimFault::new(
                    CimStatus::NotSupported,
                    format!(
                        "instances of {} cannot be created; only {}",
                        inst.class,
                        STORED_CLASSES.join(", ")
                    ),
                )
            })?;
        let class = cimom.schema.class(class_name).ok_or_else(|| {
            CimFault::new(
                CimStatus::Failed,
                "indication classes missing from the schema",
            )
        })?;
        // Values as the class declares them.
        let mut clean = Instance::new(class_name);
        for (name, value) in inst.props {
            let decl = class.property(&name).ok_or_else(|| {
                CimFault::new(
                    CimStatus::InvalidParameter,
                    format!("{class_name} has no property {name}"),
                )
            })?;
            let v = value.coerce(decl.ty).ok_or_else(|| {
                CimFault::new(
                    CimStatus::TypeMismatch,
                    format!("{class_name}.{}: not a {}", decl.name, decl.ty.name()),
                )
            })?;
            clean.set(Cow::Owned(decl.name.clone()), v);
        }
        let mut stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        if stored.iter().filter(|i| i.class == class_name).count() >= self.max {
            return Err(CimFault::new(
                CimStatus::ServerLimitsExceeded,
                format!("at most {} {class_name} instances", self.max),
            ));
        }
        if class_name == "CIM_IndicationSubscription" {
            for role in ["Filter", "Handler"] {
                let Some(Value::Ref(r)) = clean.get(role) else {
                    return Err(param(format!("a subscription needs its {role} reference")));
                };
                if !stored
                    .iter()
                    .any(|i| i.path.as_ref().is_some_and(|p| p.same_instance(r)))
                {
                    return Err(CimFault::new(
                        CimStatus::NotFound,
                        format!("the {role} {r} does not exist"),
                    ));
                }
            }
            if clean.get("SubscriptionState").is_none() {
                clean.set(Cow::Borrowed("SubscriptionState"), Value::from(2u16));
            }
            clean.set(
                Cow::Borrowed("SubscriptionStartTime"),
                Value::DateTime(model::cim_datetime(SystemTime::now())),
            );
        } else {
            if clean.get_str("Name").is_none() {
                let n = self.sequence.fetch_add(1, Ordering::Relaxed);
                clean.set(
                    Cow::Borrowed("Name"),
                    Value::from(format!("lks-{}-{n}", std::process::id())),
                );
            }
            if clean.get_str("CreationClassName").is_none() {
                clean.set(Cow::Borrowed("CreationClassName"), Value::from(class_name));
            }
            if clean.get_str("SystemCreationClassName").is_none() {
                clean.set(
                    Cow::Borrowed("SystemCreationClassName"),
                    Value::from("LKS_HostComputerSystem"),
                );
            }
            if clean.get_str("SystemName").is_none() {
                clean.set(
                    Cow::Borrowed("SystemName"),
                    Value::from(cimom.hostname.clone()),
                );
            }
        }
        if class_name == "CIM_IndicationFilter" {
            let query = clean
                .get_str("Query")
                .ok_or_else(|| param("a filter needs Query"))?;
            let lang = Language::parse(clean.get_str("QueryLanguage").unwrap_or("WQL"))?;
            let q = Query::parse(lang, query)?;
            if !cimom.schema.is_a(&q.class, "CIM_Indication") {
                return Err(CimFault::new(
                    CimStatus::InvalidQuery,
                    format!("{} is not an indication class", q.class),
                ));
            }
        }
        if class_name == "CIM_ListenerDestinationCIMXML" {
            let dest = clean
                .get_str("Destination")
                .ok_or_else(|| param("a destination needs Destination (http://host:port)"))?;
            parse_url(dest).map_err(param)?;
        }
        let keys: Vec<String> = class.keys().map(|k| k.name.clone()).collect();
        let mut path = ObjectPath::new(INTEROP_NS, class_name);
        for k in keys {
            let v = clean
                .get(&k)
                .cloned()
                .ok_or_else(|| param(format!("{class_name} needs its key {k}")))?;
            path.keys.push(KeyBinding {
                name: Cow::Owned(k),
                value: v,
            });
        }
        if stored
            .iter()
            .any(|i| i.path.as_ref().is_some_and(|p| p.same_instance(&path)))
        {
            return Err(CimFault::new(
                CimStatus::AlreadyExists,
                format!("{path} already exists"),
            ));
        }
        clean.path = Some(path.clone());
        stored.push(clean);
        self.version.fetch_add(1, Ordering::AcqRel);
        log::info!("cim: created {path}");
        Ok(path)
    }

    /// Deletes a stored instance; filters and destinations in use by a subscription stay.
    pub fn delete(&self, path: &ObjectPath) -> CimResult<()> {
        let mut stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        let idx = stored
            .iter()
            .position(|i| i.path.as_ref().is_some_and(|p| p.same_instance(path)))
            .ok_or_else(|| CimFault::new(CimStatus::NotFound, format!("no instance {path}")))?;
        let in_use = stored.iter().any(|s| {
            s.class == "CIM_IndicationSubscription"
                && ["Filter", "Handler"]
                    .iter()
                    .any(|role| matches!(s.get(role), Some(Value::Ref(r)) if r.same_instance(path)))
        });
        if in_use {
            return Err(CimFault::new(
                CimStatus::Failed,
                format!("{path} is used by a subscription; delete that first"),
            ));
        }
        stored.remove(idx);
        self.version.fetch_add(1, Ordering::AcqRel);
        log::info!("cim: deleted {path}");
        Ok(())
    }

    /// Starts the thread that turns host events into indications.
    pub fn start(cimom: &Arc<Cimom>) {
        let events = cimom.host.subscribe();
        let weak = Arc::downgrade(cimom);
        let stop = Arc::clone(&cimom.indications.stop);
        let spawned = std::thread::Builder::new()
            .name("cim-indications".into())
            .spawn(move || {
                lockstep_seccomp::install(lockstep_seccomp::ThreadKind::Indications);
                event_loop(weak, events, stop)
            });
        if let Err(e) = spawned {
            log::error!(
                "cim: cannot start the indication thread: {e}; no indications will be sent"
            );
        }
    }

    /// Stops the event thread and the delivery workers.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn deliver(&self, destination: &str, body: Vec<u8>) {
        {
            let mut q = self.queued.lock().unwrap_or_else(|p| p.into_inner());
            let n = q.entry(destination.to_string()).or_insert(0);
            if *n >= MAX_QUEUED {
                log::warn!("cim: listener {destination} is behind by {MAX_QUEUED} indications; dropping one");
                return;
            }
            *n += 1;
        }
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let sender = workers.entry(destination.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel();
            let dest = destination.to_string();
            let queued = Arc::clone(&self.queued);
            let stop = Arc::clone(&self.stop);
            let _ = std::thread::Builder::new()
                .name("cim-deliver".into())
                .spawn(move || {
                    lockstep_seccomp::install(lockstep_seccomp::ThreadKind::Indications);
                    delivery_worker(dest, rx, queued, stop)
                });
            tx
        });
        if sender.send(body).is_err() {
            log::warn!("cim: delivery to {destination} has stopped");
        }
    }
}

/// How often the migration registry is looked at for jobs that ended.
const MIGRATION_POLL: Duration = Duration::from_millis(500);

fn event_loop(cimom: Weak<Cimom>, events: Receiver<HostEvent>, stop: Arc<AtomicBool>) {
    // Migrations that had ended before this thread started raise nothing.
    let (mut migrations, mut pairs) = match cimom.upgrade() {
        Some(c) => (EndedMigrations::new(&c), RedundancyWatch::new(&c)),
        None => return,
    };
    let mut polled = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let event = match events.recv_timeout(MIGRATION_POLL) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(cimom) = cimom.upgrade() else { return };
        if let Some(indication) = event.and_then(|e| indication_for(&cimom, &e)) {
            dispatch(&cimom, indication);
        }
        if polled.elapsed() >= MIGRATION_POLL {
            polled = Instant::now();
            for indication in migrations.newly_ended(&cimom) {
                dispatch(&cimom, indication);
            }
            for indication in pairs.changed(&cimom) {
                dispatch(&cimom, indication);
            }
        }
    }
}

/// The migrations whose end has been announced (or had ended before the endpoint started).
struct EndedMigrations {
    seen: HashSet<String>,
}

impl EndedMigrations {
    fn new(cimom: &Cimom) -> Self {
        EndedMigrations {
            seen: cimom
                .host
                .list_migrations()
                .into_iter()
                .filter(|m| m.phase.ended())
                .map(|m| m.id)
                .collect(),
        }
    }

    /// A CIM_InstModification for each migration job that ended since the last call: the job
    /// as it ended (JobState 7, 8 or 10, PercentComplete 100) and, before, running (4).
    fn newly_ended(&mut self, cimom: &Cimom) -> Vec<Instance> {
        let snap = Snapshot::new(&*cimom.host);
        let mut out = Vec::new();
        for m in snap.migrations() {
            if !m.phase.ended() || !self.seen.insert(m.id.clone()) {
                continue;
            }
            let now = model::migration_job(m, model::memory_of(&snap, &m.vm));
            let mut before = now.clone();
            before.set(Cow::Borrowed("JobState"), Value::from(4u16));
            before.set(Cow::Borrowed("OperationalStatus"), Value::u16_array(&[2]));
            out.push(wrap(cimom, "CIM_InstModification", now, Some(before)));
        }
        out
    }
}

/// The fault-tolerant pairs' RedundancyStatus as last seen, by migration id (the pairs there
/// when the endpoint started raise nothing until their status changes).
struct RedundancyWatch {
    last: HashMap<String, u16>,
}

/// A pairing's RedundancyStatus, if `m` is one.
fn pair_status(m: &lockstep_api::migration::MigrationInfo) -> Option<u16> {
    m.ft.as_ref()
        .map(|ft| model::redundancy_status(ft.redundancy))
}

impl RedundancyWatch {
    fn new(cimom: &Cimom) -> Self {
        RedundancyWatch {
            last: cimom
                .host
                .list_migrations()
                .iter()
                .filter_map(|m| Some((m.id.clone(), pair_status(m)?)))
                .collect(),
        }
    }

    /// Since the last call: a CIM_InstModification for each set whose RedundancyStatus
    /// changed (PreviousInstance with the status before) and a CIM_InstCreation for each new
    /// set. A status that changes and changes back between two looks raises nothing.
    fn changed(&mut self, cimom: &Cimom) -> Vec<Instance> {
        let snap = Snapshot::new(&*cimom.host);
        let mut out = Vec::new();
        for m in snap.migrations() {
            let (Some(status), Some(now)) = (pair_status(m), model::redundancy_set(m)) else {
                continue;
            };
            match self.last.insert(m.id.clone(), status) {
                None => out.push(wrap(cimom, "CIM_InstCreation", now, None)),
                Some(before) if before != status => {
                    let mut prev = now.clone();
                    prev.set(Cow::Borrowed("RedundancyStatus"), Value::from(before));
                    out.push(wrap(cimom, "CIM_InstModification", now, Some(prev)));
                }
                Some(_) => {}
            }
        }
        out
    }
}

/// The indication an event raises, if any.
fn indication_for(cimom: &Cimom, event: &HostEvent) -> Option<Instance> {
    let snap = Snapshot::new(&*cimom.host);
    let find_vm = |name: &str| {
        model::instances_of(cimom, &snap, CIMV2_NS, "LKS_VirtualComputerSystem")
            .into_iter()
            .find(|i| i.get_str("Name") == Some(name))
    };
    let (class, source, previous) = match event {
        HostEvent::VmStateChanged {
            name,
            previous,
            current,
        } => {
            let (before, ..) = model::enabled_state(*previous);
            let (after, ..) = model::enabled_state(*current);
            if before == after {
                return None;
            }
            let mut now = find_vm(name).unwrap_or_else(|| {
                let mut i = Instance::new("LKS_VirtualComputerSystem")
                    .with("CreationClassName", "LKS_VirtualComputerSystem")
                    .with("Name", name.as_str());
                i.path = Some(model::vm_path(name));
                i
            });
            now.set(Cow::Borrowed("EnabledState"), Value::from(after));
            let mut prev = now.clone();
            prev.set(Cow::Borrowed("EnabledState"), Value::from(before));
            ("CIM_InstModification", now, Some(prev))
        }
        HostEvent::VmCreated { name } => ("CIM_InstCreation", find_vm(name)?, None),
        HostEvent::VmDeleted { name } => {
            let mut i = Instance::new("LKS_VirtualComputerSystem")
                .with("CreationClassName", "LKS_VirtualComputerSystem")
                .with("Name", name.as_str());
            i.path = Some(model::vm_path(name));
            ("CIM_InstDeletion", i, None)
        }
        HostEvent::VmModified { .. } => return None,
    };
    Some(wrap(cimom, class, source, previous))
}

/// An indication of `class` about `source` (and its `previous` state).
fn wrap(
    cimom: &Cimom,
    class: &'static str,
    source: Instance,
    previous: Option<Instance>,
) -> Instance {
    let seq = cimom.indications.sequence.fetch_add(1, Ordering::Relaxed);
    let path = source
        .path
        .as_ref()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut ind = Instance::new(class)
        .with(
            "IndicationIdentifier",
            format!("lockstep:{}:{seq}", std::process::id()),
        )
        .with(
            "IndicationTime",
            Value::DateTime(model::cim_datetime(SystemTime::now())),
        )
        .with("PerceivedSeverity", 2u16)
        .with(
            "SequenceContext",
            format!("lockstep:{}", std::process::id()),
        )
        .with(
            "SequenceNumber",
            Value::SInt(seq as i64, crate::value::CimType::SInt64),
        )
        .with("SourceInstanceModelPath", path)
        .with("SourceInstanceHost", cimom.hostname.as_str());
    ind.set(
        Cow::Borrowed("SourceInstance"),
        Value::Embedded(Box::new(source)),
    );
    if let Some(p) = previous {
        ind.set(
            Cow::Borrowed("PreviousInstance"),
            Value::Embedded(Box::new(p)),
        );
    }
    ind
}

/// Sends an indication to every enabled subscription whose filter selects it.
fn dispatch(cimom: &Cimom, indication: Instance) {
    let stored = cimom
        .indications
        .stored
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let find = |r: &ObjectPath| {
        stored
            .iter()
            .find(|i| i.path.as_ref().is_some_and(|p| p.same_instance(r)))
    };
    let is_a = |c: &str, a: &str| cimom.schema.is_a(c, a);
    for sub in stored
        .iter()
        .filter(|i| i.class == "CIM_IndicationSubscription")
    {
        if sub
            .get("SubscriptionState")
            .and_then(Value::as_u64)
            .is_some_and(|s| s != 2)
        {
            continue;
        }
        let (Some(Value::Ref(f)), Some(Value::Ref(h))) = (sub.get("Filter"), sub.get("Handler"))
        else {
            continue;
        };
        let (Some(filter), Some(handler)) = (find(f), find(h)) else {
            continue;
        };
        let Some(query) = filter.get_str("Query") else {
            continue;
        };
        let Ok(lang) = Language::parse(filter.get_str("QueryLanguage").unwrap_or("WQL")) else {
            continue;
        };
        let Ok(q) = Query::parse(lang, query) else {
            continue;
        };
        if !cimom.schema.is_a(&indication.class, &q.class) || !q.matches(&indication, &is_a) {
            continue;
        }
        let namespaces: Vec<&str> = match filter.get("SourceNamespaces") {
            Some(Value::Array(_, items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => filter.get_str("SourceNamespace").into_iter().collect(),
        };
        if !namespaces.is_empty()
            && !namespaces
                .iter()
                .any(|n| crate::value::namespace_eq(n, CIMV2_NS))
        {
            continue;
        }
        let Some(dest) = handler.get_str("Destination") else {
            continue;
        };
        let mut ind = indication.clone();
        if let Some(name) = filter.get_str("Name") {
            ind.set(Cow::Borrowed("IndicationFilterName"), Value::from(name));
        }
        let body = export_request(cimom, &ind);
        cimom.indications.deliver(dest, body);
    }
}

/// The ExportIndication request carrying `ind`.
pub fn export_request(cimom: &Cimom, ind: &Instance) -> Vec<u8> {
    let mut w = XmlWriter::new(&cimom.hostname, 4096);
    let id = cimom
        .indications
        .sequence
        .load(Ordering::Relaxed)
        .to_string();
    w.begin_message(&id);
    w.raw("<SIMPLEEXPREQ><EXPMETHODCALL NAME=\"ExportIndication\"><EXPPARAMVALUE NAME=\"NewIndication\">");
    w.instance(ind, &Default::default(), None);
    w.raw("</EXPPARAMVALUE></EXPMETHODCALL></SIMPLEEXPREQ>");
    w.end_message();
    w.buf
}

/// `http://host[:port][/path]` to (host:port, host, path).
fn parse_url(url: &str) -> Result<(String, String, String), String> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        return Err(format!(
            "{url}: https listeners are not supported yet; use http://"
        ));
    } else {
        return Err(format!("{url:?} is not an http:// URL"));
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if hostport.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let has_port = hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !hostport.ends_with(']');
    let addr = if has_port {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    Ok((addr, hostport.to_string(), path.to_string()))
}

fn post(url: &str, body: &[u8]) -> Result<(), String> {
    let (addr, host, path) = parse_url(url)?;
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .map_err(|e| format!("{addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\nCIMExport: MethodRequest\r\nCIMExportMethod: ExportIndication\r\nCIMProtocolVersion: 1.0\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body))
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 1024];
    // Read until the status line is complete (the body is of no interest).
    while !reply.contains(&b'\n') && reply.len() < 4096 {
        let n = stream.read(&mut buf).map_err(|e| format!("{addr}: {e}"))?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&reply);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        Ok(())
    } else {
        Err(format!(
            "{url} answered {:?}",
            line.lines().next().unwrap_or("")
        ))
    }
}

fn delivery_worker(
    dest: String,
    rx: Receiver<Vec<u8>>,
    queued: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
) {
    while let Ok(body) = rx.recv() {
        let mut delivered = false;
        // One try, then one more after each delay.
        let mut delays = RETRY_DELAYS.iter();
        let mut attempts = 0;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            attempts += 1;
            match post(&dest, &body) {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                Err(e) => {
                    match delays.next() {
                        Some(delay) => {
                            log::info!("cim: indication to {dest} not delivered ({e}); retrying in {delay:?}");
                            std::thread::sleep(*delay);
                        }
                        None => {
                            log::warn!(
                                "cim: indication to {dest} dropped after {attempts} attempts: {e}"
                            );
                            break;
                        }
                    }
                }
            }
        }
        if delivered {
            log::debug!("cim: indication delivered to {dest}");
        }
        if let Some(n) = queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&dest)
        {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_job_that_ends_raises_one_modification() {
        use lockstep_api::control::HostControl;
        use lockstep_api::migration::{IncomingRequest, MigrateRequest};
        let host = Arc::new(crate::fake_host::FakeHost::with_vms(1));
        let cimom = Cimom::new(host.clone(), "h".into(), None, Default::default()).unwrap();
        host.start_vm("vm000").unwrap();
        let incoming = host
            .migrate_incoming(IncomingRequest {
                listen: "127.0.0.1:0".into(),
                name: "moved".into(),
                ..Default::default()
            })
            .unwrap();
        // Ended before the watch started: nothing.
        let mut ended = EndedMigrations::new(&cimom);
        assert!(ended.newly_ended(&cimom).is_empty());
        host.migrate_vm(
            "vm000",
            MigrateRequest {
                destination: incoming.listen,
                token: incoming.token,
                downtime_ms: None,
                timeout_s: None,
                max_bandwidth_mib_s: None,
                auto_converge: false,
                share_memory: None,
                ft: None,
            },
        )
        .unwrap();
        let raised = ended.newly_ended(&cimom);
        assert_eq!(raised.len(), 2, "the incoming and the outgoing job");
        for ind in &raised {
            assert_eq!(ind.class, "CIM_InstModification");
            let Some(Value::Embedded(now)) = ind.get("SourceInstance") else {
                panic!("no SourceInstance: {ind:?}")
            };
            let Some(Value::Embedded(before)) = ind.get("PreviousInstance") else {
                panic!("no PreviousInstance: {ind:?}")
            };
            assert_eq!(now.class, model::MIGRATION_JOB_CLASS);
            assert_eq!(now.get("JobState").and_then(Value::as_u64), Some(7));
            assert_eq!(
                now.get("PercentComplete").and_then(Value::as_u64),
                Some(100)
            );
            assert_eq!(before.get("JobState").and_then(Value::as_u64), Some(4));
        }
        assert!(ended.newly_ended(&cimom).is_empty(), "raised once");
    }

    #[test]
    fn a_pair_raises_a_modification_at_every_redundancy_change() {
        use lockstep_api::migration::FtRedundancy;
        let host = Arc::new(crate::fake_host::FakeHost::with_vms(2));
        let old = host.add_ft_pairing("vm000", "primary", "web");
        let cimom = Cimom::new(host.clone(), "h".into(), None, Default::default()).unwrap();
        let mut watch = RedundancyWatch::new(&cimom);
        assert!(watch.changed(&cimom).is_empty(), "known at start: nothing");

        let new = host.add_ft_pairing("vm001", "secondary", "db");
        let raised = watch.changed(&cimom);
        assert_eq!(raised.len(), 1);
        assert_eq!(raised[0].class, "CIM_InstCreation");

        let status = |ind: &Instance, which: &str| match ind.get(which) {
            Some(Value::Embedded(i)) => i.get("RedundancyStatus").and_then(Value::as_u64),
            _ => None,
        };
        for (r, before, after) in [(FtRedundancy::Degraded, 2, 3), (FtRedundancy::Lost, 3, 4)] {
            host.set_ft_redundancy(&old, r);
            let raised = watch.changed(&cimom);
            assert_eq!(raised.len(), 1, "one change, one indication: {raised:?}");
            let ind = &raised[0];
            assert_eq!(ind.class, "CIM_InstModification");
            assert_eq!(status(ind, "SourceInstance"), Some(after));
            assert_eq!(status(ind, "PreviousInstance"), Some(before));
            let Some(Value::Embedded(src)) = ind.get("SourceInstance") else {
                panic!("no SourceInstance")
            };
            assert_eq!(src.class, model::REDUNDANCY_SET_CLASS);
            assert_eq!(src.get_str("MigrationID"), Some(old.as_str()));
            assert!(watch.changed(&cimom).is_empty(), "raised once");
        }
        // Each set's changes are its own.
        host.set_ft_redundancy(&new, FtRedundancy::Degraded);
        let raised = watch.changed(&cimom);
        assert_eq!(raised.len(), 1);
        let Some(Value::Embedded(src)) = raised[0].get("SourceInstance") else {
            panic!("no SourceInstance")
        };
        assert_eq!(src.get_str("MigrationID"), Some(new.as_str()));
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:5000").unwrap(),
            ("127.0.0.1:5000".into(), "127.0.0.1:5000".into(), "/".into())
        );
        assert_eq!(parse_url("http://h/x").unwrap().0, "h:80");
        assert!(parse_url("https://h").is_err());
        assert!(parse_url("ftp://h").is_err());
    }
}
