//! Booting the test guest on KVM: every entry path, vCPU counts, the command line, the initrd,
//! the e820 map, console input, and the ways a VM ends.

use std::time::Duration;

use lockstep_tests::{guest_images, require_kvm, GuestReport, TestVm, VmConfigBuilder};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(30);

/// Boots the test guest in report mode and waits for it to reset itself, which must end
/// `lockstep` with exit code 0. Returns the guest's report.
fn report_run(config: VmConfigBuilder) -> (GuestReport, TestVm) {
    let mut vm = TestVm::start(&config.build());
    let status = vm.wait_exit(BOOT);
    assert_eq!(
        status.code(),
        Some(0),
        "guest reset must end lockstep with 0\n{}\n{}",
        vm.serial(),
        vm.logs()
    );
    let report = vm.report();
    assert!(
        report.get("ready").is_some() || report.lines().iter().any(|l| l == "ready"),
        "no ready marker:\n{}",
        vm.serial()
    );
    (report, vm)
}

fn elf() -> VmConfigBuilder {
    VmConfigBuilder::new(&guest_images().elf)
}

/// FNV-1a 64, as the guest computes it over the initrd.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn one_vcpu_linux64_entry() {
    if !require_kvm("one_vcpu_linux64_entry") {
        return;
    }
    let (r, vm) = report_run(
        elf()
            .boot_protocol("linux64")
            .boot_args("lks.mode=report")
            .vcpus(1),
    );
    assert_eq!(r.require("boot"), "linux64");
    assert_eq!(r.require("cpus"), "1 source=mptable");
    assert_eq!(r.require("cpus_online"), "1");
    assert!(
        vm.logs().contains("host KVM backend:"),
        "lockstep must say which backend it found:\n{}",
        vm.logs()
    );
}

#[test]
fn four_vcpus_all_come_online() {
    if !require_kvm("four_vcpus_all_come_online") {
        return;
    }
    let (r, _) = report_run(elf().boot_args("lks.mode=report").vcpus(4));
    assert_eq!(r.require("cpus"), "4 source=mptable");
    assert_eq!(
        r.require("cpus_online"),
        "4",
        "every AP must start through INIT-SIPI and check in"
    );
}

#[test]
fn pvh_entry() {
    if !require_kvm("pvh_entry") {
        return;
    }
    let (r, _) = report_run(
        elf()
            .boot_protocol("pvh")
            .boot_args("lks.mode=report")
            .vcpus(2),
    );
    assert_eq!(r.require("boot"), "pvh");
    assert_eq!(r.require("cpus_online"), "2");
    // Auto picks PVH for an ELF with a PVH note.
    let (r, _) = report_run(elf().boot_args("lks.mode=report"));
    assert_eq!(r.require("boot"), "pvh");
}

#[test]
fn bzimage_with_initrd() {
    if !require_kvm("bzimage_with_initrd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.img");
    let bytes: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&initrd, &bytes).unwrap();
    let config = VmConfigBuilder::new(&guest_images().bzimage)
        .boot_args("lks.mode=report")
        .initrd(&initrd)
        .vcpus(2);
    let (r, _) = report_run(config);
    assert_eq!(r.require("boot"), "linux64");
    let line = r.require("initrd");
    assert_eq!(GuestReport::field(line, "size"), Some("300000"), "{line}");
    let expected = format!("{:016x}", fnv1a64(&bytes));
    assert_eq!(
        GuestReport::field(line, "fnv1a64"),
        Some(expected.as_str()),
        "the guest must see the initrd's exact bytes: {line}"
    );
}

#[test]
fn initrd_through_pvh_module_list() {
    if !require_kvm("initrd_through_pvh_module_list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.img");
    let bytes = b"lockstep initrd over PVH\n".repeat(1000);
    std::fs::write(&initrd, &bytes).unwrap();
    let (r, _) = report_run(
        elf()
            .boot_protocol("pvh")
            .boot_args("lks.mode=report")
            .initrd(&initrd),
    );
    let line = r.require("initrd");
    let expected = format!("{:016x}", fnv1a64(&bytes));
    assert_eq!(
        GuestReport::field(line, "fnv1a64"),
        Some(expected.as_str()),
        "{line}"
    );
}

#[test]
fn command_line_is_echoed_exactly() {
    if !require_kvm("command_line_is_echoed_exactly") {
        return;
    }
    let args = "lks.mode=report console=ttyS0 a=b quoted=\"x y\" last";
    let (r, _) = report_run(elf().boot_args(args));
    assert_eq!(r.require("cmdline"), args);
}

/// The e820 map the guest reads, as (start, size, type).
fn e820_of(r: &GuestReport) -> Vec<(u64, u64, u32)> {
    r.all("e820")
        .map(|v| {
            let parts: Vec<&str> = v.split(',').collect();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (hex(parts[0]), hex(parts[1]), parts[2].parse().unwrap())
        })
        .collect()
}

#[test]
fn e820_map_as_configured() {
    if !require_kvm("e820_map_as_configured") {
        return;
    }
    let low = [(0, 0x9fc00, 1), (0x9fc00, 0x400, 2), (0xf0000, 0x10000, 2)];
    let (r, _) = report_run(elf().boot_args("lks.mode=report").mem_mib(128));
    let mut expected = low.to_vec();
    expected.push((0x10_0000, (128 << 20) - 0x10_0000, 1));
    assert_eq!(e820_of(&r), expected);
    assert_eq!(
        r.require("mem").parse::<u64>().unwrap(),
        0x9fc00 + (128 << 20) - 0x10_0000
    );

    // 3.5 GiB: RAM stops at the 3 GiB MMIO gap and resumes at 4 GiB.
    let (r, _) = report_run(
        elf()
            .boot_protocol("linux64")
            .boot_args("lks.mode=report")
            .mem_mib(3584),
    );
    let mut expected = low.to_vec();
    expected.push((0x10_0000, 0xc000_0000 - 0x10_0000, 1));
    expected.push((0x1_0000_0000, 512 << 20, 1));
    assert_eq!(e820_of(&r), expected);
}

#[test]
fn serial_input_reaches_the_monitor() {
    if !require_kvm("serial_input_reaches_the_monitor") {
        return;
    }
    let mut vm = TestVm::start(&elf().boot_args("lks.mode=monitor").vcpus(2).build());
    vm.wait_for("lks> ", BOOT);
    let mark = vm.serial().len();
    vm.send("echo typed on the host 12345\r");
    vm.wait_for_after(mark, "\ntyped on the host 12345", BOOT);
    // A burst three times the UART's 64-byte FIFO arrives whole.
    let long: String = (0..200)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mark = vm.serial().len();
    vm.send(&format!("echo {long}\r"));
    vm.wait_for_after(mark, &format!("\n{long}"), BOOT);
    let mark = vm.serial().len();
    vm.send("cpus\r");
    vm.wait_for_after(mark, "online=2", BOOT);
    vm.send("reset\r");
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));
}

#[test]
fn serial_output_to_a_file() {
    if !require_kvm("serial_output_to_a_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    std::fs::write(&log, "earlier line\n").unwrap();
    let config = elf()
        .boot_args("lks.mode=report")
        .set("serial", json!({ "output_path": log }));
    let mut vm = TestVm::start(&config.build());
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.starts_with("earlier line\n"),
        "the log is appended to, not replaced"
    );
    assert!(text.contains("LKS ready"), "{text}");
    assert!(
        !vm.serial().contains("LKS"),
        "serial output went to stdout too"
    );
}

#[test]
fn sigterm_stops_the_vm() {
    if !require_kvm("sigterm_stops_the_vm") {
        return;
    }
    let mut vm = TestVm::start(&elf().boot_args("lks.mode=halt").vcpus(2).build());
    vm.wait_for("LKS ready", BOOT);
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(BOOT).code(), Some(128 + libc::SIGTERM));
}

#[test]
fn firecracker_config_runs_unchanged() {
    if !require_kvm("firecracker_config_runs_unchanged") {
        return;
    }
    // The shape of Firecracker's own example config file (boot-source and machine-config only).
    let config = json!({
        "boot-source": {
            "kernel_image_path": guest_images().elf,
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off lks.mode=report",
        },
        "machine-config": {
            "vcpu_count": 2,
            "mem_size_mib": 1024,
            "smt": false,
            "track_dirty_pages": false,
            "huge_pages": "None"
        }
    });
    let mut vm = TestVm::start(&config);
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0), "{}", vm.logs());
    assert_eq!(vm.report().require("cpus_online"), "2");
}
