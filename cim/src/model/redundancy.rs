//! Fault-tolerant pairs (issue #13) as CIM_RedundancySet: one `LKS_RedundancySet` per
//! pairing in the host's migration registry (an entry whose `ft` is set, either side), its
//! member on this host (`LKS_MemberOfCollection` to the VM) and its host
//! (`LKS_HostedCollection`). The other member, the pair's VM on the other host, is in that
//! host's endpoint.

use lockstep_api::migration::{FtRedundancy, FtStatus, MigrationInfo};

use super::systems::{host_path, vm_path};
use super::{keyed, keyed_at, Snapshot, CIMV2_NS};
use crate::cimom::Cimom;
use crate::value::{CimType, Instance, ObjectPath, Value};

/// The sets' class.
pub const REDUNDANCY_SET_CLASS: &str = "LKS_RedundancySet";
/// TypeOfSet Sparing (CIM_RedundancySet's ValueMap): both copies know of each other, the
/// secondary takes over only on failover.
pub const TYPE_OF_SET_SPARING: u16 = 4;

/// RedundancyStatus for a pairing's redundancy: 2 Fully Redundant, 3 Degraded Redundancy, 4
/// Redundancy Lost.
pub fn redundancy_status(r: FtRedundancy) -> u16 {
    match r {
        FtRedundancy::Full => 2,
        FtRedundancy::Degraded => 3,
        FtRedundancy::Lost => 4,
    }
}

/// The set's path for pair `pair` and migration `id`.
pub fn redundancy_set_path(pair: &str, id: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, REDUNDANCY_SET_CLASS).key("InstanceID", format!("LKS:ft:{pair}:{id}"))
}

/// A pairing's set, if `m` is one (its `ft` is set).
pub fn redundancy_set(m: &MigrationInfo) -> Option<Instance> {
    let ft: &FtStatus = m.ft.as_ref()?;
    let real = |x: f64| Value::Real(x, CimType::Real64);
    let other = if ft.role == "primary" {
        "secondary"
    } else {
        "primary"
    };
    Some(
        keyed_at(redundancy_set_path(&ft.pair, &m.id))
            .with("ElementName", ft.pair.clone())
            .with(
                "Description",
                format!(
                    "fault-tolerant pair {} of {}: this host is the {}; the {} copy is a \
                     member of the pair's set on the other host's endpoint",
                    ft.pair, m.vm, ft.role, other
                ),
            )
            .with("RedundancyStatus", redundancy_status(ft.redundancy))
            .with("TypeOfSet", Value::u16_array(&[TYPE_OF_SET_SPARING]))
            .with("MinNumberNeeded", 1u32)
            .with("MaxNumberSupported", 2u32)
            .with("VendorIdentifyingInfo", "lockstep fault-tolerant pair")
            // No Load Balancing: only the primary's copy runs.
            .with("LoadBalanceAlgorithm", 2u16)
            .with("PairID", ft.pair.clone())
            .with("MigrationID", m.id.clone())
            .with("Role", ft.role.clone())
            .with("SystemName", m.vm.clone())
            .with("Phase", m.phase.name())
            .with("Epoch", ft.epoch)
            .with_opt("CommittedEpoch", ft.committed_epoch)
            .with("ArbiterEpoch", ft.arbiter_epoch)
            .with("PauseMedian", real(ft.pause_p50_ms))
            .with("Pause99thPercentile", real(ft.pause_p99_ms))
            .with("ReplicationRate", real(ft.replication_mib_s)),
    )
}

pub(super) fn redundancy_sets(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    snap.migrations()
        .iter()
        .filter_map(redundancy_set)
        .collect()
}

/// Each set to its member here: the pairing's VM, while it is on this host.
pub(super) fn members(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    snap.migrations()
        .iter()
        .filter(|m| snap.vms().iter().any(|v| v.name == m.vm))
        .filter_map(|m| {
            let ft = m.ft.as_ref()?;
            Some(keyed(
                CIMV2_NS,
                "LKS_MemberOfCollection",
                vec![
                    ("Collection", redundancy_set_path(&ft.pair, &m.id).into()),
                    ("Member", vm_path(&m.vm).into()),
                ],
            ))
        })
        .collect()
}

/// The host to each set.
pub(super) fn hosted_collections(cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let host = host_path(cimom);
    snap.migrations()
        .iter()
        .filter_map(|m| {
            let ft = m.ft.as_ref()?;
            Some(keyed(
                CIMV2_NS,
                "LKS_HostedCollection",
                vec![
                    ("Antecedent", host.clone().into()),
                    ("Dependent", redundancy_set_path(&ft.pair, &m.id).into()),
                ],
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lockstep_api::control::HostControl;

    use super::*;
    use crate::fake_host::FakeHost;

    fn cimom(host: Arc<FakeHost>) -> Arc<Cimom> {
        Cimom::new(host, "h".into(), None, Default::default()).unwrap()
    }

    #[test]
    fn one_set_per_pairing_with_its_status_and_member() {
        let host = Arc::new(FakeHost::with_vms(2));
        host.start_vm("vm000").unwrap();
        let p = host.add_ft_pairing("vm000", "primary", "web");
        let s = host.add_ft_pairing("vm001", "secondary", "db");
        let cimom = cimom(host.clone());
        let snap = Snapshot::new(&*cimom.host);
        let sets = super::super::enumerate(&cimom, &snap, CIMV2_NS, "CIM_RedundancySet");
        assert_eq!(
            sets.len(),
            2,
            "one set per pairing, not per migration: {sets:?}"
        );
        let web = &sets[0];
        assert_eq!(web.path, Some(redundancy_set_path("web", &p)));
        assert_eq!(web.get_str("InstanceID"), Some(&*format!("LKS:ft:web:{p}")));
        assert_eq!(web.get_str("ElementName"), Some("web"));
        assert_eq!(web.get_str("Role"), Some("primary"));
        assert_eq!(web.get("RedundancyStatus").and_then(Value::as_u64), Some(2));
        assert_eq!(web.get("TypeOfSet"), Some(&Value::u16_array(&[4])));
        assert_eq!(web.get("MinNumberNeeded").and_then(Value::as_u64), Some(1));
        assert_eq!(
            web.get("MaxNumberSupported").and_then(Value::as_u64),
            Some(2)
        );
        assert_eq!(sets[1].get_str("Role"), Some("secondary"));
        assert_eq!(sets[1].get_str("MigrationID"), Some(&*s));

        for (r, code) in [(FtRedundancy::Degraded, 3), (FtRedundancy::Lost, 4)] {
            host.set_ft_redundancy(&p, r);
            let snap = Snapshot::new(&*cimom.host);
            let web = super::super::get(&cimom, &snap, &redundancy_set_path("web", &p)).unwrap();
            assert_eq!(
                web.get("RedundancyStatus").and_then(Value::as_u64),
                Some(code)
            );
        }

        let snap = Snapshot::new(&*cimom.host);
        let members = super::super::instances_of(&cimom, &snap, CIMV2_NS, "LKS_MemberOfCollection");
        assert_eq!(members.len(), 2);
        assert_eq!(
            members[0].get("Member"),
            Some(&Value::Ref(Box::new(vm_path("vm000"))))
        );
        assert_eq!(
            members[0].get("Collection"),
            Some(&Value::Ref(Box::new(redundancy_set_path("web", &p))))
        );
        let hosted = super::super::instances_of(&cimom, &snap, CIMV2_NS, "LKS_HostedCollection");
        assert_eq!(hosted.len(), 2);

        // A VM no longer on this host has no member link; its set stays.
        host.delete_vm("vm001").unwrap();
        let snap = Snapshot::new(&*cimom.host);
        let members = super::super::instances_of(&cimom, &snap, CIMV2_NS, "LKS_MemberOfCollection");
        assert_eq!(members.len(), 1);
        assert_eq!(
            super::super::enumerate(&cimom, &snap, CIMV2_NS, "CIM_RedundancySet").len(),
            2
        );
    }

    #[test]
    fn the_set_and_its_vm_are_associated_both_ways() {
        let host = Arc::new(FakeHost::with_vms(1));
        let p = host.add_ft_pairing("vm000", "primary", "web");
        let cimom = cimom(host);
        let snap = Snapshot::new(&*cimom.host);
        let filters = crate::assoc::Filters {
            assoc_class: Some("CIM_MemberOfCollection"),
            ..Default::default()
        };
        let from_set = crate::assoc::associator_paths(
            &cimom,
            &snap,
            CIMV2_NS,
            &redundancy_set_path("web", &p),
            &filters,
        )
        .unwrap();
        assert_eq!(from_set, vec![vm_path("vm000")]);
        let from_vm =
            crate::assoc::associator_paths(&cimom, &snap, CIMV2_NS, &vm_path("vm000"), &filters)
                .unwrap();
        assert_eq!(from_vm, vec![redundancy_set_path("web", &p)]);
    }
}
