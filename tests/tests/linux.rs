//! Linux on lockstep: the kernel built by resources/build-linux-guests.sh (the PVM variant on PVM
//! hosts, where a boot takes tens of seconds, so each test boots once and checks many things).

use std::time::Duration;

use lockstep_tests::report::whole_lines;
use lockstep_tests::{linux_images, require_kvm, TestVm, VmConfigBuilder};

/// Generous: on a PVM host the kernel runs emulated (~20 s alone, more with a second VM beside).
const BOOT: Duration = Duration::from_secs(300);
const SHELL: Duration = Duration::from_secs(60);
const READY: &str = "LKS-LINUX ready";

/// The value of `LKS-LINUX <key>=...` in the transcript.
fn linux_report(serial: &str, key: &str) -> Option<String> {
    let prefix = format!("LKS-LINUX {key}=");
    whole_lines(serial).find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

fn boot_linux(vcpus: u32, extra_args: &str) -> TestVm {
    let images = linux_images();
    let config = VmConfigBuilder::new(&images.kernel)
        .initrd(&images.initramfs)
        .boot_args(&format!("console=ttyS0 reboot=k panic=-1 {extra_args}"))
        .vcpus(vcpus)
        .mem_mib(256);
    let vm = TestVm::start(&config.build());
    vm.wait_for(READY, BOOT);
    vm
}

/// Runs a shell command and waits for `expect` in what follows.
fn shell(vm: &mut TestVm, command: &str, expect: &str) {
    let mark = vm.serial().len();
    vm.send(&format!("{command}\n"));
    vm.wait_for_after(mark, expect, SHELL);
}

fn reboot_ends_with_zero(vm: &mut TestVm) {
    vm.send("reboot\n");
    let status = vm.wait_exit(SHELL);
    assert_eq!(
        status.code(),
        Some(0),
        "reboot must end lockstep with exit 0\n{}",
        vm.logs()
    );
}

#[test]
fn linux_two_vcpus_shell_cmdline_initrd_reboot() {
    if !require_kvm("linux_two_vcpus_shell_cmdline_initrd_reboot") {
        return;
    }
    let mut vm = boot_linux(2, "lks.test=two-vcpus quiet");
    let serial = vm.serial();
    assert_eq!(
        linux_report(&serial, "nproc").as_deref(),
        Some("2"),
        "Linux must bring up both vCPUs\n{serial}"
    );
    let cmdline = linux_report(&serial, "cmdline").expect("cmdline reported");
    assert!(
        cmdline.contains("console=ttyS0 reboot=k panic=-1 lks.test=two-vcpus quiet"),
        "{cmdline}"
    );
    assert_eq!(linux_report(&serial, "root").as_deref(), Some("initramfs"));
    // The initramfs carries the hash of the inputs it was built from: proof it is the one given.
    let cache_key = linux_images()
        .initramfs
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        linux_report(&serial, "image_id").as_deref(),
        Some(cache_key.as_str())
    );

    shell(&mut vm, "echo sum=$((6*7))", "sum=42");
    shell(&mut vm, "cat /proc/cmdline", "lks.test=two-vcpus");
    shell(&mut vm, "grep -c ^processor /proc/cpuinfo", "\n2");
    reboot_ends_with_zero(&mut vm);
}

#[test]
fn linux_one_vcpu_boots_and_reboots() {
    if !require_kvm("linux_one_vcpu_boots_and_reboots") {
        return;
    }
    let mut vm = boot_linux(1, "lks.test=one-vcpu");
    assert_eq!(linux_report(&vm.serial(), "nproc").as_deref(), Some("1"));
    shell(&mut vm, "uname -r", "lockstep");
    reboot_ends_with_zero(&mut vm);
}
