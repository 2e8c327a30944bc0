//! virtio-net on a real tap device, with the test guest's own driver and network stack: the
//! guest answers ARP and ping from a namespace the test creates, and UDP test payloads cross in
//! both directions with their sequence numbers and checksums intact.

use std::net::UdpSocket;
use std::time::Duration;

use lockstep_tests::host::TestHost;
use lockstep_tests::netns::NetNs;
use lockstep_tests::pattern::{udp_check, udp_payload};
use lockstep_tests::{guest_images, require_kvm, TestVm, VmConfigBuilder};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const MAC: &str = "06:00:0a:4d:00:02";

fn start_guest(ns: &NetNs, script: &str) -> TestVm {
    let args = format!(
        "lks.mode=monitor lks.ip={}/24 lks.run=\"{script}\"",
        ns.guest_ip()
    );
    let config = VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&args)
        .set(
            "network-interfaces",
            json!([{ "iface_id": "eth0", "host_dev_name": ns.tap(), "guest_mac": MAC }]),
        )
        .build();
    let vm = TestVm::start_in(&config, Some(ns.name()));
    vm.wait_for("LKS ready", WAIT);
    vm
}

fn finish(mut vm: TestVm) {
    vm.wait_for("lks> ", WAIT);
    vm.send("reset\r");
    assert_eq!(vm.wait_exit(WAIT).code(), Some(0), "{}", vm.logs());
}

/// The guest sends as fast as it can; a host socket with the default buffer would drop what
/// the test reads too slowly, which says nothing about the VMM.
fn big_receive_buffer(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 16 << 20;
    // SAFETY: sets an integer socket option on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

#[test]
fn ping_from_the_namespace_is_answered() {
    if !require_kvm("ping_from_the_namespace_is_answered") {
        return;
    }
    let ns = NetNs::create();
    let vm = start_guest(&ns, "net info");
    vm.wait_for("lks> ", WAIT);
    let out = ns.output(&["ping", "-c", "5", "-i", "0.2", "-W", "2", &ns.guest_ip()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("5 received"),
        "ping through the tap:\n{text}\n{}",
        vm.serial()
    );
    let info = vm.report();
    assert!(
        info.require("virtio").contains(&format!("mac={MAC}")),
        "{:?}",
        info.lines()
    );
    finish(vm);
}

#[test]
fn udp_from_guest_to_host_arrives_in_order_and_intact() {
    if !require_kvm("udp_from_guest_to_host_arrives_in_order_and_intact") {
        return;
    }
    let ns = NetNs::create();
    let host_ip = ns.host_ip();
    let receiver = ns.run(move || {
        let sock = UdpSocket::bind((host_ip.as_str(), 9000)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        big_receive_buffer(&sock);
        let mut seqs = Vec::new();
        let mut buf = [0u8; 2048];
        while seqs.len() < 400 {
            let (n, _) = sock.recv_from(&mut buf).expect("datagrams from the guest");
            seqs.push(udp_check(&buf[..n]).expect("a payload with a bad checksum"));
        }
        seqs
    });
    std::thread::sleep(Duration::from_millis(200));
    let vm = start_guest(&ns, &format!("net udp-send {} 9000 400 1200", ns.host_ip()));
    let seqs = receiver.join().unwrap();
    assert_eq!(
        seqs,
        (0..400).collect::<Vec<u32>>(),
        "every datagram, in order"
    );
    let line = vm.wait_for_line("LKS net udp-send ip=", WAIT);
    assert!(line.contains("sent=400"), "{line}");
    finish(vm);
}

#[test]
fn udp_from_host_to_guest_is_echoed_intact() {
    if !require_kvm("udp_from_host_to_guest_is_echoed_intact") {
        return;
    }
    let ns = NetNs::create();
    let vm = start_guest(&ns, "net udp-echo 7000 300");
    vm.wait_for("LKS net udp-echo listening", WAIT);
    let guest = format!("{}:7000", ns.guest_ip());
    let host_ip = ns.host_ip();
    let echoes = ns
        .run(move || {
            let sock = UdpSocket::bind((host_ip.as_str(), 0)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = [0u8; 2048];
            let mut got = Vec::new();
            for seq in 0..300u32 {
                let payload = udp_payload(seq, 64 + (seq as usize * 13) % 1400);
                sock.send_to(&payload, &guest).unwrap();
                let (n, _) = sock.recv_from(&mut buf).expect("the echo");
                assert_eq!(&buf[..n], &payload[..], "echo of datagram {seq}");
                got.push(udp_check(&buf[..n]).unwrap());
            }
            got
        })
        .join()
        .unwrap();
    assert_eq!(echoes.len(), 300);
    let line = vm.wait_for_line("stopped_by=", WAIT);
    assert!(
        line.contains("received=300") && line.contains("ok=300") && line.contains("bad=0"),
        "{line}"
    );
    finish(vm);
}

/// Datagrams sent in back-to-back bursts move reception from the tap's wake-ups to the
/// moderation timer; every one still arrives once, in order and intact, and the interface's
/// counters show moderation at work.
#[test]
fn host_to_guest_bursts_are_moderated_and_arrive_in_order() {
    if !require_kvm("host_to_guest_bursts_are_moderated_and_arrive_in_order") {
        return;
    }
    const COUNT: u32 = 2001;
    const BURST: usize = 100;
    let ns = NetNs::create();
    let args = format!(
        "lks.mode=monitor lks.ip={}/24 lks.run=\"net udp-echo 7000 {COUNT}\"",
        ns.guest_ip()
    );
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&args)
        .set("name", json!("burst"))
        .set(
            "network-interfaces",
            json!([{ "iface_id": "eth0", "host_dev_name": ns.tap(), "guest_mac": MAC }]),
        )
        .build();
    let mut host = TestHost::start_in(vec![vm], json!({}), Some(ns.name()));
    host.wait_serial("burst", "LKS net udp-echo listening", WAIT);
    let guest = format!("{}:7000", ns.guest_ip());
    let host_ip = ns.host_ip();
    // Built beforehand, so that a burst leaves the host back to back.
    let payloads: Vec<Vec<u8>> = (0..COUNT)
        .map(|seq| udp_payload(seq, 64 + (seq as usize * 13) % 1400))
        .collect();
    let echoed = ns
        .run(move || {
            let sock = UdpSocket::bind((host_ip.as_str(), 0)).unwrap();
            big_receive_buffer(&sock);
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = [0u8; 2048];
            let mut echoed = Vec::new();
            let mut receive = |echoed: &mut Vec<u32>, upto: usize| {
                while echoed.len() < upto {
                    let Ok((n, _)) = sock.recv_from(&mut buf) else {
                        return false;
                    };
                    echoed.push(udp_check(&buf[..n]).expect("an intact echo"));
                }
                true
            };
            // The first datagram alone: it waits for ARP, and the kernel may send datagrams
            // that come while it waits before the ones it queued.
            sock.send_to(&payloads[0], &guest).unwrap();
            // Then bursts of 100, each echoed before the next: the tap (500 frames) never
            // holds more than one, so the kernel drops none however slow the guest is.
            let mut ok = receive(&mut echoed, 1);
            for burst in payloads[1..].chunks(BURST) {
                if !ok {
                    break;
                }
                for payload in burst {
                    sock.send_to(payload, &guest).unwrap();
                }
                let upto = echoed.len() + burst.len();
                ok = receive(&mut echoed, upto);
            }
            echoed
        })
        .join()
        .unwrap();
    let tap_drops = ns.output(&[
        "cat",
        &format!("/sys/class/net/{}/statistics/tx_dropped", ns.tap()),
    ]);
    assert!(
        echoed.iter().copied().eq(0..COUNT),
        "every datagram echoed once, in order: got {} echoes, first out of place at {:?}; \
         frames the tap dropped: {}",
        echoed.len(),
        echoed.iter().zip(0..).position(|(got, want)| *got != want),
        String::from_utf8_lossy(&tap_drops.stdout).trim()
    );
    let serial = host.wait_serial_line("burst", "stopped_by=", WAIT);
    let line = serial.lines().find(|l| l.contains("stopped_by=")).unwrap();
    assert!(
        line.contains(&format!("received={COUNT} "))
            && line.contains(&format!("ok={COUNT} "))
            && line.contains("bad=0"),
        "{line}"
    );
    let metrics = host
        .call(
            "GET",
            "/v1/vms/{name}/metrics",
            "/v1/vms/burst/metrics",
            None,
        )
        .json();
    let net = metrics["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "net")
        .unwrap()["counters"]
        .clone();
    assert!(
        net["rx_frames"].as_u64().unwrap() >= u64::from(COUNT),
        "{net}"
    );
    // Whether frames then come on ticks depends on how fast the host sends compared with the
    // device (the unit tests check that they do); that reception moved onto the timer does not.
    assert!(net["rx_moderation_starts"].as_u64().unwrap() > 0, "{net}");
    assert_eq!(net["rx_drops"], 0, "{net}");
    assert_eq!(host.stop(), Some(0), "{}", host.log());
}

#[test]
fn firecracker_config_with_every_device_section_runs_unchanged() {
    if !require_kvm("firecracker_config_with_every_device_section_runs_unchanged") {
        return;
    }
    let ns = NetNs::create();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs.ext4");
    std::fs::File::create(&rootfs)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    // Firecracker's example config shape, field for field.
    let config = json!({
        "boot-source": {
            "kernel_image_path": guest_images().elf,
            "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off lks.mode=report lks.ip={}/24", ns.guest_ip()),
            "initrd_path": null
        },
        "drives": [{
            "drive_id": "rootfs",
            "partuuid": null,
            "is_root_device": true,
            "cache_type": "Unsafe",
            "is_read_only": false,
            "path_on_host": rootfs,
            "io_engine": "Sync",
            "rate_limiter": null,
            "socket": null
        }],
        "machine-config": { "vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false, "huge_pages": "None" },
        "cpu-config": null,
        "balloon": null,
        "network-interfaces": [{ "iface_id": "net1", "guest_mac": MAC, "host_dev_name": ns.tap() }],
        "vsock": { "guest_cid": 3, "uds_path": dir.path().join("v.sock") },
        "logger": null,
        "metrics": null,
        "mmds-config": null,
        "entropy": { "rate_limiter": null }
    });
    let mut vm = TestVm::start_in(&config, Some(ns.name()));
    assert_eq!(
        vm.wait_exit(WAIT).code(),
        Some(0),
        "{}\n{}",
        vm.serial(),
        vm.logs()
    );
    let report = vm.report();
    let kinds: Vec<String> = report
        .all("virtio")
        .filter_map(|l| lockstep_tests::GuestReport::field(l, "type").map(str::to_string))
        .collect();
    assert_eq!(
        kinds,
        vec!["blk", "net", "vsock", "rng"],
        "{:?}",
        report.lines()
    );
    assert!(report.require("cmdline").contains("root=/dev/vda rw"));
}
