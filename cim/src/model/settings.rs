//! A VM's settings (DSP1057 virtual system settings, DSP1041 resource allocation settings for
//! processor, memory, disk and Ethernet port) built from its `VmConfig`, and the way back: a
//! config from the embedded VSSD and RASD instances a client passes to DefineSystem and
//! ModifyResourceSettings.

use std::path::PathBuf;

use lockstep_api::{DriveConfig, NetConfig, VmConfig};

use super::systems::vm_path;
use super::{keyed, keyed_at, Snapshot, CIMV2_NS};
use crate::cimom::Cimom;
use crate::error::{CimFault, CimResult, CimStatus};
use crate::value::{Instance, ObjectPath, Value};

/// ResourceType values (CIM_ResourceAllocationSettingData, DSP1041 and its specialisations).
const RT_PROCESSOR: u16 = 3;
const RT_MEMORY: u16 = 4;
const RT_ETHERNET_ADAPTER: u16 = 10;
const RT_DISK_DRIVE: u16 = 17;
const RT_STORAGE_EXTENT: u16 = 19;
const RT_LOGICAL_DISK: u16 = 31;
const RT_ETHERNET_CONNECTION: u16 = 33;

fn vssd_path(vm: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_VirtualSystemSettingData").key("InstanceID", format!("LKS:{vm}"))
}

/// The path of a VM's processor RASD.
pub(crate) fn processor_rasd_path(vm: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_ProcessorAllocationSettingData")
        .key("InstanceID", format!("LKS:{vm}:processor"))
}

/// The path of a VM's memory RASD.
pub(crate) fn memory_rasd_path(vm: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_MemoryAllocationSettingData")
        .key("InstanceID", format!("LKS:{vm}:memory"))
}

/// The path of the RASD of a VM's disk `drive_id`.
pub(crate) fn disk_rasd_path(vm: &str, drive_id: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_StorageAllocationSettingData")
        .key("InstanceID", format!("LKS:{vm}:disk:{drive_id}"))
}

/// The path of the RASD of a VM's network interface `iface_id`.
pub(crate) fn nic_rasd_path(vm: &str, iface_id: &str) -> ObjectPath {
    ObjectPath::new(CIMV2_NS, "LKS_EthernetPortAllocationSettingData")
        .key("InstanceID", format!("LKS:{vm}:nic:{iface_id}"))
}

pub(super) fn system_settings(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    snap.details()
        .iter()
        .map(|d| {
            let c = &d.config;
            keyed_at(vssd_path(&d.info.name))
                .with("ElementName", d.info.name.as_str())
                .with("VirtualSystemIdentifier", d.info.name.as_str())
                .with("VirtualSystemType", "lockstep-microvm")
                .with(
                    "KernelImagePath",
                    c.boot_source.kernel_image_path.display().to_string(),
                )
                .with_opt("KernelCommandLine", c.boot_source.boot_args.as_deref())
                .with_opt(
                    "InitrdPath",
                    c.boot_source
                        .initrd_path
                        .as_ref()
                        .map(|p| p.display().to_string()),
                )
                .with_opt(
                    "LogDataRoot",
                    d.info.serial_log.as_ref().map(|p| p.display().to_string()),
                )
        })
        .collect()
}

/// An association of class `class` between a VM and its virtual system settings.
fn vm_to_settings(class: &'static str, vm: &str) -> Instance {
    keyed(
        CIMV2_NS,
        class,
        vec![
            ("ManagedElement", vm_path(vm).into()),
            ("SettingData", vssd_path(vm).into()),
        ],
    )
}

pub(super) fn settings_define_state(
    _cimom: &Cimom,
    snap: &Snapshot<'_>,
    _ns: &str,
) -> Vec<Instance> {
    snap.vms()
        .iter()
        .map(|vm| vm_to_settings("LKS_SettingsDefineState", &vm.name))
        .collect()
}

pub(super) fn element_setting_data(cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let mut out: Vec<Instance> = snap
        .vms()
        .iter()
        .map(|vm| {
            vm_to_settings("LKS_ElementSettingData", &vm.name)
                .with("IsDefault", 1u16)
                .with("IsCurrent", 1u16)
        })
        .collect();
    out.push(super::migration::migration_element_settings(cimom));
    out
}

fn rasd_base(path: ObjectPath, rt: u16, vm: &str) -> Instance {
    keyed_at(path)
        .with("ResourceType", rt)
        .with("ConsumerVisibility", 3u16)
        .with("AutomaticAllocation", true)
        .with("AutomaticDeallocation", true)
        .with("Parent", vssd_path(vm).to_string())
}

pub(super) fn processor_rasds(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    snap.vms()
        .iter()
        .map(|vm| {
            rasd_base(processor_rasd_path(&vm.name), RT_PROCESSOR, &vm.name)
                .with("ElementName", format!("{} virtual CPUs", vm.vcpus))
                .with("PoolID", "LKS:pool:processor")
                .with("AllocationUnits", "count")
                .with("VirtualQuantity", u64::from(vm.vcpus))
                .with("VirtualQuantityUnits", "count")
                .with("Reservation", u64::from(vm.vcpus))
                .with("Limit", u64::from(vm.vcpus))
        })
        .collect()
}

pub(super) fn memory_rasds(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    snap.vms()
        .iter()
        .map(|vm| {
            rasd_base(memory_rasd_path(&vm.name), RT_MEMORY, &vm.name)
                .with("ElementName", format!("{} MiB of memory", vm.mem_size_mib))
                .with("PoolID", "LKS:pool:memory")
                .with("AllocationUnits", "byte*2^20")
                .with("VirtualQuantity", vm.mem_size_mib)
                .with("VirtualQuantityUnits", "byte*2^20")
                .with("Reservation", vm.mem_size_mib)
                .with("Limit", vm.mem_size_mib)
        })
        .collect()
}

pub(super) fn storage_rasds(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let mut out = Vec::new();
    for d in snap.details() {
        for (i, drive) in d.config.drives.iter().enumerate() {
            let size = std::fs::metadata(&drive.path_on_host).map(|m| m.len()).ok();
            out.push(
                rasd_base(
                    disk_rasd_path(&d.info.name, &drive.drive_id),
                    RT_LOGICAL_DISK,
                    &d.info.name,
                )
                .with("ElementName", drive.drive_id.as_str())
                .with("ResourceSubType", "virtio-blk")
                .with("PoolID", "LKS:pool:storage")
                .with(
                    "HostResource",
                    Value::str_array(&[drive.path_on_host.display().to_string()]),
                )
                .with("AddressOnParent", i.to_string())
                .with("Access", if drive.is_read_only { 1u16 } else { 3u16 })
                .with("VirtualResourceBlockSize", 512u64)
                .with("HostResourceBlockSize", 512u64)
                .with_opt("VirtualQuantity", size.map(|s| s.div_ceil(512)))
                .with("VirtualQuantityUnits", "count(fixed size block)"),
            );
        }
    }
    out
}

pub(super) fn ethernet_rasds(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let mut out = Vec::new();
    for d in snap.details() {
        for (i, nic) in d.config.network_interfaces.iter().enumerate() {
            out.push(
                rasd_base(
                    nic_rasd_path(&d.info.name, &nic.iface_id),
                    RT_ETHERNET_ADAPTER,
                    &d.info.name,
                )
                .with("ElementName", nic.iface_id.as_str())
                .with("ResourceSubType", "virtio-net")
                .with("PoolID", "LKS:pool:ethernet")
                .with(
                    "Connection",
                    Value::str_array(&[nic.host_dev_name.as_str()]),
                )
                .with_opt("Address", nic.mac().map(mac_text))
                .with("AddressOnParent", i.to_string())
                .with("VirtualQuantity", 1u64)
                .with("VirtualQuantityUnits", "count"),
            );
        }
    }
    out
}

/// A MAC as DSP1050's Address: twelve hex digits.
pub(super) fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02X}")).collect()
}

pub(super) fn settings_components(_cimom: &Cimom, snap: &Snapshot<'_>, _ns: &str) -> Vec<Instance> {
    let mut out = Vec::new();
    let mut link = |vm: &str, part: ObjectPath| {
        out.push(keyed(
            CIMV2_NS,
            "LKS_VirtualSystemSettingDataComponent",
            vec![
                ("GroupComponent", vssd_path(vm).into()),
                ("PartComponent", part.into()),
            ],
        ));
    };
    for d in snap.details() {
        let vm = d.info.name.as_str();
        link(vm, processor_rasd_path(vm));
        link(vm, memory_rasd_path(vm));
        for drive in &d.config.drives {
            link(vm, disk_rasd_path(vm, &drive.drive_id));
        }
        for nic in &d.config.network_interfaces {
            link(vm, nic_rasd_path(vm, &nic.iface_id));
        }
    }
    out
}

fn param_err(msg: impl Into<String>) -> CimFault {
    CimFault::new(CimStatus::InvalidParameter, msg)
}

fn string_prop(inst: &Instance, name: &str) -> Option<String> {
    match inst.get(name)? {
        Value::Str(s) if !s.is_empty() => Some(s.to_string()),
        Value::Array(_, items) => items.first().and_then(|v| v.as_str()).map(str::to_string),
        _ => None,
    }
}

fn u64_prop(inst: &Instance, name: &str) -> CimResult<Option<u64>> {
    match inst.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| param_err(format!("{}.{name} is not a number", inst.class))),
    }
}

/// Memory in MiB from VirtualQuantity and AllocationUnits (default MiB).
fn memory_mib(rasd: &Instance) -> CimResult<Option<u64>> {
    let Some(q) = u64_prop(rasd, "VirtualQuantity")? else {
        return Ok(None);
    };
    let units = string_prop(rasd, "AllocationUnits")
        .or_else(|| string_prop(rasd, "VirtualQuantityUnits"))
        .unwrap_or_else(|| "byte*2^20".into())
        .replace(' ', "")
        .to_ascii_lowercase();
    let mib = match units.as_str() {
        "byte*2^20" | "megabytes" | "mb" | "mib" => q,
        "byte*2^30" | "gigabytes" | "gb" | "gib" => q.saturating_mul(1024),
        "byte*2^10" | "kilobytes" | "kb" | "kib" => q / 1024,
        "byte" | "bytes" => q >> 20,
        other => {
            return Err(param_err(format!(
                "memory AllocationUnits {other:?} is not understood; use byte*2^20"
            )))
        }
    };
    Ok(Some(mib))
}

/// What a RASD asks for.
#[derive(Debug)]
pub enum ConfigChange {
    /// vCPU count.
    Vcpus(u32),
    /// Memory, MiB.
    MemoryMib(u64),
    /// Add or replace the drive with this id.
    Drive(DriveConfig),
    /// Add or replace the interface with this id.
    Nic(NetConfig),
}

/// Which VM a RASD's InstanceID (`LKS:<vm>:<kind>[:<id>]`) names, and the device id in it.
fn parse_rasd_id(id: &str) -> Option<(&str, &str, Option<&str>)> {
    let rest = id.strip_prefix("LKS:")?;
    let mut parts = rest.splitn(3, ':');
    let vm = parts.next()?;
    let kind = parts.next()?;
    Some((vm, kind, parts.next()))
}

/// Reads one RASD into a change; `index` numbers devices without an ElementName.
pub fn rasd_to_config_change(
    rasd: &Instance,
    index: usize,
) -> CimResult<(Option<String>, ConfigChange)> {
    let id = string_prop(rasd, "InstanceID");
    let parsed = id.as_deref().and_then(parse_rasd_id);
    let vm = parsed.map(|(vm, _, _)| vm.to_string());
    let id_device = parsed.and_then(|(_, _, dev)| dev.map(str::to_string));
    let rt = match u64_prop(rasd, "ResourceType")? {
        Some(rt) => u16::try_from(rt).map_err(|_| param_err("ResourceType out of range"))?,
        None => match parsed.map(|(_, kind, _)| kind) {
            Some("processor") => RT_PROCESSOR,
            Some("memory") => RT_MEMORY,
            Some("disk") => RT_LOGICAL_DISK,
            Some("nic") => RT_ETHERNET_ADAPTER,
            _ => return Err(param_err(format!("{} has no ResourceType", rasd.class))),
        },
    };
    let change = match rt {
        RT_PROCESSOR => {
            let n = u64_prop(rasd, "VirtualQuantity")?
                .ok_or_else(|| param_err("a processor RASD needs VirtualQuantity (the vCPU count)"))?;
            ConfigChange::Vcpus(u32::try_from(n).map_err(|_| param_err("VirtualQuantity out of range"))?)
        }
        RT_MEMORY => ConfigChange::MemoryMib(
            memory_mib(rasd)?.ok_or_else(|| param_err("a memory RASD needs VirtualQuantity"))?,
        ),
        RT_LOGICAL_DISK | RT_DISK_DRIVE | RT_STORAGE_EXTENT => {
            let path = string_prop(rasd, "HostResource")
                .ok_or_else(|| param_err("a disk RASD needs HostResource (the image file on the host)"))?;
            let path = path.strip_prefix("file://").unwrap_or(&path).to_string();
            let drive_id = id_device
                .or_else(|| string_prop(rasd, "ElementName"))
                .unwrap_or_else(|| format!("disk{index}"));
            let access = u64_prop(rasd, "Access")?;
            // Built through serde so that fields added to the config later take their defaults.
            let drive: DriveConfig = serde_json::from_value(serde_json::json!({
                "drive_id": drive_id,
                "path_on_host": path,
                "is_root_device": false,
                "is_read_only": access == Some(1),
            }))
            .map_err(|e| param_err(format!("disk RASD: {e}")))?;
            ConfigChange::Drive(drive)
        }
        RT_ETHERNET_ADAPTER | RT_ETHERNET_CONNECTION => {
            let host_dev_name = string_prop(rasd, "Connection")
                .ok_or_else(|| param_err("an Ethernet port RASD needs Connection (the host tap device)"))?;
            let iface_id = id_device
                .or_else(|| string_prop(rasd, "ElementName"))
                .unwrap_or_else(|| format!("eth{index}"));
            let guest_mac = string_prop(rasd, "Address").map(|a| normalise_mac(&a));
            let nic: NetConfig = serde_json::from_value(serde_json::json!({
                "iface_id": iface_id,
                "host_dev_name": host_dev_name,
                "guest_mac": guest_mac,
            }))
            .map_err(|e| param_err(format!("Ethernet port RASD: {e}")))?;
            ConfigChange::Nic(nic)
        }
        other => {
            return Err(CimFault::new(
                CimStatus::NotSupported,
                format!("ResourceType {other} is not supported: use 3 (processor), 4 (memory), 31 (disk) or 10 (Ethernet port)"),
            ))
        }
    };
    Ok((vm, change))
}

/// `AABBCCDDEEFF` or `aa-bb-...` to `aa:bb:cc:dd:ee:ff`; anything else is passed on for the
/// config check to refuse.
fn normalise_mac(text: &str) -> String {
    let hex: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if hex.len() == 12 && text.len() <= 17 {
        let pairs: Vec<&str> = (0..6).map(|i| &hex[i * 2..i * 2 + 2]).collect();
        return pairs.join(":").to_ascii_lowercase();
    }
    text.to_string()
}

/// Applies a change to a config.
pub fn apply_change(config: &mut VmConfig, change: ConfigChange) {
    match change {
        ConfigChange::Vcpus(n) => config.machine_config.vcpu_count = n,
        ConfigChange::MemoryMib(m) => config.machine_config.mem_size_mib = m,
        ConfigChange::Drive(mut d) => {
            match config.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                Some(slot) => {
                    d.is_root_device = slot.is_root_device;
                    *slot = d;
                }
                None => {
                    d.is_root_device = config.drives.is_empty();
                    config.drives.push(d);
                }
            }
        }
        ConfigChange::Nic(n) => match config
            .network_interfaces
            .iter_mut()
            .find(|o| o.iface_id == n.iface_id)
        {
            Some(slot) => *slot = n,
            None => config.network_interfaces.push(n),
        },
    }
}

/// A new VM's config from DefineSystem's embedded VSSD and RASDs, on top of `base` (a reference
/// configuration) when given.
pub fn config_from_embedded(
    vssd: &Instance,
    rasds: &[Instance],
    base: Option<VmConfig>,
) -> CimResult<VmConfig> {
    let name = string_prop(vssd, "ElementName")
        .or_else(|| string_prop(vssd, "VirtualSystemIdentifier"))
        .ok_or_else(|| param_err("SystemSettings needs ElementName (the new VM's name)"))?;
    let kernel = string_prop(vssd, "KernelImagePath");
    let mut config = match base {
        Some(b) => b,
        None => {
            let kernel = kernel.clone().ok_or_else(|| {
                param_err("SystemSettings needs KernelImagePath (LKS_VirtualSystemSettingData)")
            })?;
            serde_json::from_value(
                serde_json::json!({"boot-source": {"kernel_image_path": kernel}}),
            )
            .map_err(|e| param_err(format!("SystemSettings: {e}")))?
        }
    };
    config.name = Some(name);
    if let Some(k) = kernel {
        config.boot_source.kernel_image_path = PathBuf::from(k);
    }
    if let Some(args) = string_prop(vssd, "KernelCommandLine") {
        config.boot_source.boot_args = Some(args);
    }
    if let Some(initrd) = string_prop(vssd, "InitrdPath") {
        config.boot_source.initrd_path = Some(PathBuf::from(initrd));
    }
    for (i, rasd) in rasds.iter().enumerate() {
        let (_, change) = rasd_to_config_change(rasd, i)?;
        apply_change(&mut config, change);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn define_from_embedded_instances() {
        let vssd = Instance::new("LKS_VirtualSystemSettingData")
            .with("ElementName", "web")
            .with("KernelImagePath", "/k");
        let rasds = vec![
            Instance::new("CIM_ResourceAllocationSettingData")
                .with("ResourceType", 3u16)
                .with("VirtualQuantity", 2u64),
            Instance::new("CIM_ResourceAllocationSettingData")
                .with("ResourceType", 4u16)
                .with("VirtualQuantity", 1u64)
                .with("AllocationUnits", "byte*2^30"),
            Instance::new("CIM_StorageAllocationSettingData")
                .with("ResourceType", 31u16)
                .with("HostResource", Value::str_array(&["/img"]))
                .with("Access", 1u16),
            Instance::new("CIM_EthernetPortAllocationSettingData")
                .with("ResourceType", 10u16)
                .with("Connection", Value::str_array(&["tap0"]))
                .with("Address", "0600AC100002"),
        ];
        let c = config_from_embedded(&vssd, &rasds, None).unwrap();
        assert_eq!(c.name.as_deref(), Some("web"));
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.machine_config.mem_size_mib, 1024);
        assert_eq!(c.drives[0].drive_id, "disk2");
        assert!(c.drives[0].is_root_device && c.drives[0].is_read_only);
        assert_eq!(
            c.network_interfaces[0].guest_mac.as_deref(),
            Some("06:00:ac:10:00:02")
        );
        let bad = Instance::new("X").with("ResourceType", 99u16);
        assert_eq!(
            rasd_to_config_change(&bad, 0).unwrap_err().status,
            CimStatus::NotSupported
        );
    }

    #[test]
    fn rasd_ids_name_vm_and_device() {
        let r = Instance::new("LKS_StorageAllocationSettingData")
            .with("InstanceID", "LKS:vm1:disk:data")
            .with("HostResource", Value::str_array(&["/x"]));
        let (vm, change) = rasd_to_config_change(&r, 0).unwrap();
        assert_eq!(vm.as_deref(), Some("vm1"));
        assert!(matches!(change, ConfigChange::Drive(d) if d.drive_id == "data"));
    }
}
