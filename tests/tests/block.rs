//! virtio-blk and virtio-rng with the test guest's own drivers, on KVM: data written and flushed
//! is in the host file and survives a restart, read-only drives refuse writes, several drives
//! work at once, and a hostile driver cannot break the VMM.

use std::path::Path;
use std::time::Duration;

use lockstep_tests::pattern::sector_pattern;
use lockstep_tests::{guest_images, require_kvm, GuestReport, TestVm, VmConfigBuilder};
use serde_json::{json, Value};

const RUN: Duration = Duration::from_secs(60);

fn drive(id: &str, path: &Path, read_only: bool) -> Value {
    json!({ "drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": read_only,
            "cache_type": "Writeback" })
}

/// Runs the test guest with `script` (monitor commands separated by ';') and returns its report,
/// checking that lockstep ended with 0.
fn run_script(drives: Vec<Value>, entropy: bool, script: &str) -> (GuestReport, String) {
    let mut config = VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&format!("lks.mode=run lks.run=\"{script}\""))
        .set("drives", Value::Array(drives));
    if entropy {
        config = config.set("entropy", json!({}));
    }
    let mut vm = TestVm::start(&config.build());
    let status = vm.wait_exit(RUN);
    assert_eq!(
        status.code(),
        Some(0),
        "lockstep failed\n{}\n{}",
        vm.serial(),
        vm.logs()
    );
    assert!(
        vm.serial().contains("LKS run done"),
        "the script did not finish\n{}",
        vm.serial()
    );
    (vm.report(), vm.logs())
}

fn image(dir: &Path, name: &str, bytes: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    path
}

fn host_sectors_match(path: &Path, first: u64, count: u64, seed: u64) {
    let data = std::fs::read(path).unwrap();
    for s in first..first + count {
        let at = (s * 512) as usize;
        assert_eq!(
            &data[at..at + 512],
            &sector_pattern(seed, s)[..],
            "sector {s} of {} on the host",
            path.display()
        );
    }
}

#[test]
fn written_and_flushed_blocks_persist_across_a_restart() {
    if !require_kvm("written_and_flushed_blocks_persist_across_a_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "disk.img", 4 << 20);
    let (r, _) = run_script(
        vec![drive("data", &disk, false)],
        false,
        "blk 0 write 100 64 7;blk 0 flush",
    );
    assert!(
        r.require("blk write").contains("status=ok"),
        "{:?}",
        r.lines()
    );
    assert!(r.require("blk flush").contains("status=ok"));
    host_sectors_match(&disk, 100, 64, 7);

    // A new VM on the same image reads the same data back.
    let (r, _) = run_script(
        vec![drive("data", &disk, false)],
        false,
        "blk 0 read 100 64 7;blk 0 read 0 8 7",
    );
    let reads: Vec<&str> = r.all("blk read").collect();
    assert!(
        reads[0].contains("status=ok") && reads[0].contains("pattern=match"),
        "{reads:?}"
    );
    assert!(
        reads[1].contains("pattern=mismatch"),
        "untouched sectors must not match: {reads:?}"
    );
}

#[test]
fn read_only_drive_refuses_writes() {
    if !require_kvm("read_only_drive_refuses_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "ro.img", 1 << 20);
    std::fs::write(&disk, vec![0x11u8; 1 << 20]).unwrap();
    let (r, _) = run_script(
        vec![drive("ro", &disk, true)],
        false,
        "blk 0 info;blk 0 write 0 8 3",
    );
    let info = r.require("blk info");
    assert_eq!(GuestReport::field(info, "ro"), Some("1"), "{info}");
    assert!(
        r.require("blk write").contains("status=ioerr"),
        "{:?}",
        r.lines()
    );
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x11),
        "the image changed"
    );
}

#[test]
fn two_drives_at_once_with_their_ids() {
    if !require_kvm("two_drives_at_once_with_their_ids") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 2 << 20);
    let b = image(dir.path(), "b.img", 3 << 20);
    let script = "blk 0 id;blk 1 id;blk 0 write 0 16 21;blk 1 write 8 16 22;blk 0 flush;blk 1 flush;blk 0 read 0 16 21;blk 1 read 8 16 22";
    let (r, _) = run_script(
        vec![drive("alpha", &a, false), drive("beta_2", &b, false)],
        false,
        script,
    );
    let ids: Vec<&str> = r.all("blk id").collect();
    assert!(
        ids[0].ends_with("id=alpha") && ids[1].ends_with("id=beta_2"),
        "{ids:?}"
    );
    assert!(
        r.all("blk read").all(|l| l.contains("pattern=match")),
        "{:?}",
        r.lines()
    );
    host_sectors_match(&a, 0, 16, 21);
    host_sectors_match(&b, 8, 16, 22);
    let capacities: Vec<String> = r
        .all("virtio")
        .filter_map(|l| GuestReport::field(l, "capacity").map(str::to_string))
        .collect();
    assert_eq!(capacities, vec!["4096", "6144"]);
}

#[test]
fn entropy_arrives() {
    if !require_kvm("entropy_arrives") {
        return;
    }
    let (r, _) = run_script(vec![], true, "rng 8192");
    let line = r.require("rng");
    assert_eq!(GuestReport::field(line, "status"), Some("ok"), "{line}");
    assert_eq!(GuestReport::field(line, "bytes"), Some("8192"));
    let distinct: u32 = GuestReport::field(line, "distinct")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        distinct > 240,
        "8 KiB of entropy should hold nearly every byte value: {line}"
    );
}

#[test]
fn hostile_driver_cannot_break_the_vmm() {
    if !require_kvm("hostile_driver_cannot_break_the_vmm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "h.img", 1 << 20);
    let script = "blk 0 write 0 8 5;hostile 0 all;hostile 1 all;blk 0 read 0 8 5;rng 64";
    let (r, logs) = run_script(vec![drive("target", &disk, false)], true, script);
    let results: Vec<&str> = r.all("hostile").filter(|l| l.contains("result=")).collect();
    assert!(
        results.len() >= 20,
        "every case on both devices: {results:?}"
    );
    for line in &results {
        let result = GuestReport::field(line, "result").unwrap();
        assert!(
            matches!(result, "survived" | "needs-reset" | "unflagged" | "skipped"),
            "{line}"
        );
        if result == "skipped" {
            continue;
        }
        assert_eq!(
            GuestReport::field(line, "recovered"),
            Some("yes"),
            "the device must work again after a reset: {line}"
        );
    }
    assert!(
        r.require("blk read").contains("pattern=match"),
        "data intact after the attacks"
    );
    assert!(r.require("rng").contains("status=ok"));
    host_sectors_match(&disk, 0, 8, 5);
    assert!(
        logs.lines().count() < 40,
        "a hostile guest must not flood the host log:\n{logs}"
    );
}
