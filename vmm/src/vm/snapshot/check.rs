//! Checks of a decoded snapshot against its own config and this host, before anything is mapped
//! or built: a state file with valid checksums may still be hostile, and every length, count,
//! region and guest address in it is checked here with overflow-checked arithmetic. Each
//! problem names the part of the snapshot it is in.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use lockstep_api::{HostLimits, VmConfig};
use lockstep_devices::virtio::{DeviceBaseState, SavedQueue};

use super::MachineSnapshot;
use crate::device_state::{DeviceKindState, VirtioDeviceState};
use crate::memory::ram_ranges;

/// Bytes the UART's receive FIFO holds (vm-superio's FIFO_SIZE).
const SERIAL_FIFO: usize = 64;
/// Bytes the keyboard controller queues for the guest.
const I8042_PENDING: usize = 64;
/// The largest virtqueue the virtio spec allows.
const MAX_QUEUE_SIZE: u16 = 32768;
/// More queues than any of our devices has.
const MAX_QUEUES: usize = 8;
/// virtio status bit: the driver is ready.
const DRIVER_OK: u32 = 4;
/// Interrupt status bits a virtio-mmio device can raise (used ring, config change).
const INTERRUPT_BITS: u32 = 0b11;
/// Shortest and longest frame a network interface can hold back (header included).
const NET_FRAME_LEN: std::ops::RangeInclusive<usize> =
    lockstep_devices::virtio::net::VNET_HDR_LEN..=lockstep_devices::virtio::net::MAX_FRAME_LEN;

/// Checks every part of `snapshot` against its config and `limits`; the error names the part.
pub(super) fn check_machine(snapshot: &MachineSnapshot, limits: &HostLimits) -> Result<(), String> {
    let config = &snapshot.config;
    check_memory(config, &snapshot.regions, limits)?;
    check_vcpus(snapshot, limits)?;
    check_vm_state(snapshot)?;
    check_devices(snapshot)
}

/// The regions must be exactly those a fresh VM of this config gets, and the config's memory
/// must fit this host.
fn check_memory(
    config: &VmConfig,
    regions: &[(u64, u64)],
    limits: &HostLimits,
) -> Result<(), String> {
    let mib = config.machine_config.mem_size_mib;
    if mib == 0 || mib > limits.mem_mib {
        return Err(format!(
            "memory: the config asks for {mib} MiB; this host has {} MiB",
            limits.mem_mib
        ));
    }
    let bytes = mib
        .checked_mul(1 << 20)
        .ok_or_else(|| format!("memory: {mib} MiB overflows"))?;
    let expected: Vec<(u64, u64)> = ram_ranges(bytes)
        .into_iter()
        .map(|(base, len)| (base.0, len))
        .collect();
    if regions != expected.as_slice() {
        return Err(format!(
            "memory regions: {} listed ({}), a VM of {mib} MiB has {} ({})",
            regions.len(),
            describe_regions(regions),
            expected.len(),
            describe_regions(&expected)
        ));
    }
    Ok(())
}

fn describe_regions(regions: &[(u64, u64)]) -> String {
    regions
        .iter()
        .take(4)
        .map(|(base, len)| format!("{base:#x}+{len:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Total bytes of `regions`, or None if the sum or any region's end overflows.
pub(super) fn regions_total(regions: &[(u64, u64)]) -> Option<u64> {
    regions.iter().try_fold(0u64, |sum, &(base, len)| {
        base.checked_add(len)?;
        sum.checked_add(len)
    })
}

fn check_vcpus(snapshot: &MachineSnapshot, limits: &HostLimits) -> Result<(), String> {
    let wanted = snapshot.config.machine_config.vcpu_count;
    let saved = snapshot.vcpus.len();
    if wanted == 0 || wanted > limits.max_vcpus {
        return Err(format!(
            "vCPUs: the config asks for {wanted}; this host allows 1 to {}",
            limits.max_vcpus
        ));
    }
    if u32::try_from(saved).ok() != Some(wanted) {
        return Err(format!("vCPUs: {saved} saved, the config has {wanted}"));
    }
    for (i, vcpu) in snapshot.vcpus.iter().enumerate() {
        if usize::try_from(vcpu.index).ok() != Some(i) {
            return Err(format!("vCPU {i}: saved as vCPU {}", vcpu.index));
        }
        if vcpu.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(format!(
                "vCPU {i}: {} CPUID entries, KVM takes at most {KVM_MAX_CPUID_ENTRIES}",
                vcpu.cpuid.len()
            ));
        }
        if vcpu.msrs.len() > KVM_MAX_MSR_ENTRIES {
            return Err(format!(
                "vCPU {i}: {} MSRs, KVM takes at most {KVM_MAX_MSR_ENTRIES}",
                vcpu.msrs.len()
            ));
        }
    }
    Ok(())
}

fn check_vm_state(snapshot: &MachineSnapshot) -> Result<(), String> {
    let vm = &snapshot.vm;
    for (what, chip, id) in [
        ("master PIC", &vm.pic_master, KVM_IRQCHIP_PIC_MASTER),
        ("slave PIC", &vm.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        ("IOAPIC", &vm.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(format!(
                "irqchip: the {what} is saved as chip {}",
                chip.chip_id
            ));
        }
    }
    Ok(())
}

/// One virtio device the config builds, in slot order.
#[derive(Debug, PartialEq, Eq)]
enum Expected<'a> {
    Block(&'a str),
    Net(&'a str),
    Vsock,
    Rng,
}

/// The virtio devices a VM of `config` gets, in the order `attach_virtio_devices` adds them:
/// the root drive first, then the other drives, interfaces, vsock and the entropy device.
fn expected_devices(config: &VmConfig) -> Vec<Expected<'_>> {
    let mut drives: Vec<_> = config.drives.iter().collect();
    drives.sort_by_key(|d| !d.is_root_device);
    let mut out: Vec<Expected> = drives
        .into_iter()
        .map(|d| Expected::Block(d.drive_id.as_str()))
        .collect();
    out.extend(
        config
            .network_interfaces
            .iter()
            .map(|n| Expected::Net(n.iface_id.as_str())),
    );
    if config.vsock.is_some() {
        out.push(Expected::Vsock);
    }
    if config.entropy.is_some() {
        out.push(Expected::Rng);
    }
    out
}

fn check_devices(snapshot: &MachineSnapshot) -> Result<(), String> {
    let devices = &snapshot.devices;
    match &devices.serial {
        None => return Err("serial: no saved state".into()),
        Some(serial) if serial.in_buffer.len() > SERIAL_FIFO => {
            return Err(format!(
                "serial: {} bytes in a {SERIAL_FIFO}-byte receive FIFO",
                serial.in_buffer.len()
            ))
        }
        Some(_) => {}
    }
    if devices.i8042.output.len() > I8042_PENDING {
        return Err(format!(
            "i8042: {} bytes queued, it holds {I8042_PENDING}",
            devices.i8042.output.len()
        ));
    }
    let expected = expected_devices(&snapshot.config);
    if expected.len() != devices.virtio.len() {
        return Err(format!(
            "virtio devices: {} saved, the config has {}",
            devices.virtio.len(),
            expected.len()
        ));
    }
    for (i, (saved, want)) in devices.virtio.iter().zip(&expected).enumerate() {
        check_virtio(saved, want, &snapshot.regions)
            .map_err(|why| format!("virtio device {i}: {why}"))?;
    }
    Ok(())
}

fn check_virtio(
    saved: &VirtioDeviceState,
    want: &Expected<'_>,
    regions: &[(u64, u64)],
) -> Result<(), String> {
    let base = match (&saved.device, want) {
        (DeviceKindState::Block(s), Expected::Block(id)) if s.drive_id == *id => &s.base,
        (DeviceKindState::Net(s), Expected::Net(id)) if s.iface_id == *id => {
            if let Some(frame) = &s.rx_pending {
                if !NET_FRAME_LEN.contains(&frame.len()) {
                    return Err(format!("a pending frame of {} bytes", frame.len()));
                }
            }
            &s.base
        }
        (DeviceKindState::Vsock(s), Expected::Vsock) => &s.base,
        (DeviceKindState::Rng(s), Expected::Rng) => &s.base,
        _ => {
            return Err(format!(
                "saved as {}, the config has {want:?} in its place",
                kind_name(&saved.device)
            ))
        }
    };
    let activated = saved.transport.status & DRIVER_OK != 0;
    if activated != base.activated {
        return Err(format!(
            "the transport status {:#x} and the device's activation ({}) disagree",
            saved.transport.status, base.activated
        ));
    }
    if saved.transport.interrupt_status & !INTERRUPT_BITS != 0 {
        return Err(format!(
            "interrupt status {:#x} has unknown bits",
            saved.transport.interrupt_status
        ));
    }
    check_queues(base, regions)
}

fn kind_name(state: &DeviceKindState) -> String {
    match state {
        DeviceKindState::Block(s) => format!("drive {:?}", s.drive_id),
        DeviceKindState::Net(s) => format!("interface {:?}", s.iface_id),
        DeviceKindState::Vsock(_) => "vsock".into(),
        DeviceKindState::Rng(_) => "entropy device".into(),
    }
}

/// Each queue as a driver's setup is checked: sizes powers of two within the maximum, and for
/// a running device every ready queue's rings aligned and inside guest RAM.
fn check_queues(base: &DeviceBaseState, regions: &[(u64, u64)]) -> Result<(), String> {
    if base.queues.len() > MAX_QUEUES {
        return Err(format!("{} queues", base.queues.len()));
    }
    for (i, q) in base.queues.iter().enumerate() {
        check_queue(q, base.activated, regions).map_err(|why| format!("queue {i}: {why}"))?;
    }
    Ok(())
}

fn check_queue(q: &SavedQueue, activated: bool, regions: &[(u64, u64)]) -> Result<(), String> {
    if !q.max_size.is_power_of_two() || q.max_size > MAX_QUEUE_SIZE {
        return Err(format!("maximum size {}", q.max_size));
    }
    if q.size > q.max_size || (q.size != 0 && !q.size.is_power_of_two()) {
        return Err(format!("size {} (maximum {})", q.size, q.max_size));
    }
    if !(q.ready && activated) {
        return Ok(());
    }
    if q.size == 0 {
        return Err("ready with size 0".into());
    }
    let n = u64::from(q.size);
    // Sizes and alignments from the virtio 1.x split ring: descriptors 16 bytes each (16-byte
    // aligned), the available ring 6 + 2n (2-aligned), the used ring 6 + 8n (4-aligned).
    for (what, addr, len, align) in [
        ("descriptor table", q.desc_table, 16 * n, 16),
        ("available ring", q.avail_ring, 6 + 2 * n, 2),
        ("used ring", q.used_ring, 6 + 8 * n, 4),
    ] {
        if addr % align != 0 {
            return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
        }
        if !in_ram(regions, addr, len) {
            return Err(format!(
                "{what} at {addr:#x} ({len} bytes) is outside guest memory"
            ));
        }
    }
    Ok(())
}

/// Whether `len` bytes from `addr` lie inside one RAM region.
fn in_ram(regions: &[(u64, u64)], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    regions.iter().any(|&(base, size)| {
        base.checked_add(size)
            .is_some_and(|region_end| addr >= base && end <= region_end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_sums_and_ends_are_overflow_checked() {
        assert_eq!(regions_total(&[(0, 10), (100, 20)]), Some(30));
        assert_eq!(regions_total(&[(u64::MAX - 5, 10)]), None);
        assert_eq!(regions_total(&[(0, u64::MAX), (0, 1)]), None);
    }

    #[test]
    fn ring_addresses_must_lie_inside_one_region() {
        let regions = [(0, 0x1000), (0x2000, 0x1000)];
        assert!(in_ram(&regions, 0x800, 0x800));
        assert!(!in_ram(&regions, 0x800, 0x801));
        assert!(!in_ram(&regions, 0xf00, 0x1200));
        assert!(!in_ram(&regions, u64::MAX - 2, 16));
    }

    fn queue(ready: bool) -> SavedQueue {
        SavedQueue {
            max_size: 256,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: false,
            size: 256,
            ready,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        }
    }

    #[test]
    fn queues_are_checked_like_a_drivers_setup() {
        let ram = [(0, 1 << 20)];
        check_queue(&queue(true), true, &ram).unwrap();
        let bad = [
            SavedQueue {
                max_size: 300,
                ..queue(true)
            },
            SavedQueue {
                size: 512,
                ..queue(true)
            },
            SavedQueue {
                size: 100,
                ..queue(true)
            },
            SavedQueue {
                size: 0,
                ..queue(true)
            },
            SavedQueue {
                desc_table: 0x1008,
                ..queue(true)
            },
            SavedQueue {
                avail_ring: 0x2001,
                ..queue(true)
            },
            SavedQueue {
                used_ring: (1 << 20) - 8,
                ..queue(true)
            },
            SavedQueue {
                desc_table: !15,
                ..queue(true)
            },
        ];
        for q in bad {
            assert!(check_queue(&q, true, &ram).is_err(), "{q:?}");
        }
        // Rings of a queue the driver has not enabled are not used, so not checked.
        check_queue(
            &SavedQueue {
                desc_table: 0x1008,
                ..queue(false)
            },
            true,
            &ram,
        )
        .unwrap();
    }
}
