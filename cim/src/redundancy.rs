//! CIM_RedundancySet.Failover on a fault-tolerant pair's set (`LKS_RedundancySet`): a planned
//! failover asked of the primary through `HostControl::failover_migration`. The method returns
//! as soon as the primary has taken the request; the set's RedundancyStatus then tells the
//! outcome (Redundancy Lost here once the primary's copy has ended, and an indication with it).
//!
//! Return codes, from CIM_RedundancySet.Failover's ValueMap: 0 Completed with No Error (the
//! failover has started), 1 Not Supported (this is the secondary's set: ask the primary's
//! endpoint), 3 Busy/In Use (the set is not fully redundant, so no up-to-date copy can take
//! over, or the pairing is no longer protecting), 4 Parameter Error (FailoverFrom is not this
//! set's member, the VM on this host). FailoverTo names the other host's copy, which this
//! endpoint cannot see: it is not checked.

use lockstep_api::control::ControlError;

use crate::cimom::{Cimom, Params};
use crate::error::{CimFault, CimResult, CimStatus};
use crate::methods::MethodResult;
use crate::model;
use crate::value::{Instance, ObjectPath, Value};
use crate::xml::Param;

/// Completed with No Error: the failover has started.
pub const FAILOVER_STARTED: u32 = 0;
/// Not Supported: the set is the secondary's.
pub const FAILOVER_NOT_PRIMARY: u32 = 1;
/// Busy/In Use: the set is not fully redundant, or its pairing no longer protects the VM.
pub const FAILOVER_NOT_REDUNDANT: u32 = 3;
/// Parameter Error: FailoverFrom is not the set's member.
pub const FAILOVER_BAD_PARAMETER: u32 = 4;

/// A reference parameter, if given.
fn reference<'a>(params: Params<'a>, name: &str) -> CimResult<Option<&'a ObjectPath>> {
    match params.get(name) {
        None | Some(Param::Null) => Ok(None),
        Some(Param::Value(Value::Ref(p))) => Ok(Some(p)),
        Some(Param::InstanceName(p)) => Ok(Some(p)),
        Some(_) => Err(CimFault::new(
            CimStatus::InvalidParameter,
            format!("{name} must be a reference"),
        )),
    }
}

/// Failover(FailoverFrom, FailoverTo) on `set`, an `LKS_RedundancySet`.
pub fn failover(cimom: &Cimom, set: &Instance, params: Params<'_>) -> MethodResult {
    let (Some(id), Some(role), Some(vm)) = (
        set.get_str("MigrationID"),
        set.get_str("Role"),
        set.get_str("SystemName"),
    ) else {
        return Err(CimFault::new(
            CimStatus::Failed,
            "the set does not name its pairing",
        ));
    };
    let from = reference(params, "FailoverFrom")?;
    reference(params, "FailoverTo")?;
    if let Some(from) = from {
        let member =
            from.class.eq_ignore_ascii_case(model::VM_CLASS) && from.key_str("Name") == Some(vm);
        if !member {
            log::info!("cim: Failover of pairing {id}: FailoverFrom {from} is not its member");
            return Ok((FAILOVER_BAD_PARAMETER, Vec::new()));
        }
    }
    if role != "primary" {
        log::info!("cim: Failover of pairing {id}: this host is its {role}");
        return Ok((FAILOVER_NOT_PRIMARY, Vec::new()));
    }
    if set.get("RedundancyStatus").and_then(Value::as_u64) != Some(2) {
        log::info!("cim: Failover of pairing {id}: the pair is not fully redundant");
        return Ok((FAILOVER_NOT_REDUNDANT, Vec::new()));
    }
    match cimom.host.failover_migration(id) {
        Ok(_) => {
            log::info!("cim: planned failover of pairing {id} ({vm}) started");
            Ok((FAILOVER_STARTED, Vec::new()))
        }
        Err(ControlError::Conflict(why)) => {
            log::info!("cim: Failover of pairing {id} refused: {why}");
            Ok((FAILOVER_NOT_REDUNDANT, Vec::new()))
        }
        Err(ControlError::NotFound(_)) => Err(CimFault::new(
            CimStatus::NotFound,
            format!("no pairing {id} on this host"),
        )),
        Err(ControlError::BadRequest(why) | ControlError::Internal(why)) => {
            Err(CimFault::new(CimStatus::Failed, why))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lockstep_api::control::HostControl;
    use lockstep_api::migration::FtRedundancy;

    use super::*;
    use crate::fake_host::FakeHost;
    use crate::model::{redundancy_set, Snapshot};

    fn set(host: &FakeHost, id: &str) -> Instance {
        redundancy_set(&host.get_migration(id).unwrap()).unwrap()
    }

    fn from(vm: &str) -> Vec<(String, Param)> {
        vec![(
            "FailoverFrom".into(),
            Param::Value(model::vm_path(vm).into()),
        )]
    }

    #[test]
    fn failover_goes_to_the_primary_and_is_refused_elsewhere() {
        let host = Arc::new(FakeHost::with_vms(3));
        let primary = host.add_ft_pairing("vm000", "primary", "web");
        let secondary = host.add_ft_pairing("vm001", "secondary", "db");
        let degraded = host.add_ft_pairing("vm002", "primary", "old");
        host.set_ft_redundancy(&degraded, FtRedundancy::Degraded);
        let cimom = Cimom::new(host.clone(), "h".into(), None, Default::default()).unwrap();

        let rc = |id: &str, params: &[(String, Param)]| {
            failover(&cimom, &set(&host, id), Params(params)).unwrap().0
        };
        assert_eq!(rc(&secondary, &[]), FAILOVER_NOT_PRIMARY);
        assert_eq!(rc(&degraded, &[]), FAILOVER_NOT_REDUNDANT);
        assert_eq!(rc(&primary, &from("vm001")), FAILOVER_BAD_PARAMETER);
        let not_a_ref = [(
            "FailoverFrom".to_string(),
            Param::Value(Value::from("vm000")),
        )];
        assert_eq!(
            failover(&cimom, &set(&host, &primary), Params(&not_a_ref))
                .unwrap_err()
                .status,
            CimStatus::InvalidParameter
        );
        assert!(host.failovers().is_empty(), "refusals never reach the host");

        assert_eq!(rc(&primary, &from("vm000")), FAILOVER_STARTED);
        assert_eq!(host.failovers(), vec![primary.clone()]);
        let snap = Snapshot::new(&*cimom.host);
        let now = model::get(&cimom, &snap, &model::redundancy_set_path("web", &primary)).unwrap();
        assert_eq!(now.get("RedundancyStatus").and_then(Value::as_u64), Some(4));
        // Its copy has ended: no second failover.
        assert_eq!(rc(&primary, &[]), FAILOVER_NOT_REDUNDANT);
        assert_eq!(host.failovers().len(), 1);
    }
}
