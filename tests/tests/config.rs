//! Bad configs: each is refused with exit code 2 and a message naming the field and the value,
//! and leaves nothing behind (the serial output file it names is never created).

use std::path::{Path, PathBuf};
use std::time::Duration;

use lockstep_tests::{guest_images, require_kvm, run_to_exit, RunOutcome};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(30);

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A config with a serial output file, so a test can check that nothing was created.
    fn config(&self, kernel: &Path) -> Value {
        json!({
            "boot-source": { "kernel_image_path": kernel, "boot_args": "lks.mode=report" },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 64 },
            "serial": { "output_path": self.path("serial.log") },
        })
    }

    /// Runs lockstep on `text` and checks the refusal: exit 2, every needle in the message,
    /// and no serial log.
    fn refused(&self, text: &str, needles: &[&str]) -> RunOutcome {
        let file = self.path("vm.json");
        std::fs::write(&file, text).unwrap();
        let out = run_to_exit(&file, TIMEOUT);
        assert_eq!(
            out.code,
            Some(2),
            "expected exit 2 for config:\n{text}\nstderr:\n{}",
            out.logs
        );
        for needle in needles {
            assert!(
                out.logs.contains(needle),
                "stderr lacks {needle:?}:\n{}",
                out.logs
            );
        }
        assert!(
            !self.path("serial.log").exists(),
            "a refused config created its serial log"
        );
        out
    }

    fn refused_json(&self, config: &Value, needles: &[&str]) -> RunOutcome {
        self.refused(&serde_json::to_string_pretty(config).unwrap(), needles)
    }
}

fn kernel() -> &'static Path {
    &guest_images().elf
}

#[test]
fn unknown_keys_are_named() {
    let c = Case::new();
    let mut cfg = c.config(kernel());
    cfg["machine-config"]["vcpus"] = json!(2);
    c.refused_json(&cfg, &["machine-config", "unknown field `vcpus`"]);
    let mut cfg = c.config(kernel());
    cfg["ballon"] = json!({});
    c.refused_json(&cfg, &["unknown field `ballon`"]);
    // A Firecracker section lockstep does not implement is named as such.
    let mut cfg = c.config(kernel());
    cfg["balloon"] = json!({ "amount_mib": 64, "deflate_on_oom": false });
    c.refused_json(&cfg, &["balloon", "not supported by lockstep"]);
}

#[test]
fn malformed_json_gives_line_and_column() {
    let c = Case::new();
    c.refused(
        "{\n  \"boot-source\": {\n    \"kernel_image_path\": \"/x\",,\n  }\n}\n",
        &["malformed JSON", "line 3", "column"],
    );
    c.refused("", &["malformed JSON", "line 1"]);
}

#[test]
fn wrong_types_name_the_field() {
    let c = Case::new();
    let mut cfg = c.config(kernel());
    cfg["machine-config"]["mem_size_mib"] = json!("lots");
    c.refused_json(&cfg, &["machine-config.mem_size_mib", "invalid type"]);
}

#[test]
fn vcpu_count_out_of_range() {
    if !require_kvm("vcpu_count_out_of_range") {
        return;
    }
    let c = Case::new();
    for n in [0, 33, 1000] {
        let mut cfg = c.config(kernel());
        cfg["machine-config"]["vcpu_count"] = json!(n);
        c.refused_json(
            &cfg,
            &["machine-config.vcpu_count", &format!("{n} is out of range")],
        );
    }
}

#[test]
fn memory_too_small_or_larger_than_the_host() {
    if !require_kvm("memory_too_small_or_larger_than_the_host") {
        return;
    }
    let c = Case::new();
    let mut cfg = c.config(kernel());
    cfg["machine-config"]["mem_size_mib"] = json!(4);
    c.refused_json(&cfg, &["machine-config.mem_size_mib", "4 MiB is too small"]);
    cfg["machine-config"]["mem_size_mib"] = json!(16_000_000u64);
    c.refused_json(
        &cfg,
        &[
            "machine-config.mem_size_mib",
            "16000000 MiB is more than this host's",
        ],
    );
}

#[test]
fn missing_or_unreadable_kernel() {
    if !require_kvm("missing_or_unreadable_kernel") {
        return;
    }
    let c = Case::new();
    let missing = c.path("no-such-vmlinux");
    c.refused_json(
        &c.config(&missing),
        &[
            "boot-source.kernel_image_path",
            "no-such-vmlinux",
            "No such file",
        ],
    );
    c.refused_json(
        &c.config(c.dir.path()),
        &["boot-source.kernel_image_path", "not a regular file"],
    );
    let fifo = c.path("fifo");
    let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: creates a FIFO at a path we own.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    c.refused_json(
        &c.config(&fifo),
        &["boot-source.kernel_image_path", "not a regular file"],
    );
    let dangling = c.path("dangling");
    std::os::unix::fs::symlink(c.path("nowhere"), &dangling).unwrap();
    c.refused_json(
        &c.config(&dangling),
        &["boot-source.kernel_image_path", "dangling"],
    );
}

#[test]
fn files_that_are_not_kernels() {
    if !require_kvm("files_that_are_not_kernels") {
        return;
    }
    let c = Case::new();
    let script = c.path("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hello\n").unwrap();
    c.refused_json(
        &c.config(&script),
        &[
            "boot-source.kernel_image_path",
            "script.sh",
            "neither an ELF image nor a bzImage",
        ],
    );
    let empty = c.path("empty");
    std::fs::write(&empty, "").unwrap();
    c.refused_json(
        &c.config(&empty),
        &["boot-source.kernel_image_path", "not a kernel"],
    );
    // A dynamically linked program is an ELF, but not one a VM can boot.
    c.refused_json(
        &c.config(Path::new("/bin/sh")),
        &["boot-source.kernel_image_path", "not a kernel"],
    );
    // A truncated kernel: the real guest cut short after its headers.
    let bytes = std::fs::read(kernel()).unwrap();
    let cut = c.path("truncated.elf");
    std::fs::write(&cut, &bytes[..200.min(bytes.len())]).unwrap();
    c.refused_json(
        &c.config(&cut),
        &["boot-source.kernel_image_path", "not a kernel"],
    );
}

#[test]
fn initrd_missing_or_too_big() {
    if !require_kvm("initrd_missing_or_too_big") {
        return;
    }
    let c = Case::new();
    let mut cfg = c.config(kernel());
    cfg["boot-source"]["initrd_path"] = json!(c.path("no-initrd"));
    c.refused_json(&cfg, &["boot-source.initrd_path", "no-initrd"]);
    let big = c.path("big.initrd");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    cfg["boot-source"]["initrd_path"] = json!(big);
    c.refused_json(
        &cfg,
        &["boot-source.initrd_path", "104857600 bytes", "mem_size_mib"],
    );
}

#[test]
fn boot_args_too_long_or_pvh_without_note() {
    if !require_kvm("boot_args_too_long_or_pvh_without_note") {
        return;
    }
    let c = Case::new();
    let mut cfg = c.config(kernel());
    cfg["boot-source"]["boot_args"] = json!("x".repeat(3000));
    c.refused_json(&cfg, &["boot-source.boot_args", "3000 bytes"]);
    let mut cfg = c.config(&guest_images().bzimage);
    cfg["boot-source"]["boot_protocol"] = json!("pvh");
    c.refused_json(&cfg, &["boot-source.boot_protocol"]);
}

#[test]
fn serial_output_in_a_missing_directory() {
    if !require_kvm("serial_output_in_a_missing_directory") {
        return;
    }
    let c = Case::new();
    let mut cfg = c.config(kernel());
    cfg["serial"]["output_path"] = json!(c.path("no/such/dir/serial.log"));
    c.refused_json(&cfg, &["serial.output_path", "does not exist"]);
}

#[test]
fn missing_config_file() {
    let c = Case::new();
    let out = run_to_exit(&c.path("absent.json"), TIMEOUT);
    assert_eq!(out.code, Some(2));
    assert!(out.logs.contains("cannot read config file"), "{}", out.logs);
}

#[test]
fn bad_devices_name_the_entry() {
    if !require_kvm("bad_devices_name_the_entry") {
        return;
    }
    let c = Case::new();
    let disk = c.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 16]).unwrap();
    let drive = |id: &str, path: &Path| json!({ "drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": false });
    let with = |key: &str, value: Value| {
        let mut cfg = c.config(kernel());
        cfg[key] = value;
        cfg
    };
    c.refused_json(
        &with("drives", json!([drive("a", &disk), drive("a", &disk)])),
        &["drives[1].drive_id", "used by another drive"],
    );
    c.refused_json(
        &with("drives", json!([drive("a", &c.path("absent.img"))])),
        &["drives[0].path_on_host"],
    );
    c.refused_json(
        &with("drives", json!([drive("a", c.dir.path())])),
        &["drives[0].path_on_host"],
    );
    let mut limited = drive("a", &disk);
    limited["rate_limiter"] = json!({ "bandwidth": { "size": 1, "refill_time": 1 } });
    c.refused_json(
        &with("drives", json!([limited])),
        &["drives[0].rate_limiter"],
    );
    c.refused_json(
        &with(
            "network-interfaces",
            json!([{ "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:zz:00:00:01" }]),
        ),
        &["network-interfaces[0].guest_mac"],
    );
    c.refused_json(
        &with(
            "vsock",
            json!({ "guest_cid": 2, "uds_path": c.path("v.sock") }),
        ),
        &["vsock.guest_cid"],
    );
    c.refused_json(
        &with("balloon", json!({ "amount_mib": 1 })),
        &["balloon", "not supported"],
    );
    assert!(
        !c.path("v.sock").exists(),
        "a refused config created its vsock socket"
    );
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        vec![0u8; 1 << 16],
        "a refused config touched a disk"
    );
}
