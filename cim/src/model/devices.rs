//! A VM's logical devices (DSP1022 CPU, DSP1026 memory, disks, Ethernet ports) with their
//! counters, and the host's primordial resource pools they are allocated from (DSP1041).

use super::systems::{host_path, vm_path};
use super::{keyed, keyed_at, Snapshot, CIMV2_NS, VM_CLASS};
use crate::cimom::Cimom;
use crate::value::{Instance, ObjectPath, Value};

fn device_path(class: &'static str, vm: &str, id: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, class)
        .key("CreationClassName", class)
        .key("DeviceID", id)
        .key("SystemCreationClassName", VM_CLASS)
        .key("SystemName", vm)
}

fn device(class: &'static str, vm: &str, id: &str, enabled: u16) -> Instance {
    keyed_at(device_path(class, vm, id))
        .with("EnabledState", enabled)
        .with("HealthState", 5u16)
        .with("OperationalStatus", Value::u16_array(&[2]))
}

fn vm_enabled(snap: &Snapshot<'_>, vm: &str) -> u16 {
    snap.vms()
        .iter()
        .find(|v| v.name == vm)
        .map(|v| super::enabled_state(v.state).0)
        .unwrap_or(3)
}

/// The counters of a VM's device of `kind` and `id`.
fn counter(snap: &Snapshot<'_>, vm: &str, kind: &str, id: &str, name: &str) -> u64 {
    snap.metrics(vm)
        .and_then(|m| {
            m.devices
                .iter()
                .find(|d| d.kind == kind && d.id.as_deref() == Some(id))
        })
        .and_then(|d| d.counters.get(name).copied())
        .unwrap_or(0)
}

pub(super) fn processors(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let mut out = Vec::new();
    for vm in snap.vms() {
        let enabled = super::enabled_state(vm.state).0;
        for i in 0..vm.vcpus {
            out.push(
                device("LKS_Processor", &vm.name, &format!("cpu{i}"), enabled)
                    .with("ElementName", format!("vCPU {i}"))
                    .with("Family", 2u16)
                    .with("CPUStatus", if enabled == 2 { 1u16 } else { 2u16 })
                    .with("Role", "Central Processor"),
            );
        }
    }
    out
}

pub(super) fn memories(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    snap.vms()
        .iter()
        .map(|vm| {
            device(
                "LKS_Memory",
                &vm.name,
                "memory",
                super::enabled_state(vm.state).0,
            )
            .with(
                "ElementName",
                format!("{} MiB guest memory", vm.mem_size_mib),
            )
            .with("Volatile", true)
            .with("BlockSize", 4096u64)
            .with("NumberOfBlocks", vm.mem_size_mib * 256)
            .with("ConsumableBlocks", vm.mem_size_mib * 256)
        })
        .collect()
}

pub(super) fn disks(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let mut out = Vec::new();
    for d in snap.details() {
        let vm = d.info.name.as_str();
        let enabled = vm_enabled(snap, vm);
        for drive in &d.config.drives {
            let id = drive.drive_id.as_str();
            let blocks = std::fs::metadata(&drive.path_on_host)
                .map(|m| m.len() / 512)
                .ok();
            out.push(
                device("LKS_LogicalDisk", vm, id, enabled)
                    .with("ElementName", id)
                    .with("Name", drive.path_on_host.display().to_string())
                    .with("BlockSize", 512u64)
                    .with_opt("NumberOfBlocks", blocks)
                    .with("Access", if drive.is_read_only { 1u16 } else { 3u16 })
                    .with("ReadRequests", counter(snap, vm, "block", id, "reads"))
                    .with("WriteRequests", counter(snap, vm, "block", id, "writes"))
                    .with("BytesRead", counter(snap, vm, "block", id, "bytes_read"))
                    .with(
                        "BytesWritten",
                        counter(snap, vm, "block", id, "bytes_written"),
                    ),
            );
        }
    }
    out
}

pub(super) fn ethernet_ports(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let mut out = Vec::new();
    for d in snap.details() {
        let vm = d.info.name.as_str();
        let enabled = vm_enabled(snap, vm);
        for nic in &d.config.network_interfaces {
            let id = nic.iface_id.as_str();
            out.push(
                device("LKS_EthernetPort", vm, id, enabled)
                    .with("ElementName", id)
                    .with("Name", nic.host_dev_name.as_str())
                    .with_opt("PermanentAddress", nic.mac().map(super::settings::mac_text))
                    .with("LinkTechnology", 2u16)
                    .with("PortType", 0u16)
                    .with("PacketsReceived", counter(snap, vm, "net", id, "rx_frames"))
                    .with(
                        "PacketsTransmitted",
                        counter(snap, vm, "net", id, "tx_frames"),
                    )
                    .with("BytesReceived", counter(snap, vm, "net", id, "rx_bytes"))
                    .with("BytesTransmitted", counter(snap, vm, "net", id, "tx_bytes")),
            );
        }
    }
    out
}

/// A device of a VM: (vm, class, device id, pool id).
type DeviceRow = (String, &'static str, String, &'static str);

/// Every device of every VM.
fn all_devices(snap: &Snapshot<'_>) -> Vec<DeviceRow> {
    let mut out = vm_devices(snap);
    out.extend(config_devices(snap));
    out
}

/// The processors and memory of every VM: from the VM list alone.
fn vm_devices(snap: &Snapshot<'_>) -> Vec<DeviceRow> {
    let mut out = Vec::new();
    for vm in snap.vms() {
        for i in 0..vm.vcpus {
            out.push((
                vm.name.clone(),
                "LKS_Processor",
                format!("cpu{i}"),
                "processor",
            ));
        }
        out.push((
            vm.name.clone(),
            "LKS_Memory",
            "memory".to_string(),
            "memory",
        ));
    }
    out
}

/// The disks and NICs of every VM: these need each VM's config.
fn config_devices(snap: &Snapshot<'_>) -> Vec<DeviceRow> {
    let mut out = Vec::new();
    for d in snap.details() {
        for drive in &d.config.drives {
            out.push((
                d.info.name.clone(),
                "LKS_LogicalDisk",
                drive.drive_id.clone(),
                "storage",
            ));
        }
        for nic in &d.config.network_interfaces {
            out.push((
                d.info.name.clone(),
                "LKS_EthernetPort",
                nic.iface_id.clone(),
                "ethernet",
            ));
        }
    }
    out
}

pub(super) fn system_devices(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    all_devices(snap)
        .into_iter()
        .map(|(vm, class, id, _)| {
            keyed(
                CIMV2_NS,
                "LKS_SystemDevice",
                vec![
                    ("GroupComponent", vm_path(&vm).into()),
                    ("PartComponent", device_path(class, &vm, &id).into()),
                ],
            )
        })
        .collect()
}

/// The pools: id suffix, ResourceType, allocation units.
pub(super) const POOLS: [(&str, u16, &str); 4] = [
    ("processor", 3, "count"),
    ("memory", 4, "byte*2^20"),
    ("storage", 31, "count"),
    ("ethernet", 10, "count"),
];

pub(super) fn pool_path(kind: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_ResourcePool").key("InstanceID", format!("LKS:pool:{kind}"))
}

pub(super) fn pools(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let info = snap.info();
    let vcpus: u64 = snap.vms().iter().map(|v| u64::from(v.vcpus)).sum();
    let mem: u64 = snap.vms().iter().map(|v| v.mem_size_mib).sum();
    POOLS
        .iter()
        .map(|&(kind, rt, units)| {
            let (capacity, reserved) = match kind {
                "processor" => (Some(u64::from(info.cpus)), Some(vcpus)),
                "memory" => (Some(info.mem_mib), Some(mem)),
                _ => (None, None),
            };
            keyed_at(pool_path(kind))
                .with("ElementName", format!("host {kind} pool"))
                .with("PoolID", format!("LKS:pool:{kind}"))
                .with("Primordial", true)
                .with("ResourceType", rt)
                .with("AllocationUnits", units)
                .with_opt("Capacity", capacity)
                .with_opt("Reserved", reserved)
                .with("HealthState", 5u16)
                .with("OperationalStatus", Value::u16_array(&[2]))
        })
        .collect()
}

pub(super) fn hosted_pools(cimom: &Cimom, _snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    POOLS
        .iter()
        .map(|(kind, _, _)| {
            keyed(
                CIMV2_NS,
                "LKS_HostedResourcePool",
                vec![
                    ("GroupComponent", host_path(cimom).into()),
                    ("PartComponent", pool_path(kind).into()),
                ],
            )
        })
        .collect()
}

pub(super) fn allocated_from_pool(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    all_devices(snap)
        .into_iter()
        .map(|(vm, class, id, pool)| {
            keyed(
                CIMV2_NS,
                "LKS_ElementAllocatedFromPool",
                vec![
                    ("Antecedent", pool_path(pool).into()),
                    ("Dependent", device_path(class, &vm, &id).into()),
                ],
            )
        })
        .collect()
}

/// The paths of every processor or memory device (`class`), for profile conformance. Only
/// the VM list is read, so the answer stays cacheable.
pub(super) fn device_paths(snap: &Snapshot<'_>, class: &str) -> Vec<ObjectPath> {
    vm_devices(snap)
        .into_iter()
        .filter(|(_, c, _, _)| *c == class)
        .map(|(vm, c, id, _)| device_path(c, &vm, &id))
        .collect()
}
