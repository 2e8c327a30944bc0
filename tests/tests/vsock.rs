//! virtio-vsock with Firecracker's host-side convention, with the test guest's own driver: a
//! guest connection to CID 2 port P reaches a host program listening on `<uds_path>_P`; a host
//! program connecting to `uds_path` and writing `CONNECT <port>\n` reaches a listening guest.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use lockstep_tests::pattern::fnv1a64;
use lockstep_tests::{guest_images, require_kvm, TestVm, VmConfigBuilder};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn start(uds: &Path, script: &str) -> TestVm {
    let config = VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&format!("lks.mode=monitor lks.run=\"{script}\""))
        .set("vsock", json!({ "guest_cid": 3, "uds_path": uds }))
        .build();
    TestVm::start(&config)
}

fn finish(mut vm: TestVm) {
    vm.wait_for("lks> ", WAIT);
    vm.send("reset\r");
    assert_eq!(vm.wait_exit(WAIT).code(), Some(0), "{}", vm.logs());
}

#[test]
fn guest_connects_to_a_host_listener() {
    if !require_kvm("guest_connects_to_a_host_listener") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
    let host = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = vec![0u8; b"hello host".len()];
        conn.read_exact(&mut got).unwrap();
        conn.write_all(b"reply from the host side").unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        got
    });
    let vm = start(&uds, "vsock connect 5000 hello host");
    let line = vm.wait_for_line("LKS vsock connect port=5000", WAIT);
    assert_eq!(host.join().unwrap(), b"hello host");
    assert!(line.contains("result=ok"), "{line}");
    let expected = format!("fnv1a64={:016x}", fnv1a64(b"reply from the host side"));
    assert!(line.contains(&expected), "{line}");
    finish(vm);
}

#[test]
fn host_connects_to_a_guest_listener() {
    if !require_kvm("host_connects_to_a_guest_listener") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let vm = start(&uds, "vsock listen 6000 30");
    vm.wait_for("LKS vsock listening port=6000", WAIT);
    let mut conn = UnixStream::connect(&uds).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(
        ok.starts_with("OK "),
        "Firecracker's answer to CONNECT: {ok:?}"
    );
    // More than the guest's receive credit would allow in one go, so flow control is exercised.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let writer = {
        let mut conn = conn.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            conn.write_all(&data).unwrap();
            conn.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::new();
    reader.read_to_end(&mut echoed).unwrap();
    writer.join().unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the echo must be byte-exact");
    let line = vm.wait_for_line("LKS vsock listen port=6000", WAIT);
    assert!(
        line.contains("result=ok") && line.contains("received=300000"),
        "{line}"
    );
    finish(vm);
}

#[test]
fn connecting_to_a_port_nobody_listens_on_is_refused() {
    if !require_kvm("connecting_to_a_port_nobody_listens_on_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let vm = start(&uds, "vsock connect 5999 anyone");
    let line = vm.wait_for_line("LKS vsock connect port=5999", WAIT);
    assert!(line.contains("result=refused"), "{line}");
    finish(vm);
}
