//! The object manager: the state shared by every request (schema, jobs, subscriptions,
//! enumeration contexts, names set through CIM) and the entry point that turns a request body
//! into a response body.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use lockstep_api::control::HostControl;

use crate::error::{CimFault, CimResult, CimStatus};
use crate::indications::Indications;
use crate::methods::Jobs;
use crate::pull::Contexts;
use crate::schema::Schema;
use crate::value::Value;
use crate::xml::{parse_request, Call, Param, RequestError, XmlWriter};

/// What the HTTP layer sends back.
#[derive(Debug)]
pub enum Outcome {
    /// A CIM-XML response (which may carry a CIM error).
    Response(Vec<u8>),
    /// A protocol error: HTTP status and the `CIMError` header value.
    Protocol {
        /// HTTP status.
        status: u16,
        /// `CIMError` header.
        cim_error: &'static str,
        /// A short explanation for the body.
        detail: String,
    },
}

/// Display names given to VMs through ModifyInstance(ElementName), kept in a JSON file in the
/// state folder (a VM's own name cannot change).
pub struct ElementNames {
    names: RwLock<HashMap<String, String>>,
    file: Option<PathBuf>,
    version: AtomicU64,
}

impl ElementNames {
    fn load(file: Option<PathBuf>) -> ElementNames {
        let names = file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        ElementNames {
            names: RwLock::new(names),
            file,
            version: AtomicU64::new(0),
        }
    }

    /// Changes so far.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The names, by VM.
    pub fn snapshot(&self) -> HashMap<String, String> {
        match self.names.read() {
            Ok(g) if g.is_empty() => HashMap::new(),
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Sets (or with `None`, clears) a VM's display name and saves the file.
    pub fn set(&self, vm: &str, name: Option<String>) -> CimResult<()> {
        let mut g = self.names.write().unwrap_or_else(|p| p.into_inner());
        self.version.fetch_add(1, Ordering::AcqRel);
        match name {
            Some(n) => g.insert(vm.to_string(), n),
            None => g.remove(vm),
        };
        if let Some(file) = &self.file {
            let text = serde_json::to_vec_pretty(&*g).unwrap_or_default();
            let tmp = file.with_extension("tmp");
            // 0600 whatever the umask; a temporary file left by a crash is replaced.
            let _ = std::fs::remove_file(&tmp);
            lockstep_api::private_fs::create_private_file(&tmp)
                .and_then(|mut f| std::io::Write::write_all(&mut f, &text))
                .and_then(|_| std::fs::rename(&tmp, file))
                .map_err(|e| {
                    CimFault::new(
                        CimStatus::Failed,
                        format!("cannot save {}: {e}", file.display()),
                    )
                })?;
        }
        Ok(())
    }
}

/// Limits the object manager enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most open enumeration contexts.
    pub max_enumeration_contexts: usize,
    /// Most subscriptions, filters and destinations (each).
    pub max_subscriptions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_enumeration_contexts: 256,
            max_subscriptions: 100,
        }
    }
}

/// The shared state of the endpoint.
pub struct Cimom {
    /// The host.
    pub host: Arc<dyn HostControl>,
    /// The classes.
    pub schema: Schema,
    /// The host's name, in paths and as the host system's Name.
    pub hostname: String,
    /// Jobs of asynchronous methods.
    pub jobs: Jobs,
    /// Display names set through CIM.
    pub element_names: ElementNames,
    /// The last state asked of each VM through RequestStateChange.
    requested: Mutex<HashMap<String, u16>>,
    requested_version: AtomicU64,
    /// Responses that can be reused while their inputs are unchanged.
    cache: crate::cache::ResponseCache,
    /// Subscriptions and their delivery.
    pub indications: Indications,
    /// Open enumeration contexts.
    pub pulls: Contexts,
    /// Limits.
    pub limits: Limits,
    /// Size of the last response, as a capacity hint for the next.
    last_response: std::sync::atomic::AtomicUsize,
}

impl Cimom {
    /// Builds the object manager; `state_dir` keeps the names set through CIM.
    pub fn new(
        host: Arc<dyn HostControl>,
        hostname: String,
        state_dir: Option<PathBuf>,
        limits: Limits,
    ) -> Result<Arc<Cimom>, crate::error::CimError> {
        let schema = Schema::load()?;
        let names_file = state_dir.map(|d| d.join("element-names.json"));
        Ok(Arc::new(Cimom {
            host,
            schema,
            hostname,
            jobs: Jobs::default(),
            element_names: ElementNames::load(names_file),
            requested: Mutex::new(HashMap::new()),
            requested_version: AtomicU64::new(0),
            cache: crate::cache::ResponseCache::default(),
            indications: Indications::new(limits.max_subscriptions),
            pulls: Contexts::new(limits.max_enumeration_contexts),
            limits,
            last_response: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// The last RequestedState of each VM.
    pub fn requested_states(&self) -> HashMap<String, u16> {
        let g = self.requested.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_empty() {
            HashMap::new()
        } else {
            g.clone()
        }
    }

    /// A number that changes whenever state kept here (not by the host) changes: jobs, names,
    /// requested states, subscriptions.
    pub fn state_version(&self) -> u64 {
        self.jobs
            .version()
            .wrapping_add(self.element_names.version())
            .wrapping_add(self.requested_version.load(Ordering::Acquire))
            .wrapping_add(self.indications.version())
    }

    /// Records a VM's RequestedState.
    pub fn set_requested_state(&self, vm: &str, state: u16) {
        self.requested_version.fetch_add(1, Ordering::AcqRel);
        self.requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.to_string(), state);
    }

    /// Answers one request body; `expected_method` and `expected_object` are the CIMMethod and
    /// (decoded) CIMObject headers, which must agree with the body.
    pub fn handle(
        self: &Arc<Self>,
        body: &[u8],
        expected_method: Option<&str>,
        expected_object: Option<&str>,
    ) -> Outcome {
        let request = match parse_request(body) {
            Ok(r) => r,
            Err(RequestError::NotWellFormed(detail)) => {
                return Outcome::Protocol {
                    status: 400,
                    cim_error: "request-not-well-formed",
                    detail,
                }
            }
            Err(RequestError::NotValid(detail)) => {
                return Outcome::Protocol {
                    status: 400,
                    cim_error: "request-not-valid",
                    detail,
                }
            }
            Err(RequestError::MultipleRequests) => {
                return Outcome::Protocol {
                    status: 501,
                    cim_error: "multiple-requests-unsupported",
                    detail: "MULTIREQ is not supported".into(),
                }
            }
            Err(RequestError::Cim {
                message_id,
                method,
                intrinsic,
                fault,
            }) => {
                let mut w = XmlWriter::new(&self.hostname, 512);
                w.begin_message(&message_id);
                open_response(&mut w, &method, intrinsic);
                w.error(fault.status as u16, &fault.description);
                close_response(&mut w, intrinsic);
                w.end_message();
                return Outcome::Response(w.buf);
            }
        };
        if let Some(expected) = expected_method {
            if !expected.eq_ignore_ascii_case(request.call.name()) {
                return Outcome::Protocol {
                    status: 400,
                    cim_error: "header-mismatch",
                    detail: format!(
                        "the CIMMethod header names {expected:?}, the body calls {:?}",
                        request.call.name()
                    ),
                };
            }
        }
        if let (Some(object), Call::Intrinsic { namespace, .. }) = (expected_object, &request.call)
        {
            if !crate::value::namespace_eq(object, namespace) {
                return Outcome::Protocol {
                    status: 400,
                    cim_error: "header-mismatch",
                    detail: "the CIMObject header names another namespace than the body".into(),
                };
            }
        }
        let intrinsic = matches!(request.call, Call::Intrinsic { .. });
        // Start with room for a response as large as the last one, so that a large enumeration
        // does not grow (and copy) its buffer several times.
        let hint = self
            .last_response
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut w = XmlWriter::new(&self.hostname, hint.clamp(4096, 1 << 20));
        w.begin_message(&request.message_id);
        open_response(&mut w, request.call.name(), intrinsic);
        let mark = w.buf.len();
        let result = match &request.call {
            Call::Intrinsic {
                name,
                namespace,
                params,
            } => self.intrinsic_cached(name, namespace, params, &mut w),
            Call::Method {
                name,
                namespace,
                target,
                params,
            } => crate::methods::invoke(self, name, namespace, target, Params(params), &mut w),
        };
        if let Err(fault) = result {
            w.buf.truncate(mark);
            log::debug!("cim: {} failed: {fault}", request.call.name());
            w.error(fault.status as u16, &fault.description);
        }
        close_response(&mut w, intrinsic);
        w.end_message();
        self.last_response.store(
            w.buf.len() + w.buf.len() / 8,
            std::sync::atomic::Ordering::Relaxed,
        );
        Outcome::Response(w.buf)
    }
}

impl Cimom {
    /// Runs an intrinsic operation, or reuses the body of an earlier identical one when what it
    /// was built from (the host's VM list and report, the state kept here) is unchanged.
    fn intrinsic_cached(
        &self,
        name: &str,
        namespace: &str,
        params: &[(String, Param)],
        w: &mut XmlWriter,
    ) -> CimResult<()> {
        let key = crate::cache::ResponseCache::key(name, namespace, params);
        if let Some(key) = &key {
            if self.cache.reuse(key, self, &mut w.buf) {
                return Ok(());
            }
        }
        let version = self.state_version();
        let snap = crate::model::Snapshot::new(&*self.host);
        let mark = w.buf.len();
        crate::ops::intrinsic(self, &snap, name, namespace, Params(params), w)?;
        if let Some(key) = key {
            self.cache.store(key, version, &snap, &w.buf[mark..]);
        }
        Ok(())
    }
}

fn open_response(w: &mut XmlWriter, method: &str, intrinsic: bool) {
    w.raw("<SIMPLERSP>");
    w.raw(if intrinsic {
        "<IMETHODRESPONSE"
    } else {
        "<METHODRESPONSE"
    })
    .attr("NAME", method)
    .raw(">");
}

fn close_response(w: &mut XmlWriter, intrinsic: bool) {
    w.raw(if intrinsic {
        "</IMETHODRESPONSE>"
    } else {
        "</METHODRESPONSE>"
    })
    .raw("</SIMPLERSP>");
}

/// A call's parameters with typed getters.
#[derive(Clone, Copy)]
pub struct Params<'a>(pub &'a [(String, Param)]);

fn param_error(name: &str, what: &str) -> CimFault {
    CimFault::new(
        CimStatus::InvalidParameter,
        format!("parameter {name} must be {what}"),
    )
}

impl<'a> Params<'a> {
    /// A parameter by case-insensitive name.
    pub fn get(&self, name: &str) -> Option<&'a Param> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, p)| p)
    }

    /// Refuses parameters not in `known`.
    pub fn only(&self, known: &[&str]) -> CimResult<()> {
        for (n, _) in self.0 {
            if !known.iter().any(|k| k.eq_ignore_ascii_case(n)) {
                return Err(CimFault::new(
                    CimStatus::InvalidParameter,
                    format!(
                        "unknown parameter {}",
                        n.chars().take(64).collect::<String>()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A boolean, with its default when absent.
    pub fn bool(&self, name: &str, default: bool) -> CimResult<bool> {
        match self.get(name) {
            None | Some(Param::Null) => Ok(default),
            Some(Param::Value(Value::Bool(b))) => Ok(*b),
            Some(Param::Value(Value::Str(s))) => match s.trim().to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(param_error(name, "TRUE or FALSE")),
            },
            _ => Err(param_error(name, "TRUE or FALSE")),
        }
    }

    /// A string.
    pub fn string(&self, name: &str) -> CimResult<Option<&'a str>> {
        match self.get(name) {
            None | Some(Param::Null) => Ok(None),
            Some(Param::Value(Value::Str(s))) => Ok(Some(s)),
            _ => Err(param_error(name, "a string")),
        }
    }

    /// An array of strings (a single string is taken as an array of one); empty when absent.
    pub fn strings(&self, name: &str) -> CimResult<Vec<&'a str>> {
        match self.get(name) {
            None | Some(Param::Null) => Ok(Vec::new()),
            Some(Param::Value(Value::Str(s))) => Ok(vec![s]),
            Some(Param::Value(Value::Array(_, items))) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| param_error(name, "an array of strings"))
                })
                .collect(),
            _ => Err(param_error(name, "an array of strings")),
        }
    }

    /// An unsigned number.
    pub fn u32(&self, name: &str) -> CimResult<Option<u32>> {
        match self.get(name) {
            None | Some(Param::Null) => Ok(None),
            Some(Param::Value(v)) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| param_error(name, "a uint32")),
            _ => Err(param_error(name, "a uint32")),
        }
    }

    /// A class name (also accepted as a plain string).
    pub fn class_name(&self, name: &str) -> CimResult<Option<&'a str>> {
        match self.get(name) {
            None | Some(Param::Null) => Ok(None),
            Some(Param::ClassName(c)) => Ok(Some(c)),
            Some(Param::Value(Value::Str(s))) => Ok(Some(s)),
            _ => Err(param_error(name, "a class name")),
        }
    }

    /// A PropertyList: `None` when absent or NULL (all properties).
    pub fn property_list(&self) -> CimResult<Option<Vec<String>>> {
        match self.get("PropertyList") {
            None | Some(Param::Null) => Ok(None),
            Some(Param::Value(Value::Array(_, items))) => Ok(Some(
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
            )),
            Some(Param::Value(Value::Str(s))) if s.is_empty() => Ok(Some(Vec::new())),
            _ => Err(param_error("PropertyList", "an array of property names")),
        }
    }
}
