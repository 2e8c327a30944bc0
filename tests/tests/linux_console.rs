//! Linux's serial console under a flood of input: a long command pasted at the terminal, 4 KiB
//! pasted through the terminal and streamed through the console socket, each checked by the
//! guest's own checksum, and the Ctrl-A x escape working after all of it. One boot (Linux runs
//! emulated on PVM hosts, tens of seconds a boot).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use lockstep_tests::{linux_images, require_kvm, TestVm, VmConfigBuilder};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(300);
/// Pasted input is echoed and processed by emulated guest code on PVM hosts: minutes, not
/// seconds, for kilobytes.
const PASTE: Duration = Duration::from_secs(240);
const READY: &str = "LKS-LINUX ready";

/// About 4 KiB of lines of printable text, different for each `seed`.
fn paste_text(seed: u64) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut text = String::new();
    while text.len() < 4000 {
        for _ in 0..63 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push(char::from(b'a' + ((x >> 33) % 26) as u8));
        }
        text.push('\n');
    }
    text
}

/// The checksum busybox's `cksum` prints for `data` (POSIX cksum: CRC-32 with the length).
fn posix_cksum(data: &[u8]) -> u32 {
    let mut crc: u32 = 0;
    let mut feed = |byte: u8| {
        crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    };
    for &b in data {
        feed(b);
    }
    let mut len = data.len();
    while len > 0 {
        feed((len & 0xff) as u8);
        len >>= 8;
    }
    !crc
}

/// Waits for the guest's `echo <tag> $(cksum ...)` line to show it got exactly `text`.
fn expect_checksum(vm: &TestVm, mark: usize, tag: &str, text: &str) {
    let want = format!("{tag} {} {}", posix_cksum(text.as_bytes()), text.len());
    vm.wait_for_after(mark, &want, PASTE);
}

#[test]
fn pasted_and_streamed_input_reaches_the_shell_whole_and_the_escape_still_works() {
    if !require_kvm("pasted_and_streamed_input_reaches_the_shell_whole_and_the_escape_still_works")
    {
        return;
    }
    let images = linux_images();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("console.sock");
    let config = VmConfigBuilder::new(&images.kernel)
        .initrd(&images.initramfs)
        .boot_args("console=ttyS0 reboot=k panic=-1 quiet")
        .mem_mib(256)
        .set("serial", json!({ "console_socket": socket }))
        .build();
    let mut vm = TestVm::start_on_terminal(&config);
    vm.wait_for(READY, BOOT);
    vm.wait_for("# ", BOOT);

    // A command longer than the UART's FIFO, pasted at the terminal in one write.
    let marker = "x".repeat(150);
    let mark = vm.serial().len();
    vm.send(&format!("echo long-$((6*7))-{marker}-end\n"));
    vm.wait_for_after(mark, &format!("long-42-{marker}-end\r\n"), PASTE);

    // 4 KiB pasted at the terminal in one write, into `cat` with echo off.
    let text = paste_text(1);
    let mark = vm.serial().len();
    vm.send("stty -echo; cat > /tmp/typed; stty echo; echo typed $(cksum < /tmp/typed)\n");
    std::thread::sleep(Duration::from_secs(3));
    vm.send(&text);
    vm.send("\u{4}");
    expect_checksum(&vm, mark, "typed", &text);

    // 4 KiB streamed through the console socket in small pieces, as a program would send it.
    let mut client = UnixStream::connect(&socket).expect("connect to the console socket");
    let text = paste_text(2);
    let mark = vm.serial().len();
    client
        .write_all(
            b"stty -echo; cat > /tmp/streamed; stty echo; echo streamed $(cksum < /tmp/streamed)\n",
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    for piece in text.as_bytes().chunks(37) {
        client.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    client.write_all(b"\x04").unwrap();
    expect_checksum(&vm, mark, "streamed", &text);
    drop(client);

    // The escape ends the VM at once, however much input came before it.
    vm.send("\u{1}x");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(0),
        "Ctrl-A x ends the VM\n{}",
        vm.logs()
    );
}

#[test]
fn the_checksum_is_posix_cksum() {
    // Values printed by coreutils' cksum.
    assert_eq!(posix_cksum(b""), 4294967295);
    assert_eq!(posix_cksum(b"abc\n"), 1112837078);
    assert_eq!(posix_cksum(b"hello world"), 1135714720);
}
