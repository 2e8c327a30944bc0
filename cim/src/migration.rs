//! The migration service's methods (DSP1081): MigrateVirtualSystemToHost (a job backed by the
//! host's migration registry), CheckVirtualSystemIsMigratableToHost, and lockstep's
//! PrepareIncomingMigration, which opens the destination's one-shot listener and hands out the
//! token the source must present.
//!
//! The flow: the client calls PrepareIncomingMigration on the destination's service
//! (`Listen`, `SystemName`, and where this host's taps, images and vsock socket differ from the
//! source's: `NetworkOverrides`, `DriveOverrides`, `VsockPath`) and gets `DestinationHost`,
//! `Token` and the incoming job; then
//! MigrateVirtualSystemToHost on the source's service with the VM, that `DestinationHost` and
//! an embedded LKS_VirtualSystemMigrationSettingData carrying `Token` (and, if wanted,
//! MaxDowntime, Bandwidth, PrecopyTimeout, AutoConverge). The source's job moves to 100 and
//! ends Completed (7), or Exception (10) with ErrorDescription.

use std::time::{Duration, Instant};

use lockstep_api::migration::{
    DriveOverride, FtOptions, IncomingRequest, MigrateRequest, MigrationPhase, NetworkOverride,
    VsockOverride,
};

use crate::cimom::{Cimom, Params};
use crate::error::{CimFault, CimResult, CimStatus};
use crate::methods::{embedded_param, host_fault, MethodResult};
use crate::model::{self, MIGRATION_TYPE_LIVE};
use crate::value::{Instance, ObjectPath, Value};
use crate::xml::Param;

/// How long MigrateVirtualSystemToHost waits for the destination to accept the handshake (so
/// that an unreachable destination or a wrong token is a CIM error, not only a failed job).
const HANDSHAKE_WAIT: Duration = Duration::from_secs(15);
/// Return code: Method Parameters Checked - Job Started.
const JOB_STARTED: u32 = 4096;

fn invalid(msg: impl Into<String>) -> CimFault {
    CimFault::new(CimStatus::InvalidParameter, msg)
}

/// The VM a `ComputerSystem` reference names (one of this host's LKS_VirtualComputerSystem).
fn vm_of(params: Params<'_>) -> CimResult<String> {
    let path: &ObjectPath = match params.get("ComputerSystem") {
        Some(Param::Value(Value::Ref(p))) => p,
        Some(Param::InstanceName(p)) => p,
        _ => {
            return Err(invalid(
                "ComputerSystem must reference the LKS_VirtualComputerSystem to migrate",
            ))
        }
    };
    if !path.class.eq_ignore_ascii_case("LKS_VirtualComputerSystem") {
        return Err(invalid(format!(
            "ComputerSystem must be an LKS_VirtualComputerSystem, not {}",
            path.class
        )));
    }
    path.key_str("Name")
        .map(str::to_string)
        .ok_or_else(|| invalid("ComputerSystem has no Name key"))
}

/// What MigrateVirtualSystemToHost and CheckVirtualSystemIsMigratableToHost were asked.
struct Asked {
    vm: String,
    request: MigrateRequest,
}

/// `IP:PORT` or `unix:/absolute/path`, as the migration stream takes them.
fn check_destination(text: &str) -> CimResult<()> {
    let ok = match text.strip_prefix("unix:") {
        Some(path) => path.starts_with('/'),
        None => text.parse::<std::net::SocketAddr>().is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "DestinationHost {:?} is neither IP:PORT (IPv6 as [addr]:port) nor unix:/absolute/path",
            text.chars().take(256).collect::<String>()
        )))
    }
}

fn number(settings: &Instance, name: &str) -> CimResult<Option<u64>> {
    match settings.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(format!("MigrationSettingData.{name} must be a number"))),
    }
}

/// Bandwidth in BandwidthUnit to MiB/s (0: no limit).
fn bandwidth_mib_s(settings: &Instance) -> CimResult<Option<u64>> {
    let Some(amount) = number(settings, "Bandwidth")? else {
        return Ok(None);
    };
    let unit: String = settings
        .get_str("BandwidthUnit")
        .unwrap_or("byte / second * 2^20")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let mib = match unit.as_str() {
        "byte/second*2^20" | "byte*2^20/second" => amount,
        "byte/second*2^30" | "byte*2^30/second" => amount.saturating_mul(1024),
        _ => {
            return Err(invalid(format!(
                "MigrationSettingData.BandwidthUnit {unit:?}: use \"byte / second * 2^20\" or \"byte / second * 2^30\""
            )))
        }
    };
    Ok((mib > 0).then_some(mib))
}

/// Fault-tolerance options from `text` and `number` lookups (a settings instance's properties or
/// a method's parameters): FTArbiter (etcd endpoints, IP:PORT, comma-separated) and FTHostID
/// together make a pairing; FTPair, FTEpoch, FTHeartbeatTimeout (milliseconds) and
/// FTHeartbeatPath (a UDP address) are optional.
/// The host checks the values and names the one at fault.
fn ft_options(
    text: impl Fn(&str) -> Option<String>,
    number: impl Fn(&str) -> CimResult<Option<u64>>,
) -> CimResult<Option<FtOptions>> {
    let (arbiter, host_id) = (text("FTArbiter"), text("FTHostID"));
    let (arbiter, host_id) = match (arbiter, host_id) {
        (None, None) => return Ok(None),
        (Some(a), Some(h)) => (a, h),
        _ => {
            return Err(invalid(
                "FTArbiter and FTHostID go together (a fault-tolerant pairing)",
            ))
        }
    };
    Ok(Some(FtOptions {
        arbiter: arbiter
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect(),
        host_id,
        pair: text("FTPair"),
        epoch_ms: number("FTEpoch")?,
        heartbeat_timeout_ms: number("FTHeartbeatTimeout")?,
        heartbeat_path: text("FTHeartbeatPath"),
        standby: None,
    }))
}

/// Reads the parameters both methods share.
fn asked(params: Params<'_>) -> CimResult<Asked> {
    let vm = vm_of(params)?;
    let destination = params
        .string("DestinationHost")?
        .ok_or_else(|| invalid("DestinationHost is required (IP:PORT or unix:/path)"))?
        .trim()
        .to_string();
    check_destination(&destination)?;
    for name in ["NewSystemSettingData", "NewResourceSettingData"] {
        if !matches!(params.get(name), None | Some(Param::Null)) {
            return Err(CimFault::new(
                CimStatus::NotSupported,
                format!("{name} is not supported: the VM keeps its settings on the destination"),
            ));
        }
    }
    let settings = embedded_param(params, "MigrationSettingData")?.ok_or_else(|| {
        invalid("MigrationSettingData (an embedded LKS_VirtualSystemMigrationSettingData with the destination's Token) is required")
    })?;
    if !settings
        .class
        .eq_ignore_ascii_case(model::MIGRATION_SETTINGS_CLASS)
        && !settings
            .class
            .eq_ignore_ascii_case("CIM_VirtualSystemMigrationSettingData")
    {
        return Err(invalid(format!(
            "MigrationSettingData must be an {}, not {}",
            model::MIGRATION_SETTINGS_CLASS,
            settings.class
        )));
    }
    if let Some(kind) = number(&settings, "MigrationType")? {
        if kind != u64::from(MIGRATION_TYPE_LIVE) {
            return Err(CimFault::new(
                CimStatus::NotSupported,
                format!("MigrationType {kind}: only 2 (Live) is supported"),
            ));
        }
    }
    if let Some(transport) = number(&settings, "TransportType")? {
        // TCP for IP:PORT, IPC for unix:/path.
        if !(transport == 5 || transport == 6) {
            return Err(CimFault::new(
                CimStatus::NotSupported,
                format!("TransportType {transport}: only 5 (TCP) and 6 (IPC) are supported"),
            ));
        }
    }
    let token = settings
        .get_str("Token")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            invalid("MigrationSettingData.Token is required: the token the destination's PrepareIncomingMigration returned")
        })?
        .to_string();
    let auto_converge = match settings.get("AutoConverge") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Str(s)) if s.eq_ignore_ascii_case("true") => true,
        Some(Value::Str(s)) if s.eq_ignore_ascii_case("false") => false,
        Some(_) => {
            return Err(invalid(
                "MigrationSettingData.AutoConverge must be a boolean",
            ))
        }
    };
    let ft = ft_options(
        |name| settings.get_str(name).map(str::to_string),
        |name| number(&settings, name),
    )?;
    Ok(Asked {
        vm,
        request: MigrateRequest {
            destination,
            token,
            downtime_ms: number(&settings, "MaxDowntime")?,
            timeout_s: number(&settings, "PrecopyTimeout")?,
            max_bandwidth_mib_s: bandwidth_mib_s(&settings)?,
            auto_converge,
            share_memory: None,
            ft,
        },
    })
}

/// MigrateVirtualSystemToHost: starts sending the VM and waits for the destination's answer to
/// the handshake; returns 4096 and the job, or a CIM error (unknown VM, bad parameters, the
/// destination unreachable or refusing) with the VM running on here.
pub fn migrate_to_host(cimom: &Cimom, params: Params<'_>) -> MethodResult {
    let Asked { vm, request } = asked(params)?;
    let started = cimom.host.migrate_vm(&vm, request).map_err(host_fault)?;
    let deadline = Instant::now() + HANDSHAKE_WAIT;
    let mut info = started;
    while info.phase == MigrationPhase::Handshake && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        info = cimom.host.get_migration(&info.id).map_err(host_fault)?;
    }
    if matches!(
        info.phase,
        MigrationPhase::Failed | MigrationPhase::Cancelled
    ) {
        return Err(CimFault::new(
            CimStatus::Failed,
            format!(
                "migration {} of {vm} did not start: {}; the VM runs on here",
                info.id,
                info.error.as_deref().unwrap_or("no reason given")
            ),
        ));
    }
    Ok((
        JOB_STARTED,
        vec![("Job", model::migration_job_path(&info.id).into())],
    ))
}

/// CheckVirtualSystemIsMigratableToHost: the parameters are valid and the VM runs (or is
/// paused). The destination is not contacted: its one-shot listener takes one connection, and
/// its own checks (token, config, CPU) come in the handshake of the migration itself.
pub fn check_migratable(cimom: &Cimom, params: Params<'_>) -> MethodResult {
    let Asked { vm, .. } = asked(params)?;
    let details = cimom.host.get_vm(&vm).map_err(host_fault)?;
    use lockstep_api::control::VmState;
    let migratable = matches!(details.info.state, VmState::Running | VmState::Paused);
    Ok((0, vec![("IsMigratable", Value::Bool(migratable))]))
}

/// Most overrides a request may carry, per kind (a VM has far fewer devices).
const MAX_OVERRIDES: usize = 64;

/// The `id=value` items of an override array, each checked with `check`.
fn id_value_pairs<'a>(
    params: Params<'a>,
    name: &str,
    form: &str,
    check: impl Fn(&str) -> bool,
) -> CimResult<Vec<(String, &'a str)>> {
    let items = params.strings(name)?;
    if items.len() > MAX_OVERRIDES {
        return Err(invalid(format!(
            "{name} has {} items; at most {MAX_OVERRIDES}",
            items.len()
        )));
    }
    let mut pairs: Vec<(String, &str)> = Vec::with_capacity(items.len());
    for item in items {
        let shown = || item.chars().take(256).collect::<String>();
        let (id, value) = item
            .split_once('=')
            .map(|(id, value)| (id.trim(), value.trim()))
            .filter(|(id, value)| !id.is_empty() && check(value))
            .ok_or_else(|| invalid(format!("{name} item {:?} is not {form}", shown())))?;
        if pairs.iter().any(|(seen, _)| seen == id) {
            return Err(invalid(format!("{name} names {id:?} twice")));
        }
        pairs.push((id.to_string(), value));
    }
    Ok(pairs)
}

/// The arriving VM's devices on this host, where they differ from the source's config, as the
/// overrides of an incoming request: `NetworkOverrides` (`iface_id=tap`), `DriveOverrides`
/// (`drive_id=/absolute/path`), `VsockPath` (an absolute path). The host checks that each names
/// a device of the VM.
fn overrides(params: Params<'_>) -> CimResult<IncomingRequest> {
    let absolute = |path: &str| path.starts_with('/');
    let network_overrides = id_value_pairs(params, "NetworkOverrides", "iface_id=tap", |tap| {
        !tap.is_empty()
    })?
    .into_iter()
    .map(|(iface_id, tap)| NetworkOverride {
        iface_id,
        host_dev_name: tap.to_string(),
    })
    .collect();
    let drive_overrides = id_value_pairs(
        params,
        "DriveOverrides",
        "drive_id=/absolute/path",
        absolute,
    )?
    .into_iter()
    .map(|(drive_id, path)| DriveOverride {
        drive_id,
        path_on_host: path.into(),
    })
    .collect();
    let vsock_override = match params.string("VsockPath")?.map(str::trim) {
        None => None,
        Some(path) if absolute(path) => Some(VsockOverride {
            uds_path: path.into(),
        }),
        Some(path) => {
            return Err(invalid(format!(
                "VsockPath {:?} is not an absolute path",
                path.chars().take(256).collect::<String>()
            )))
        }
    };
    Ok(IncomingRequest {
        network_overrides,
        vsock_override,
        drive_overrides,
        ..IncomingRequest::default()
    })
}

/// PrepareIncomingMigration: opens the one-shot listener for a VM to be named `SystemName`.
pub fn prepare_incoming(cimom: &Cimom, params: Params<'_>) -> MethodResult {
    let listen = params
        .string("Listen")?
        .ok_or_else(|| invalid("Listen is required (IP:PORT, port 0 for any, or unix:/path)"))?;
    let name = params
        .string("SystemName")?
        .ok_or_else(|| invalid("SystemName is required: the name the VM gets here"))?;
    let ft = ft_options(
        |name| params.string(name).ok().flatten().map(str::to_string),
        |name| {
            params
                .u32(name)
                .map(|v| v.map(u64::from))
                .map_err(|_| invalid(format!("{name} must be a number of milliseconds")))
        },
    )?;
    let info = cimom
        .host
        .migrate_incoming(IncomingRequest {
            listen: listen.trim().to_string(),
            name: name.to_string(),
            ft,
            ..overrides(params)?
        })
        .map_err(host_fault)?;
    Ok((
        JOB_STARTED,
        vec![
            ("DestinationHost", Value::from(info.listen)),
            ("Token", Value::from(info.token)),
            ("Job", model::migration_job_path(&info.id).into()),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fake_host::FakeHost;
    use crate::model::{Snapshot, CIMV2_NS, INTEROP_NS};
    use lockstep_api::control::HostControl;

    fn cimom() -> Arc<Cimom> {
        let host = Arc::new(FakeHost::with_vms(1));
        host.start_vm("vm000").unwrap();
        Cimom::new(host, "h".into(), None, Default::default()).unwrap()
    }

    /// `inst` with `name` set to `value`, whether it had one or not.
    fn but(mut inst: Instance, name: &'static str, value: Value) -> Instance {
        inst.set(std::borrow::Cow::Borrowed(name), value);
        inst
    }

    fn settings(token: &str) -> Instance {
        Instance::new(model::MIGRATION_SETTINGS_CLASS)
            .with("Token", token)
            .with("MaxDowntime", 50u64)
            .with("Bandwidth", 2u16)
            .with("BandwidthUnit", "byte / second * 2^30")
            .with("AutoConverge", true)
    }

    fn migrate_params(vm: &str, destination: &str, settings: Instance) -> Vec<(String, Param)> {
        vec![
            (
                "ComputerSystem".into(),
                Param::Value(model::vm_path(vm).into()),
            ),
            (
                "DestinationHost".into(),
                Param::Value(Value::from(destination)),
            ),
            (
                "MigrationSettingData".into(),
                Param::Value(Value::Embedded(Box::new(settings))),
            ),
        ]
    }

    fn out<'a>(out: &'a [(&'static str, Value)], name: &str) -> &'a Value {
        &out.iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn a_vm_migrates_through_the_service_and_its_job_ends_completed() {
        let cimom = cimom();
        let prepare = [
            (
                "Listen".to_string(),
                Param::Value(Value::from("127.0.0.1:0")),
            ),
            ("SystemName".to_string(), Param::Value(Value::from("moved"))),
        ];
        let (rc, prepared) = prepare_incoming(&cimom, Params(&prepare)).unwrap();
        assert_eq!(rc, 4096);
        let destination = out(&prepared, "DestinationHost")
            .as_str()
            .unwrap()
            .to_string();
        let token = out(&prepared, "Token").as_str().unwrap().to_string();
        assert_eq!(destination, "127.0.0.1:45678");

        let params = migrate_params("vm000", &destination, settings(&token));
        let (rc, checked) = check_migratable(&cimom, Params(&params)).unwrap();
        assert_eq!((rc, out(&checked, "IsMigratable")), (0, &Value::Bool(true)));
        let (rc, started) = migrate_to_host(&cimom, Params(&params)).unwrap();
        assert_eq!(rc, 4096);
        let Value::Ref(job) = out(&started, "Job") else {
            panic!("no job reference: {started:?}")
        };
        let snap = Snapshot::new(&*cimom.host);
        let job = model::get(&cimom, &snap, job).expect("the job is served");
        assert_eq!(job.get("JobState").and_then(Value::as_u64), Some(7));
        assert_eq!(
            job.get("PercentComplete").and_then(Value::as_u64),
            Some(100)
        );
        assert_eq!(job.get_str("Direction"), Some("outgoing"));
        assert!(job.get("ErrorDescription").is_none());
        // Both ends' jobs are served, the incoming one too.
        let jobs = model::enumerate(&cimom, &snap, CIMV2_NS, "CIM_ConcreteJob");
        assert_eq!(
            jobs.iter()
                .filter(|j| j.class == model::MIGRATION_JOB_CLASS)
                .count(),
            2
        );
    }

    #[test]
    fn bad_requests_are_cim_errors() {
        let cimom = cimom();
        let status = |params: Vec<(String, Param)>| {
            migrate_to_host(&cimom, Params(&params)).unwrap_err().status
        };
        let good = || settings("fake-token-0");
        assert_eq!(
            status(migrate_params("nosuchvm", "127.0.0.1:4000", good())),
            CimStatus::NotFound
        );
        // No listener has this token: the handshake fails, and so does the method.
        let refused = migrate_to_host(
            &cimom,
            Params(&migrate_params("vm000", "127.0.0.1:4000", good())),
        )
        .unwrap_err();
        assert_eq!(refused.status, CimStatus::Failed);
        assert!(
            refused.description.contains("authentication")
                && refused.description.contains("runs on here"),
            "{}",
            refused.description
        );
        assert_eq!(
            status(migrate_params("vm000", "somewhere", good())),
            CimStatus::InvalidParameter
        );
        assert_eq!(
            status(migrate_params(
                "vm000",
                "127.0.0.1:4000",
                Instance::new(model::MIGRATION_SETTINGS_CLASS)
            )),
            CimStatus::InvalidParameter,
            "no token"
        );
        assert_eq!(
            status(migrate_params(
                "vm000",
                "127.0.0.1:4000",
                good().with("MigrationType", 4u16)
            )),
            CimStatus::NotSupported
        );
        assert_eq!(
            status(migrate_params(
                "vm000",
                "127.0.0.1:4000",
                but(good(), "BandwidthUnit", "bit / second".into())
            )),
            CimStatus::InvalidParameter
        );
        assert_eq!(
            cimom.host.get_vm("vm000").unwrap().info.state,
            lockstep_api::control::VmState::Running
        );
    }

    #[test]
    fn settings_map_onto_the_control_apis_request() {
        let params = migrate_params("vm000", "unix:/run/in.sock", settings("t"));
        let asked = asked(Params(&params)).unwrap();
        assert_eq!(
            asked.request,
            MigrateRequest {
                destination: "unix:/run/in.sock".into(),
                token: "t".into(),
                downtime_ms: Some(50),
                timeout_s: None,
                max_bandwidth_mib_s: Some(2048),
                auto_converge: true,
                share_memory: None,
                ft: None,
            }
        );
        let unlimited = but(settings("t"), "Bandwidth", 0u16.into());
        let params = migrate_params("vm000", "[::1]:7000", unlimited);
        assert_eq!(asked_bandwidth(&params), None);
    }

    fn asked_bandwidth(params: &[(String, Param)]) -> Option<u64> {
        asked(Params(params)).unwrap().request.max_bandwidth_mib_s
    }

    #[test]
    fn the_profile_is_registered_with_the_service_as_its_central_instance() {
        let cimom = cimom();
        let snap = Snapshot::new(&*cimom.host);
        let profiles = model::enumerate(&cimom, &snap, INTEROP_NS, "CIM_RegisteredProfile");
        assert!(profiles.iter().any(|p| {
            p.get_str("RegisteredName") == Some("Virtual System Migration")
                && p.get_str("RegisteredVersion") == Some("1.0.0")
        }));
        let conforms = model::enumerate(&cimom, &snap, INTEROP_NS, "CIM_ElementConformsToProfile");
        assert!(conforms.iter().any(|c| {
            matches!(c.get("ManagedElement"), Some(Value::Ref(p)) if p.class == model::MIGRATION_SERVICE_CLASS)
        }));
        for (class, count) in [
            ("LKS_VirtualSystemMigrationService", 1),
            ("LKS_VirtualSystemMigrationCapabilities", 1),
            ("LKS_VirtualSystemMigrationSettingData", 1),
            ("LKS_ServiceAffectsElement", 1),
        ] {
            assert_eq!(
                model::enumerate(&cimom, &snap, CIMV2_NS, class).len(),
                count,
                "{class}"
            );
        }
        let hosted = model::enumerate(&cimom, &snap, CIMV2_NS, "LKS_HostedService");
        assert!(hosted.iter().any(|h| {
            matches!(h.get("Dependent"), Some(Value::Ref(p)) if p.class == model::MIGRATION_SERVICE_CLASS)
        }));
    }

    #[test]
    fn overrides_become_the_incoming_requests_and_bad_ones_name_the_parameter() {
        let strings = |items: &[&str]| {
            let items = items.iter().map(|i| Value::from(i.to_string())).collect();
            Param::Value(Value::Array(crate::value::CimType::String, items))
        };
        let params = [
            ("NetworkOverrides".to_string(), strings(&["eth0=tap-b"])),
            (
                "DriveOverrides".to_string(),
                strings(&["root = /srv/b/root.img", "data=/srv/b/data.img"]),
            ),
            (
                "VsockPath".to_string(),
                Param::Value(Value::from("/run/v.sock")),
            ),
        ];
        let got = overrides(Params(&params)).unwrap();
        assert_eq!(
            got.network_overrides,
            [NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap-b".into()
            }]
        );
        assert_eq!(got.drive_overrides.len(), 2);
        assert_eq!(got.drive_overrides[0].drive_id, "root");
        assert_eq!(
            got.drive_overrides[0].path_on_host,
            std::path::Path::new("/srv/b/root.img")
        );
        assert_eq!(
            got.vsock_override.unwrap().uds_path,
            std::path::Path::new("/run/v.sock")
        );
        let none = overrides(Params(&[])).unwrap();
        assert!(
            none.network_overrides.is_empty()
                && none.drive_overrides.is_empty()
                && none.vsock_override.is_none()
        );

        let refused = |name: &str, param: Param| {
            let params = [(name.to_string(), param)];
            let fault = overrides(Params(&params)).expect_err("refused");
            assert_eq!(fault.status, CimStatus::InvalidParameter, "{name}");
            fault.to_string()
        };
        for (name, items) in [
            ("DriveOverrides", vec!["root=relative/path.img"]),
            ("DriveOverrides", vec!["=/a.img"]),
            ("DriveOverrides", vec!["root"]),
            ("DriveOverrides", vec!["root=/a.img", "root=/b.img"]),
            ("NetworkOverrides", vec!["eth0="]),
        ] {
            let message = refused(name, strings(&items));
            assert!(message.contains(name), "{message}");
        }
        let many: Vec<String> = (0..=MAX_OVERRIDES)
            .map(|i| format!("eth{i}=tap{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(refused("NetworkOverrides", strings(&many)).contains("at most"));
        assert!(refused("VsockPath", Param::Value(Value::from("v.sock"))).contains("VsockPath"));
        assert!(
            refused("DriveOverrides", Param::Value(Value::from(7u32))).contains("DriveOverrides")
        );
    }
}
