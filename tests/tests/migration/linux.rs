//! The Linux guest (the PVM kernel on a PVM host) migrates at its shell between two hosts, and
//! its shell, disk and network still work on the destination. One boot: it costs tens of
//! seconds here.

use std::time::Duration;

use lockstep_tests::host::{Console, TestHost};
use lockstep_tests::{linux_images, require_kvm, VmConfigBuilder};
use serde_json::json;

use super::devices::{migrate_over_unix, Bridged};
use super::*;

const BOOT: Duration = Duration::from_secs(300);
const CMD: Duration = Duration::from_secs(90);

fn console(host: &TestHost, vm: &str) -> Console {
    Console::connect(&host.dir().join("state").join(vm).join("console.sock"))
}

fn ping(shell: &mut Console, ip: &str) {
    let out = shell.run(
        &format!("ping -c 3 -W 5 {ip}; echo ping-done"),
        "ping-done",
        CMD,
    );
    assert!(
        out.contains("3 packets received") || out.contains("3 received"),
        "ping through the tap:\n{out}"
    );
}

#[test]
fn a_linux_guest_migrates_at_its_shell_and_its_shell_disk_and_network_work_there() {
    if !require_kvm("a_linux_guest_migrates_at_its_shell_and_its_shell_disk_and_network_work_there")
    {
        return;
    }
    let net = Bridged::create();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs.ext4");
    std::fs::copy(&linux_images().rootfs, &rootfs).unwrap();
    let vm = VmConfigBuilder::new(&linux_images().kernel)
        .boot_args("console=ttyS0 reboot=k panic=-1")
        .vcpus(2)
        .mem_mib(256)
        .set("name", json!("tux"))
        .set("drives", json!([{ "drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "cache_type": "Writeback" }]))
        .set("network-interfaces", json!([{ "iface_id": "eth0", "host_dev_name": net.ns.tap(), "guest_mac": "06:00:0a:4e:00:21" }]))
        .build();
    let options = json!({ "console_sockets": true });
    let source = TestHost::start_in(vec![vm], options.clone(), Some(net.ns.name()));
    let destination = TestHost::start_in(vec![], options, Some(net.ns.name()));
    source.wait_serial("tux", "LKS-LINUX ready", BOOT);
    let mut shell = console(&source, "tux");
    shell.run("echo shell-$((40+2))", "shell-42", CMD);
    shell.run(
        &format!(
            "ip addr add {}/24 dev eth0; ip link set eth0 up; echo net-$?",
            net.ns.guest_ip()
        ),
        "net-0",
        CMD,
    );
    ping(&mut shell, &net.ns.host_ip());
    shell.run(
        "echo written-before > /root/before.txt; sync; echo synced",
        "synced",
        CMD,
    );
    // Something running at the switch: a counter in the background.
    shell.run(
        "(i=0; while :; do i=$((i+1)); echo $i > /tmp/ticks.new; mv /tmp/ticks.new /tmp/ticks; sleep 0.1; done) & echo started",
        "started",
        CMD,
    );
    drop(shell);

    migrate_over_unix(&source, &destination, "tux", net.overrides());
    assert_eq!(vm_status(&source, "tux"), 404, "the source gave the VM up");

    let mut shell = console(&destination, "tux");
    shell.run("echo still-$((6*7))", "still-42", CMD);
    let ticks = |shell: &mut Console| -> u64 {
        let out = shell.run("cat /tmp/ticks; echo ticks-done", "ticks-done", CMD);
        out.lines()
            .filter_map(|l| l.trim().parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no tick count:\n{out}"))
    };
    let first = ticks(&mut shell);
    shell.run("sleep 1; echo slept", "slept", CMD);
    assert!(ticks(&mut shell) > first, "the background loop runs on");
    ping(&mut shell, &net.ns.host_ip());
    let out = shell.run(
        "cat /root/before.txt; echo written-after > /root/after.txt; sync; cat /root/after.txt; echo disk-done",
        "disk-done",
        CMD,
    );
    assert!(
        out.contains("\nwritten-before") && out.contains("\nwritten-after"),
        "the disk reads what was written before and takes new writes:\n{out}"
    );
    // Reading the whole root file system back checks the block device beyond the page cache.
    let out = shell.run(
        "echo 3 > /proc/sys/vm/drop_caches; cat /root/before.txt /root/after.txt; echo reread-done",
        "reread-done",
        CMD,
    );
    assert!(
        out.contains("\nwritten-before") && out.contains("\nwritten-after"),
        "{out}"
    );
}
