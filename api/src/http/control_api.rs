//! lockstep's own routes (`/v1/...` and `/metrics`), each one call of [`HostControl`].
//! `api/openapi.yaml` documents every route and reply here; a test keeps the two in step.

use std::sync::Arc;

use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use hyper::{Method, StatusCode};
use serde::Serialize;

use super::routes::{self, Route, RouteMatch};
use super::server::{empty_reply, json_reply, Handler, Reply, Request, RequestProblem};
use super::{parse_json_body, MAX_BODY_BYTES};
use crate::control::{ControlError, HostControl, ShutdownRequest, SnapshotRequest};
use crate::error::ConfigError;
use crate::{metrics, VmConfig};

/// The Prometheus text exposition format's media type.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    HostInfo,
    ListVms,
    CreateVm,
    GetVm,
    UpdateVm,
    DeleteVm,
    StartVm,
    PauseVm,
    ResumeVm,
    ShutdownVm,
    ResetVm,
    SnapshotVm,
    VmMetrics,
    RestoreVm,
    MigrateVm,
    MigrateIncoming,
    GetMigration,
    CancelMigration,
    FailoverMigration,
    ListMigrations,
    Prometheus,
}

/// Every route of the control API.
pub(crate) const ROUTES: &[Route<Op>] = &[
    Route::new(Method::GET, "/v1/host", Op::HostInfo),
    Route::new(Method::GET, "/v1/vms", Op::ListVms),
    Route::new(Method::POST, "/v1/vms", Op::CreateVm),
    Route::new(Method::GET, "/v1/vms/{name}", Op::GetVm),
    Route::new(Method::PUT, "/v1/vms/{name}", Op::UpdateVm),
    Route::new(Method::DELETE, "/v1/vms/{name}", Op::DeleteVm),
    Route::new(Method::POST, "/v1/vms/{name}/start", Op::StartVm),
    Route::new(Method::POST, "/v1/vms/{name}/pause", Op::PauseVm),
    Route::new(Method::POST, "/v1/vms/{name}/resume", Op::ResumeVm),
    Route::new(Method::POST, "/v1/vms/{name}/shutdown", Op::ShutdownVm),
    Route::new(Method::POST, "/v1/vms/{name}/reset", Op::ResetVm),
    Route::new(Method::POST, "/v1/vms/{name}/snapshot", Op::SnapshotVm),
    Route::new(Method::GET, "/v1/vms/{name}/metrics", Op::VmMetrics),
    Route::new(Method::POST, "/v1/restore", Op::RestoreVm),
    Route::new(Method::POST, "/v1/vms/{name}/migrate", Op::MigrateVm),
    Route::new(Method::POST, "/v1/migrations/incoming", Op::MigrateIncoming),
    Route::new(Method::GET, "/v1/migrations", Op::ListMigrations),
    Route::new(Method::GET, "/v1/migrations/{id}", Op::GetMigration),
    Route::new(Method::DELETE, "/v1/migrations/{id}", Op::CancelMigration),
    Route::new(
        Method::POST,
        "/v1/migrations/{id}/failover",
        Op::FailoverMigration,
    ),
    Route::new(Method::GET, "/metrics", Op::Prometheus),
];

/// The body of every error reply.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

/// A refused request: its status, message and, for 405, the methods that would do.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    message: String,
    allow: Option<String>,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            allow: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }

    fn reply(&self) -> Reply {
        let mut reply = json_reply(
            self.status,
            &ErrorBody {
                error: &self.message,
            },
        );
        if let Some(allow) = self
            .allow
            .as_deref()
            .and_then(|a| HeaderValue::from_str(a).ok())
        {
            reply.headers_mut().insert(ALLOW, allow);
        }
        reply
    }
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Failure {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Failure::new(status, e.to_string())
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Failure {
        Failure::bad_request(e.to_string())
    }
}

/// The control API's handler.
pub(crate) struct ControlApi {
    host: Arc<dyn HostControl>,
}

impl ControlApi {
    pub(crate) fn new(host: Arc<dyn HostControl>) -> ControlApi {
        ControlApi { host }
    }

    fn dispatch(&self, request: &Request) -> Result<Reply, Failure> {
        let (op, params) = match routes::find(ROUTES, &request.method, &request.path) {
            RouteMatch::Found(op, params) => (op, params),
            RouteMatch::WrongMethod(allowed) => {
                let allow = routes::allow_header(&allowed);
                return Err(Failure {
                    status: StatusCode::METHOD_NOT_ALLOWED,
                    message: format!(
                        "{} is not allowed on {}; use {allow}",
                        request.method, request.path
                    ),
                    allow: Some(allow),
                });
            }
            RouteMatch::NotFound => {
                return Err(Failure::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no such route: {} {} (routes are under /v1, see api/openapi.yaml)",
                        request.method, request.path
                    ),
                ))
            }
        };
        let start = query_flags(op, request.query.as_deref())?;
        let takes_body = matches!(
            op,
            Op::CreateVm
                | Op::UpdateVm
                | Op::ShutdownVm
                | Op::SnapshotVm
                | Op::RestoreVm
                | Op::MigrateVm
                | Op::MigrateIncoming
        );
        if !takes_body {
            no_body(request)?;
        }
        let name = params.first().copied().unwrap_or_default();
        let host = &*self.host;
        let ok = StatusCode::OK;
        match op {
            Op::HostInfo => Ok(json_reply(ok, &host.host_info())),
            Op::ListVms => Ok(json_reply(ok, &host.list_vms())),
            Op::CreateVm => {
                let info = host.create_vm(vm_config(request)?, start)?;
                Ok(created(&info.name, &info))
            }
            Op::GetVm => Ok(json_reply(ok, &host.get_vm(name)?)),
            Op::UpdateVm => Ok(json_reply(ok, &host.update_vm(name, vm_config(request)?)?)),
            Op::DeleteVm => {
                host.delete_vm(name)?;
                Ok(empty_reply(StatusCode::NO_CONTENT))
            }
            Op::StartVm => Ok(json_reply(ok, &host.start_vm(name)?)),
            Op::PauseVm => Ok(json_reply(ok, &host.pause_vm(name)?)),
            Op::ResumeVm => Ok(json_reply(ok, &host.resume_vm(name)?)),
            Op::ResetVm => Ok(json_reply(ok, &host.reset_vm(name)?)),
            Op::ShutdownVm => {
                let body: ShutdownRequest = optional_body(request)?;
                Ok(json_reply(ok, &host.shutdown_vm(name, body)?))
            }
            Op::SnapshotVm => {
                let body: SnapshotRequest = optional_body(request)?;
                Ok(json_reply(ok, &host.snapshot_vm(name, body)?))
            }
            Op::VmMetrics => Ok(json_reply(ok, &host.vm_metrics(name)?)),
            Op::RestoreVm => {
                if request.body.iter().all(u8::is_ascii_whitespace) {
                    return Err(Failure::bad_request(
                        "the request body must name the snapshot: {\"state_path\": ..., \"memory_path\": ...}",
                    ));
                }
                let body = parse_json_body(&request.body)?;
                let info = host.restore_vm(body)?;
                Ok(created(&info.name, &info))
            }
            Op::MigrateVm => {
                let body = parse_json_body(&request.body)?;
                let info = host.migrate_vm(name, body)?;
                Ok(json_reply(StatusCode::ACCEPTED, &info))
            }
            Op::MigrateIncoming => {
                let body = parse_json_body(&request.body)?;
                let info = host.migrate_incoming(body)?;
                Ok(json_reply(StatusCode::CREATED, &info))
            }
            Op::GetMigration => Ok(json_reply(ok, &host.get_migration(name)?)),
            Op::ListMigrations => Ok(json_reply(ok, &host.list_migrations())),
            Op::CancelMigration => Ok(json_reply(ok, &host.cancel_migration(name)?)),
            Op::FailoverMigration => Ok(json_reply(
                StatusCode::ACCEPTED,
                &host.failover_migration(name)?,
            )),
            Op::Prometheus => {
                let mut reply = empty_reply(ok);
                *reply.body_mut() = metrics::collect(host).into();
                reply.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
                );
                Ok(reply)
            }
        }
    }
}

impl Handler for ControlApi {
    fn handle(&self, request: &Request) -> Reply {
        match self.dispatch(request) {
            Ok(reply) => reply,
            Err(failure) => {
                log::debug!(
                    "API {} {}: {} {}",
                    request.method,
                    request.path,
                    failure.status,
                    failure.message
                );
                failure.reply()
            }
        }
    }

    fn refuse(&self, problem: &RequestProblem) -> Reply {
        let failure = match problem {
            RequestProblem::TooLarge => Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            ),
            RequestProblem::NotJson(content_type) => Failure::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("request bodies are JSON: send Content-Type: application/json, not {content_type:?}"),
            ),
            RequestProblem::Unreadable(e) => {
                Failure::bad_request(format!("cannot read the request body: {e}"))
            }
            RequestProblem::HandlerPanicked => Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error: the request's handler failed (see the host's log)",
            ),
            RequestProblem::Unauthorized(why) => {
                let mut reply = Failure::new(
                    StatusCode::UNAUTHORIZED,
                    format!("{why}: the API over TCP needs Authorization: Bearer <token> (the host's api.token)"),
                )
                .reply();
                reply.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"lockstep\""),
                );
                return reply;
            }
            RequestProblem::WrongHost(host) => Failure::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!("Host {host:?} does not name this server: use the address it listens on"),
            ),
        };
        failure.reply()
    }
}

/// A 201 reply for a new VM, with its URL in `Location`.
fn created(name: &str, info: &impl Serialize) -> Reply {
    let mut reply = json_reply(StatusCode::CREATED, info);
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/vms/{name}")) {
        reply.headers_mut().insert(LOCATION, location);
    }
    reply
}

/// The `start` flag of `POST /v1/vms`; every other route takes no query parameters.
fn query_flags(op: Op, query: Option<&str>) -> Result<bool, Failure> {
    let mut start = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match (op, key) {
            (Op::CreateVm, "start") => {
                start = match value {
                    "true" | "" => true,
                    "false" => false,
                    other => {
                        return Err(Failure::bad_request(format!(
                            "query parameter start: {other:?} is not true or false"
                        )))
                    }
                }
            }
            _ => {
                return Err(Failure::bad_request(format!(
                    "unknown query parameter {key:?}"
                )))
            }
        }
    }
    Ok(start)
}

/// Routes without a body accept none, or an empty JSON object (which some clients always send).
fn no_body(request: &Request) -> Result<(), Failure> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<serde_json::Value>(&request.body) {
        Ok(serde_json::Value::Object(map)) if map.is_empty() => Ok(()),
        _ => Err(Failure::bad_request(format!(
            "{} {} takes no request body",
            request.method, request.path
        ))),
    }
}

/// A body whose fields all have defaults: an empty body means all defaults.
fn optional_body<T: serde::de::DeserializeOwned + Default>(
    request: &Request,
) -> Result<T, Failure> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    Ok(parse_json_body(&request.body)?)
}

fn vm_config(request: &Request) -> Result<VmConfig, Failure> {
    let text = std::str::from_utf8(&request.body)
        .map_err(|e| Failure::bad_request(format!("the request body is not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(Failure::bad_request(
            "the request body must be the VM's config (the JSON of `lockstep run`)",
        ));
    }
    Ok(VmConfig::from_json(text)?)
}
