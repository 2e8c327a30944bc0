//! Linux's serial console under a flood of input: a long command pasted at the terminal, 4 KiB
//! pasted through the terminal and streamed through the console socket, each checked by the
//! guest's own checksum (busybox `crc32`), and the Ctrl-A x escape working after all of it. One boot (Linux runs
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

/// The CRC-32 (zlib's) that busybox's `crc32` prints for `data`, as it prints it.
fn crc32_hex(data: &[u8]) -> String {
    let mut crc: u32 = !0;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    format!("{:08x}", !crc)
}

/// Waits for the guest's `echo <tag> $(crc32 ...) $(wc -c ...)` line to show it got exactly `text`.
fn expect_checksum(vm: &TestVm, mark: usize, tag: &str, text: &str) {
    // Not anchored at a line start: a guest whose input buffer filled sends XOFF and XON
    // (^S ^Q) on its console just before. The command's own echo has no checksum in it.
    let want = format!("{tag} {} {}", crc32_hex(text.as_bytes()), text.len());
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
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("linux_console: {what} after {:?}", started.elapsed());
    let mut vm = TestVm::start_on_terminal(&config);
    vm.wait_for(READY, BOOT);
    phase("booted");
    vm.wait_for("# ", BOOT);

    // A command longer than the UART's FIFO, pasted at the terminal in one write.
    let marker = "x".repeat(150);
    let mark = vm.serial().len();
    vm.send(&format!("echo long-$((6*7))-{marker}-end\n"));
    vm.wait_for_after(mark, &format!("long-42-{marker}-end\r\n"), PASTE);
    phase("long command answered");

    // 4 KiB pasted at the terminal in one write, into `cat` with echo off. The paste goes only
    // once the guest said echo is off: before that the shell's line editor would take it.
    let text = paste_text(1);
    let mark = vm.serial().len();
    vm.send(
        "stty -echo; echo READY-typed; cat > /tmp/typed; stty echo; \
         echo typed $(crc32 < /tmp/typed) $(wc -c < /tmp/typed)\n",
    );
    vm.wait_for_after(mark, "READY-typed\r\n", PASTE);
    phase("cat ready for the paste");
    vm.send(&text);
    vm.send("\u{4}");
    expect_checksum(&vm, mark, "typed", &text);
    phase("paste checked");

    // 4 KiB streamed through the console socket in small pieces, as a program would send it.
    let mut client = UnixStream::connect(&socket).expect("connect to the console socket");
    let text = paste_text(2);
    let mark = vm.serial().len();
    client
        .write_all(
            b"stty -echo; echo READY-streamed; cat > /tmp/streamed; stty echo; \
              echo streamed $(crc32 < /tmp/streamed) $(wc -c < /tmp/streamed)\n",
        )
        .unwrap();
    vm.wait_for_after(mark, "READY-streamed\r\n", PASTE);
    phase("cat ready for the stream");
    for piece in text.as_bytes().chunks(37) {
        client.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    client.write_all(b"\x04").unwrap();
    expect_checksum(&vm, mark, "streamed", &text);
    phase("stream checked");
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
fn the_checksum_is_busybox_crc32() {
    // Values printed by busybox's crc32.
    assert_eq!(crc32_hex(b"abc\n"), "4788814e");
    assert_eq!(crc32_hex(b"hello world"), "0d4a1185");
}
