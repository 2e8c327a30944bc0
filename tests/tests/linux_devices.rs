//! Linux's own virtio drivers on lockstep, and a Linux guest through a snapshot. One scenario,
//! because every Linux boot costs tens of seconds on a PVM host: Linux boots with its root on
//! virtio-blk, a tap, vsock and entropy; its shell pings the host, talks vsock both ways, reads
//! /dev/hwrng and writes a file; the VM is snapshotted at its shell and restored into a new host
//! process, where the shell still answers and the disk and network still work; then it reboots,
//! and a second boot from the same disk reads the file back.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use lockstep_tests::host::{Console, TestHost};
use lockstep_tests::netns::NetNs;
use lockstep_tests::{linux_images, require_kvm, VmConfigBuilder};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(300);
const CMD: Duration = Duration::from_secs(90);

fn linux_vm(name: &str, rootfs: &Path, ns: &NetNs, vsock: &Path) -> Value {
    let images = linux_images();
    VmConfigBuilder::new(&images.kernel)
        .boot_args("console=ttyS0 reboot=k panic=-1")
        .vcpus(2)
        .mem_mib(256)
        .set("name", json!(name))
        .set("drives", json!([{ "drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "cache_type": "Writeback" }]))
        .set("network-interfaces", json!([{ "iface_id": "eth0", "host_dev_name": ns.tap(), "guest_mac": "06:00:0a:4d:00:20" }]))
        .set("vsock", json!({ "guest_cid": 3, "uds_path": vsock }))
        .set("entropy", json!({}))
        .build()
}

fn console(host: &TestHost, vm: &str) -> Console {
    Console::connect(&host.dir().join("state").join(vm).join("console.sock"))
}

/// Shell commands that check the network, entropy and the disk; `ip` configures eth0 once.
fn check_devices(shell: &mut Console, ns: &NetNs, configure: bool) {
    if configure {
        shell.run(
            &format!(
                "ip addr add {}/24 dev eth0; ip link set eth0 up; echo net-$?",
                ns.guest_ip()
            ),
            "net-0",
            CMD,
        );
    }
    let out = shell.run(
        &format!("ping -c 3 -W 5 {}; echo ping-done", ns.host_ip()),
        "ping-done",
        CMD,
    );
    assert!(
        out.contains("3 packets received") || out.contains("3 received"),
        "ping through the tap:\n{out}"
    );
    let out = shell.run(
        "head -c 16 /dev/hwrng | od -An -tx1; echo rng-done",
        "rng-done",
        CMD,
    );
    let hex: Vec<&str> = out
        .lines()
        .flat_map(|l| l.split_whitespace())
        .filter(|w| w.len() == 2 && u8::from_str_radix(w, 16).is_ok())
        .collect();
    assert!(hex.len() >= 16, "16 bytes from /dev/hwrng:\n{out}");
}

#[test]
fn linux_drivers_snapshot_at_the_shell_and_persistence_across_reboot() {
    if !require_kvm("linux_drivers_snapshot_at_the_shell_and_persistence_across_reboot") {
        return;
    }
    let ns = NetNs::create();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs.ext4");
    std::fs::copy(&linux_images().rootfs, &rootfs).unwrap();
    let vsock = dir.path().join("v.sock");
    let console_sockets = json!({ "console_sockets": true });

    let mut first = TestHost::start_in(
        vec![linux_vm("penguin", &rootfs, &ns, &vsock)],
        console_sockets.clone(),
        Some(ns.name()),
    );
    first.wait_serial("penguin", "LKS-LINUX ready", BOOT);
    let report = first.serial("penguin");
    assert!(
        report.contains("LKS-LINUX root=ext4"),
        "root on virtio-blk:\n{report}"
    );
    assert!(report.contains("LKS-LINUX block=vda"), "{report}");
    assert!(
        report.contains("LKS-LINUX keyboard=AT"),
        "the i8042 keyboard is there for Ctrl-Alt-Del:\n{report}"
    );
    let mut shell = console(&first, "penguin");
    shell.run("echo shell-$((40+2))", "shell-42", CMD);
    check_devices(&mut shell, &ns, true);

    // vsock, guest to host: a host program listens on <uds_path>_5000.
    let listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
    let host_side = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        got
    });
    shell.run(
        "echo from-the-guest | lks-vsock connect 2 5000; echo vsock-out-$?",
        "vsock-out-0",
        CMD,
    );
    assert_eq!(host_side.join().unwrap(), "from-the-guest\n");
    // vsock, host to guest: Firecracker's CONNECT handshake to a guest listener.
    shell.run(
        "lks-vsock listen 6000 --echo & sleep 2; echo listening",
        "listening",
        CMD,
    );
    let mut conn = UnixStream::connect(&vsock).unwrap();
    conn.set_read_timeout(Some(CMD)).unwrap();
    conn.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    conn.write_all(b"echo me back\n").unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = String::new();
    reader.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, "echo me back\n");

    shell.run(
        "echo kept-across-reboot > /root/note.txt; sync; echo written",
        "written",
        CMD,
    );

    // Snapshot at the shell; restore in a new host process.
    let (state, memory) = (dir.path().join("linux.state"), dir.path().join("linux.mem"));
    let body = json!({ "state_path": state, "memory_path": memory });
    assert_eq!(
        first
            .call(
                "POST",
                "/v1/vms/{name}/snapshot",
                "/v1/vms/penguin/snapshot",
                Some(&body)
            )
            .status,
        200
    );
    first.call(
        "POST",
        "/v1/vms/{name}/shutdown",
        "/v1/vms/penguin/shutdown",
        Some(&json!({ "force": true })),
    );
    assert_eq!(first.stop(), Some(0));
    drop(shell);

    let mut second = TestHost::start_in(vec![], console_sockets.clone(), Some(ns.name()));
    let restore = json!({ "state_path": state, "memory_path": memory, "name": "penguin" });
    assert_eq!(
        second
            .call("POST", "/v1/restore", "/v1/restore", Some(&restore))
            .status,
        201
    );
    let mut shell = console(&second, "penguin");
    shell.run("echo still-$((6*7))", "still-42", CMD);
    check_devices(&mut shell, &ns, false);
    let out = shell.run("cat /root/note.txt; echo read-done", "read-done", CMD);
    assert!(out.contains("kept-across-reboot"), "{out}");

    // Reboot ends the VM; a second boot from the same disk finds the file.
    shell.run("reboot", "LKS-LINUX reboot", CMD);
    second.wait_state("penguin", "stopped", CMD);
    assert_eq!(
        second
            .call(
                "POST",
                "/v1/vms/{name}/start",
                "/v1/vms/penguin/start",
                None
            )
            .status,
        200
    );
    let serial = second.wait_serial("penguin", "LKS-LINUX ready", BOOT);
    assert!(serial.matches("LKS-LINUX ready").count() >= 1);
    let mut shell = console(&second, "penguin");
    let out = shell.run("cat /root/note.txt; echo second-boot", "second-boot", CMD);
    assert!(
        out.contains("kept-across-reboot"),
        "the file survived the reboot:\n{out}"
    );

    // A graceful shutdown through the API: Ctrl-Alt-Del on the i8042 keyboard, which the
    // guest's init turns into an orderly sync and reset well within the timeout.
    let reply = second.call(
        "POST",
        "/v1/vms/{name}/shutdown",
        "/v1/vms/penguin/shutdown",
        Some(&json!({ "timeout_s": 60 })),
    );
    assert_eq!(reply.status, 200);
    let serial = second.serial("penguin");
    assert!(
        serial.contains("LKS-LINUX ctrl-alt-del"),
        "the guest saw Ctrl-Alt-Del:\n{serial}"
    );
    second.wait_state("penguin", "stopped", CMD);
    assert_eq!(second.stop(), Some(0));
}
