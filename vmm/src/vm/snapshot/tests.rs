//! Hostile state files with valid checksums, decoded and checked without KVM.

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use lockstep_devices::legacy::{I8042State, SerialState};
use lockstep_devices::virtio::mmio::MmioTransportState;
use lockstep_devices::virtio::rng::RngState;
use lockstep_devices::virtio::{DeviceBaseState, SavedQueue};

use super::*;
use crate::device_state::{DeviceKindState, DevicesState, VirtioDeviceState};

const MIB: u64 = 1 << 20;

fn limits() -> HostLimits {
    HostLimits {
        mem_mib: 4096,
        max_vcpus: 32,
    }
}

fn paths() -> SnapshotPaths {
    SnapshotPaths {
        state: "/nonexistent/s.state".into(),
        memory: "/nonexistent/s.mem".into(),
    }
}

fn chip(chip_id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id,
        ..Default::default()
    }
}

fn vcpu(index: u32) -> VcpuState {
    VcpuState {
        index,
        cpuid: vec![Default::default(); 4],
        msrs: vec![Default::default(); 8],
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        events: Default::default(),
        tsc_khz: None,
    }
}

fn ready_queue() -> SavedQueue {
    SavedQueue {
        max_size: 256,
        next_avail: 3,
        next_used: 3,
        event_idx_enabled: false,
        size: 256,
        ready: true,
        desc_table: 0x10_0000,
        avail_ring: 0x10_1000,
        used_ring: 0x10_2000,
    }
}

/// A sound snapshot of a 2-vCPU, 128 MiB VM with an entropy device the driver has started.
fn machine() -> MachineSnapshot {
    let config = VmConfig::from_json(
        r#"{"boot-source": {"kernel_image_path": "/k"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
            "entropy": {}, "name": "t"}"#,
    )
    .unwrap();
    MachineSnapshot {
        config,
        regions: vec![(0, 128 * MIB)],
        vm: VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: vec![vcpu(0), vcpu(1)],
        devices: DevicesState {
            serial: Some(SerialState {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![b'x'; 3],
            }),
            i8042: I8042State::default(),
            virtio: vec![VirtioDeviceState {
                base: 0xd000_0000,
                irq: 5,
                transport: MmioTransportState {
                    status: 0xf,
                    ..Default::default()
                },
                device: DeviceKindState::Rng(RngState {
                    base: DeviceBaseState {
                        acked_features: 1 << 32,
                        queues: vec![ready_queue()],
                        activated: true,
                    },
                }),
            }],
        },
    }
}

/// The state file of `m` with valid checksums, whatever it holds.
fn file_of(m: &MachineSnapshot) -> Vec<u8> {
    let state = encode_state(m).unwrap();
    let memory = m.regions.iter().map(|r| r.1).fold(0u64, u64::wrapping_add);
    state_file_bytes(&state, "t", m.vcpus.len() as u32, memory).unwrap()
}

fn check(m: &MachineSnapshot) -> Result<MachineSnapshot, SnapshotError> {
    decode_and_check(&paths(), &file_of(m), 128 * MIB, &limits())
}

fn refused(m: &MachineSnapshot, needle: &str) {
    match check(m) {
        Ok(_) => panic!("accepted a snapshot that should fail with {needle:?}"),
        Err(e) => assert!(e.to_string().contains(needle), "{needle:?} not in: {e}"),
    }
}

#[test]
fn a_sound_snapshot_passes() {
    let back = check(&machine()).unwrap();
    assert_eq!(back.vcpus.len(), 2);
    assert_eq!(back.regions, vec![(0, 128 * MIB)]);
}

#[test]
fn a_huge_length_prefix_allocates_nothing() {
    // The config string comes first: a length prefix of 2^60 bytes, with valid checksums.
    let mut state = vec![253u8];
    state.extend_from_slice(&(1u64 << 60).to_le_bytes());
    state.extend_from_slice(&[0u8; 64]);
    let file = state_file_bytes(&state, "t", 2, 128 * MIB).unwrap();
    let err = decode_and_check(&paths(), &file, 128 * MIB, &limits()).unwrap_err();
    assert!(err.to_string().contains("does not decode"), "{err}");
    // And a region list claiming 2^60 entries after a sound config.
    let good = encode_state(&machine()).unwrap();
    let config_len = usize::from(good[0]) + 1;
    assert_eq!(good[config_len], 1, "one region");
    let mut state = good[..config_len].to_vec();
    state.push(253);
    state.extend_from_slice(&(1u64 << 60).to_le_bytes());
    state.extend_from_slice(&good[config_len + 1..]);
    let file = state_file_bytes(&state, "t", 2, 128 * MIB).unwrap();
    assert!(decode_and_check(&paths(), &file, 128 * MIB, &limits()).is_err());
}

#[test]
fn a_small_state_cannot_claim_megabytes() {
    // 4 MiB claimed for the config string by a state of a few bytes: refused by the decoder's
    // limit (64 KiB for a state this small), not by running out of input after allocating.
    let mut state = vec![252u8];
    state.extend_from_slice(&(4u32 << 20).to_le_bytes());
    let err = decode_state(&state).unwrap_err();
    assert!(err.contains("LimitExceeded"), "{err}");
}

#[test]
fn trailing_bytes_are_refused() {
    let mut state = encode_state(&machine()).unwrap();
    state.push(0);
    let file = state_file_bytes(&state, "t", 2, 128 * MIB).unwrap();
    let err = decode_and_check(&paths(), &file, 128 * MIB, &limits()).unwrap_err();
    assert!(err.to_string().contains("after its end"), "{err}");
}

#[test]
fn region_lists_that_overflow_overlap_or_disagree_are_refused() {
    let mut m = machine();
    m.regions = vec![(0, u64::MAX), (0, 2)];
    refused(&m, "overflow");
    m.regions = vec![(u64::MAX - 10, 128 * MIB)];
    refused(&m, "overflow");
    m.regions = vec![(0, 64 * MIB), (32 * MIB, 64 * MIB)];
    refused(&m, "memory regions");
    m.regions = vec![(0x1000, 128 * MIB)];
    refused(&m, "memory regions");
    // More memory than the file holds.
    let m = machine();
    let err = decode_and_check(&paths(), &file_of(&m), 64 * MIB, &limits()).unwrap_err();
    assert!(err.to_string().contains("s.mem"), "{err}");
    // A config asking for more than the host has.
    let mut m = machine();
    m.config.machine_config.mem_size_mib = 1 << 40;
    refused(&m, "this host has");
}

#[test]
fn vcpu_counts_and_lengths_are_bounded() {
    let mut m = machine();
    m.vcpus.pop();
    refused(&m, "vCPUs: 1 saved, the config has 2");
    let mut m = machine();
    m.config.machine_config.vcpu_count = 64;
    m.vcpus = (0..64).map(vcpu).collect();
    refused(&m, "this host allows");
    let mut m = machine();
    m.vcpus[1].index = 7;
    refused(&m, "vCPU 1: saved as vCPU 7");
    let mut m = machine();
    m.vcpus[0].msrs = vec![Default::default(); 10_000];
    refused(&m, "MSRs");
    let mut m = machine();
    m.vcpus[0].cpuid = vec![Default::default(); 1_000];
    refused(&m, "CPUID");
    let mut m = machine();
    m.vm.ioapic.chip_id = KVM_IRQCHIP_PIC_MASTER;
    refused(&m, "IOAPIC");
}

#[test]
fn device_lists_must_match_the_config() {
    let mut m = machine();
    m.devices.virtio.clear();
    refused(&m, "virtio devices: 0 saved, the config has 1");
    let mut m = machine();
    let extra = m.devices.virtio[0].clone();
    m.devices.virtio.push(extra);
    refused(&m, "2 saved");
    let mut m = machine();
    m.config.entropy = None;
    m.config.vsock =
        Some(serde_json::from_str(r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#).unwrap());
    refused(&m, "the config has Vsock");
    let mut m = machine();
    m.devices.serial = None;
    refused(&m, "serial");
}

fn queue(m: &mut MachineSnapshot) -> &mut SavedQueue {
    match &mut m.devices.virtio[0].device {
        DeviceKindState::Rng(s) => &mut s.base.queues[0],
        _ => unreachable!(),
    }
}

#[test]
fn bad_device_state_is_refused() {
    let mut m = machine();
    m.devices.serial.as_mut().unwrap().in_buffer = vec![0; 65];
    refused(&m, "receive FIFO");
    let mut m = machine();
    m.devices.i8042.output = vec![0u8; 1000].into();
    refused(&m, "i8042");
    let mut m = machine();
    m.devices.virtio[0].transport.status = 0x3;
    refused(&m, "disagree");
    for (damage, needle) in [
        (
            Box::new(|q: &mut SavedQueue| q.desc_table = 200 * MIB) as Box<dyn Fn(&mut SavedQueue)>,
            "outside guest memory",
        ),
        (
            Box::new(|q| q.used_ring = u64::MAX - 3),
            "outside guest memory",
        ),
        (Box::new(|q| q.avail_ring = 0x10_1001), "aligned"),
        (Box::new(|q| q.size = 100), "size 100"),
        (Box::new(|q| q.max_size = 0), "maximum size 0"),
        (Box::new(|q| q.size = 0), "ready with size 0"),
    ] {
        let mut m = machine();
        damage(queue(&mut m));
        refused(&m, needle);
    }
}
