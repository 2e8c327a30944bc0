//! Snapshots as untrusted input, and snapshots that must not destroy what a running VM stands
//! on: state files with valid checksums but hostile content, non-regular files, an oversized
//! state file, and snapshots written over a running restored VM's memory file or a VM's disk
//! (under other names too). Each is refused with an error naming the problem, the host keeps
//! serving, the healthy VMs keep running, and a failed restore leaves no folder behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lockstep_tests::host::TestHost;
use lockstep_tests::{guest_images, require_kvm, GuestReport, VmConfigBuilder};
use lockstep_vmm::device_state::DeviceKindState;
use lockstep_vmm::vm::snapshot::{
    decode_state, encode_state, regions_total, state_file_bytes, MachineSnapshot, MAX_STATE_FILE,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);

/// The last counter value a VM's guest printed.
fn last_counter(serial: &str) -> u64 {
    GuestReport::parse(serial)
        .all("counter")
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .last()
        .unwrap_or(0)
}

/// Waits until the VM's counter passes `above`.
fn wait_counter_past(host: &TestHost, vm: &str, above: u64) -> u64 {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let n = last_counter(&host.serial(vm));
        if n > above {
            return n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{vm}'s counter stuck at {n}:\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn snapshot(host: &TestHost, vm: &str, state: &Path, memory: &Path) -> (u16, Value) {
    let body = json!({ "state_path": state, "memory_path": memory });
    let reply = host.call(
        "POST",
        "/v1/vms/{name}/snapshot",
        &format!("/v1/vms/{vm}/snapshot"),
        Some(&body),
    );
    (reply.status, reply.json())
}

fn restore(host: &TestHost, state: &Path, memory: &Path, name: &str) -> (u16, Value) {
    let body = json!({ "state_path": state, "memory_path": memory, "name": name });
    let reply = host.call("POST", "/v1/restore", "/v1/restore", Some(&body));
    (reply.status, reply.json())
}

/// A real state file split into its framing and the machine state.
fn machine_of(file: &[u8]) -> MachineSnapshot {
    let header_len = u32::from_le_bytes(file[12..16].try_into().unwrap()) as usize;
    decode_state(&file[20 + header_len..]).unwrap()
}

/// A state file for `payload` with valid checksums and a header that agrees with `m`.
fn framed(payload: &[u8], m: &MachineSnapshot) -> Vec<u8> {
    let memory = regions_total(&m.regions).unwrap_or(0);
    state_file_bytes(payload, "hostile", m.vcpus.len() as u32, memory).unwrap()
}

fn reencoded(m: &MachineSnapshot) -> Vec<u8> {
    framed(&encode_state(m).unwrap(), m)
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn hostile_snapshot_files_are_refused_and_leave_nothing_behind() {
    if !require_kvm("hostile_snapshot_files_are_refused_and_leave_nothing_behind") {
        return;
    }
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args("lks.mode=run lks.run=\"counter 100\"")
        .set("name", json!("orig"))
        .set("entropy", json!({}))
        .build();
    let host = TestHost::start(vec![vm]);
    host.wait_serial("orig", "LKS counter=2 ", WAIT);
    let dir = tempfile::tempdir().unwrap();
    let (state, memory) = (dir.path().join("s.state"), dir.path().join("s.mem"));
    let (status, body) = snapshot(&host, "orig", &state, &memory);
    assert_eq!(status, 200, "{body}");
    let good = std::fs::read(&state).unwrap();
    let m = machine_of(&good);
    let good_payload = encode_state(&m).unwrap();

    // Each case: what it is, the state and memory files to restore from, what the error says.
    let mut cases: Vec<(&str, PathBuf, PathBuf, &str)> = Vec::new();
    let mut file_case = |what: &'static str, bytes: Vec<u8>, needle: &'static str| {
        let path = dir.path().join(format!("case{}.state", cases.len()));
        std::fs::write(&path, bytes).unwrap();
        cases.push((what, path, memory.clone(), needle));
    };

    // A length prefix of 2^60 bytes for the config string, the first field.
    let mut huge = vec![253u8];
    huge.extend_from_slice(&(1u64 << 60).to_le_bytes());
    huge.extend_from_slice(&good_payload[1..]);
    file_case("a 2^60-byte string", framed(&huge, &m), "does not decode");
    // A region list of 2^60 entries after a sound config (bincode: 251 + u16 length).
    assert_eq!(
        good_payload[0], 251,
        "the config string has a 3-byte length"
    );
    let config_end = 3 + u16::from_le_bytes([good_payload[1], good_payload[2]]) as usize;
    let mut regions = good_payload[..config_end].to_vec();
    regions.push(253);
    regions.extend_from_slice(&(1u64 << 60).to_le_bytes());
    regions.extend_from_slice(&good_payload[config_end + 1..]);
    file_case(
        "a 2^60-entry region list",
        framed(&regions, &m),
        "does not decode",
    );

    let with = |change: &dyn Fn(&mut MachineSnapshot)| {
        let mut h = machine_of(&good);
        change(&mut h);
        reencoded(&h)
    };
    let total = regions_total(&m.regions).unwrap();
    file_case(
        "region lengths that overflow",
        with(&|h| h.regions = vec![(0, u64::MAX), (0, total + 1)]),
        "overflow",
    );
    file_case(
        "overlapping regions",
        with(&|h| h.regions = vec![(0, total / 2), (total / 4, total / 2)]),
        "memory regions",
    );
    file_case(
        "regions beyond the memory file",
        with(&|h| h.regions = vec![(0, total * 2)]),
        "bytes of guest memory where the snapshot has",
    );
    file_case(
        "regions that disagree with the config",
        with(&|h| h.config.machine_config.mem_size_mib *= 2),
        "memory regions",
    );
    file_case(
        "a vCPU more than the config",
        with(&|h| {
            let mut extra = machine_of(&good).vcpus.remove(0);
            extra.index = 1;
            h.vcpus.push(extra);
        }),
        "vCPUs: 2 saved, the config has 1",
    );
    file_case(
        "10,000 MSRs",
        with(&|h| {
            let msr = h.vcpus[0].msrs[0];
            h.vcpus[0].msrs = vec![msr; 10_000];
        }),
        "MSRs",
    );
    file_case(
        "a queue outside guest memory",
        with(&|h| {
            let dev = &mut h.devices.virtio[0];
            dev.transport.status |= 0xf;
            let DeviceKindState::Rng(rng) = &mut dev.device else {
                panic!("the entropy device is the only virtio device");
            };
            rng.base.activated = true;
            let q = &mut rng.base.queues[0];
            q.ready = true;
            q.size = q.max_size;
            q.desc_table = 1 << 44;
        }),
        "outside guest memory",
    );
    file_case(
        "a device list that disagrees with the config",
        with(&|h| h.devices.virtio.clear()),
        "virtio devices: 0 saved, the config has 1",
    );
    // Refused only once devices are built (after the VM's folder and serial log exist): what
    // the restore created must go again.
    file_case(
        "a device at another address",
        with(&|h| h.devices.virtio[0].base += 0x1000),
        "was at",
    );
    file_case(
        "an overfull serial FIFO",
        with(&|h| h.devices.serial.as_mut().unwrap().in_buffer = vec![b'x'; 4096]),
        "receive FIFO",
    );
    // An oversized state file (sparse): refused before it is read.
    let big = dir.path().join("big.state");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(MAX_STATE_FILE + 1).unwrap();
    drop(f);
    cases.push(("an oversized state file", big, memory.clone(), "more than"));
    // Files that are not regular files: none may block or be read.
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let zero = PathBuf::from("/dev/zero");
    let not_regular = "is not a regular file";
    cases.push((
        "a FIFO as state file",
        fifo.clone(),
        memory.clone(),
        not_regular,
    ));
    cases.push((
        "a FIFO as memory file",
        state.clone(),
        fifo.clone(),
        not_regular,
    ));
    cases.push((
        "/dev/zero as state file",
        zero.clone(),
        memory.clone(),
        not_regular,
    ));
    cases.push(("/dev/zero as memory file", state.clone(), zero, not_regular));
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    cases.push((
        "a folder as state file",
        sub.clone(),
        memory.clone(),
        not_regular,
    ));
    cases.push(("a folder as memory file", state.clone(), sub, not_regular));

    let files_before = listing(dir.path());
    let mut seen = last_counter(&host.serial("orig"));
    for (what, state_path, memory_path, needle) in &cases {
        let (status, body) = restore(&host, state_path, memory_path, "copy");
        assert_eq!(status, 400, "{what}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{what}: {message}");
        // The host keeps serving, nothing was added, the healthy VM runs on.
        let reply = host.call("GET", "/v1/host", "/v1/host", None);
        assert_eq!(reply.status, 200, "{what}: {}", reply.text());
        assert_eq!(reply.json()["vm_count"], 1, "{what}");
        assert!(
            !host.dir().join("state").join("copy").exists(),
            "{what}: a folder was left behind"
        );
        assert_eq!(listing(dir.path()), files_before, "{what}");
        assert_eq!(host.state("orig"), "running", "{what}");
        seen = wait_counter_past(&host, "orig", seen);
    }
    // The sound snapshot still restores: the refusals were about the content.
    let (status, body) = restore(&host, &state, &memory, "copy");
    assert_eq!(status, 201, "{body}");
    wait_counter_past(&host, "copy", 0);
}

#[test]
fn a_snapshot_never_overwrites_a_file_a_running_vm_stands_on() {
    if !require_kvm("a_snapshot_never_overwrites_a_file_a_running_vm_stands_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args("lks.mode=run lks.run=\"memfill 16 7;counter 100\"")
        .set("name", json!("orig"))
        .set(
            "drives",
            json!([{ "drive_id": "data", "path_on_host": disk, "is_root_device": false }]),
        )
        .build();
    let host = TestHost::start(vec![vm]);
    host.wait_serial("orig", "LKS counter=2 ", WAIT);
    let (state, memory) = (dir.path().join("a.state"), dir.path().join("a.mem"));
    let (status, body) = snapshot(&host, "orig", &state, &memory);
    assert_eq!(status, 200, "{body}");
    let (status, body) = restore(&host, &state, &memory, "copy");
    assert_eq!(status, 201, "{body}");
    let mut seen = wait_counter_past(&host, "copy", 0);
    let memory_before = std::fs::read(&memory).unwrap();

    let link = dir.path().join("link.mem");
    std::os::unix::fs::symlink(&memory, &link).unwrap();
    let hard = dir.path().join("hard.mem");
    std::fs::hard_link(&memory, &hard).unwrap();
    let dotted = dir.path().join(".").join("a.mem");
    let fresh_state = dir.path().join("b.state");
    let fresh_memory = dir.path().join("b.mem");
    // (VM snapshotted, state path, memory path, what the error names)
    let cases: Vec<(&str, &Path, &Path, &str)> = vec![
        (
            "orig",
            &fresh_state,
            &memory,
            "snapshot memory file of the running VM \"copy\"",
        ),
        (
            "copy",
            &fresh_state,
            &memory,
            "snapshot memory file of the running VM \"copy\"",
        ),
        ("orig", &fresh_state, &link, "snapshot memory file"),
        ("orig", &fresh_state, &hard, "snapshot memory file"),
        ("orig", &fresh_state, &dotted, "snapshot memory file"),
        ("orig", &memory, &fresh_memory, "snapshot memory file"),
        ("orig", &fresh_state, &disk, "disk image of drive \"data\""),
        ("copy", &disk, &fresh_memory, "disk image of drive \"data\""),
        (
            "orig",
            &fresh_state,
            &fresh_state,
            "same file as the memory file",
        ),
    ];
    for (vm, state_path, memory_path, needle) in cases {
        let (status, body) = snapshot(&host, vm, state_path, memory_path);
        let what = format!("{vm}: {} + {}", state_path.display(), memory_path.display());
        assert_eq!(status, 400, "{what}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{what}: {message}");
        assert!(!fresh_state.exists() && !fresh_memory.exists(), "{what}");
        assert_eq!(host.state("copy"), "running", "{what}");
        seen = wait_counter_past(&host, "copy", seen);
    }
    assert!(
        std::fs::read(&memory).unwrap() == memory_before,
        "the memory file changed"
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 20);
    // The restored VM's memory is whole: it carries on.
    seen = wait_counter_past(&host, "copy", seen + 5);
    assert!(seen > 0);
    // Once nothing stands on it, the file may be replaced again: a fresh snapshot of orig.
    let (status, body) = snapshot(&host, "orig", &fresh_state, &fresh_memory);
    assert_eq!(status, 200, "{body}");
    let leftovers: Vec<String> = listing(dir.path())
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `lockstep run --api-sock`, killed when dropped.
struct FcProcess(std::process::Child);

impl Drop for FcProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn firecracker_snapshot_create_never_overwrites_the_vms_disk() {
    if !require_kvm("firecracker_snapshot_create_never_overwrites_the_vms_disk") {
        return;
    }
    use lockstep_tests::host::curl_unix;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fc.sock");
    let console = dir.path().join("console.out");
    let disk = dir.path().join("rootfs.ext4");
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    let _fc = FcProcess(
        std::process::Command::new(lockstep_tests::lockstep_bin())
            .args(["run", "--api-sock"])
            .arg(&socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start lockstep run --api-sock"),
    );
    let deadline = std::time::Instant::now() + WAIT;
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let put = |path: &str, body: String| curl_unix(&socket, "PUT", path, Some(&body));
    let patch = |path: &str, body: String| curl_unix(&socket, "PATCH", path, Some(&body));
    let boot = json!({ "kernel_image_path": guest_images().elf, "boot_args": "lks.mode=run lks.run=\"counter 100\"" });
    assert_eq!(put("/boot-source", boot.to_string()).status, 204);
    let drive = json!({ "drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": false });
    assert_eq!(put("/drives/rootfs", drive.to_string()).status, 204);
    let start = json!({ "action_type": "InstanceStart" });
    assert_eq!(put("/actions", start.to_string()).status, 204);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("LKS counter=2 ")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        patch("/vm", json!({ "state": "Paused" }).to_string()).status,
        204
    );
    let link = dir.path().join("disk-link");
    std::os::unix::fs::symlink(&disk, &link).unwrap();
    let fresh = dir.path().join("snap.state");
    for (state, memory, needle) in [
        (&fresh, &disk, "disk image of drive \"rootfs\""),
        (&fresh, &link, "disk image of drive \"rootfs\""),
        (
            &disk,
            &dir.path().join("snap.mem"),
            "disk image of drive \"rootfs\"",
        ),
        (&fresh, &fresh, "same file as the memory file"),
    ] {
        let body = json!({ "snapshot_path": state, "mem_file_path": memory });
        let reply = put("/snapshot/create", body.to_string());
        assert_eq!(reply.status, 400, "{}", reply.text());
        let message = reply.json()["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(needle), "{message}");
    }
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0x5au8; 1 << 20]);
    assert!(!fresh.exists());
    assert_eq!(
        patch("/vm", json!({ "state": "Resumed" }).to_string()).status,
        204
    );
}
