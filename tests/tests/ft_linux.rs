//! The Linux guest (the PVM kernel on a PVM host) under FT: paired at its shell with a file
//! written and a loop running, its primary killed with SIGKILL; on the secondary its shell
//! answers, the loop runs on, and its disk (the secondary's own copy of the image) has the file,
//! read back after dropping the page cache. One boot: it costs tens of seconds here.

use std::time::Duration;

use lockstep_tests::etcd::Etcd;
use lockstep_tests::host::{Console, TestHost};
use lockstep_tests::{linux_images, require_kvm, VmConfigBuilder};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(300);
const CMD: Duration = Duration::from_secs(90);

fn console(host: &TestHost, vm: &str) -> Console {
    Console::connect(&host.dir().join("state").join(vm).join("console.sock"))
}

fn migration(host: &TestHost, id: &str) -> Value {
    host.migration(id)
}

fn wait_for(host: &TestHost, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    host.wait_migration(id, what, BOOT, check)
}

fn ticks(shell: &mut Console) -> u64 {
    let out = shell.run("cat /tmp/ticks; echo ticks-done", "ticks-done", CMD);
    out.lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no tick count:\n{out}"))
}

#[test]
fn a_linux_guest_survives_the_kill_of_its_primary_with_its_shell_and_disk() {
    if !require_kvm("a_linux_guest_survives_the_kill_of_its_primary_with_its_shell_and_disk") {
        return;
    }
    let Some(etcd) = Etcd::start("ft_linux") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (root_a, root_b) = (dir.path().join("a.ext4"), dir.path().join("b.ext4"));
    std::fs::copy(&linux_images().rootfs, &root_a).unwrap();
    // The secondary's own image: the primary's size; its bytes come with the pairing.
    let size = std::fs::metadata(&root_a).unwrap().len();
    std::fs::File::create(&root_b)
        .unwrap()
        .set_len(size)
        .unwrap();
    let vm = VmConfigBuilder::new(&linux_images().kernel)
        .boot_args("console=ttyS0 reboot=k panic=-1")
        .mem_mib(256)
        .set("name", json!("tux"))
        .set("drives", json!([{ "drive_id": "rootfs", "path_on_host": root_a, "is_root_device": true, "cache_type": "Writeback" }]))
        .build();
    let options = json!({ "console_sockets": true });
    let mut primary = TestHost::start_with(vec![vm], options.clone());
    let secondary = TestHost::start_with(vec![], options);
    primary.wait_serial("tux", "LKS-LINUX ready", BOOT);
    let mut shell = console(&primary, "tux");
    shell.run("echo shell-$((40+2))", "shell-42", CMD);
    shell.run(
        "echo written-before > /root/before.txt; sync; echo synced",
        "synced",
        CMD,
    );

    let ft = |host: &str| {
        json!({ "arbiter": [etcd.endpoint().to_string()], "host_id": host, "epoch_ms": 100,
                "heartbeat_timeout_ms": 1000 })
    };
    let reply = secondary.call(
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(
            &json!({ "listen": "127.0.0.1:0", "name": "tux", "ft": ft("b"),
                      "drive_overrides": [{ "drive_id": "rootfs", "path_on_host": root_b }] }),
        ),
    );
    assert_eq!(reply.status, 201, "{}", reply.text());
    let incoming = reply.json();
    let reply = primary.call(
        "POST",
        "/v1/vms/{name}/migrate",
        "/v1/vms/tux/migrate",
        Some(&json!({ "destination": incoming["listen"], "token": incoming["token"], "ft": ft("a") })),
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
    let out_id = reply.json()["id"].as_str().unwrap().to_string();
    let in_id = incoming["id"].as_str().unwrap().to_string();
    wait_for(&primary, &out_id, "protection", |i| {
        i["phase"] == "protecting" && i["ft"]["committed_epoch"].as_u64() >= Some(3)
    });
    // Written while protected: on the secondary's disk by the next checkpoint.
    shell.run(
        "echo written-during > /root/during.txt; sync; echo synced",
        "synced",
        CMD,
    );
    shell.run(
        "(i=0; while :; do i=$((i+1)); echo $i > /tmp/ticks.new; mv /tmp/ticks.new /tmp/ticks; sleep 0.1; done) & echo started",
        "started",
        CMD,
    );
    // The shell's answers came through checkpoints the secondary acknowledged.
    let committed = migration(&primary, &out_id)["ft"]["committed_epoch"]
        .as_u64()
        .unwrap();
    wait_for(&primary, &out_id, "two more checkpoints", |i| {
        i["ft"]["committed_epoch"].as_u64() >= Some(committed + 2)
    });
    drop(shell);
    // SAFETY: signals our own child, the primary's host process.
    unsafe { libc::kill(primary.pid() as i32, libc::SIGKILL) };
    primary.stop();

    let took = wait_for(&secondary, &in_id, "takeover", |i| {
        ["completed", "failed", "cancelled"].contains(&i["phase"].as_str().unwrap_or(""))
    });
    assert_eq!(took["phase"], "completed", "{took}\n{}", secondary.log());
    let mut shell = console(&secondary, "tux");
    shell.run("echo still-$((6*7))", "still-42", CMD);
    let first = ticks(&mut shell);
    shell.run("sleep 1; echo slept", "slept", CMD);
    assert!(ticks(&mut shell) > first, "the background loop runs on");
    let out = shell.run(
        "echo 3 > /proc/sys/vm/drop_caches; cat /root/before.txt /root/during.txt; echo written-after > /root/after.txt; sync; cat /root/after.txt; echo disk-done",
        "disk-done",
        CMD,
    );
    assert!(
        out.contains("\nwritten-before")
            && out.contains("\nwritten-during")
            && out.contains("\nwritten-after"),
        "the secondary's disk has what was written, read back from the image, and takes new writes:\n{out}"
    );
}
