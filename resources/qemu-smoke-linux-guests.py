#!/usr/bin/env python3
"""Boot lockstep's PVM guest images under QEMU microvm and check them.

A developer tool (not part of CI): it needs qemu-system-x86 and
python3-pexpect, and about 25-40 s per boot on the PVM hosts. It reads the
manifest written by build-linux-guests.sh (argument, or the `current` one).

Checks: the LKS-LINUX report (nproc with -smp 1 and 2, cmdline, kernel,
image id, keyboard), the interactive shell on the serial console (commands,
job control), that `reboot`, `exit` and `poweroff` end the VM through the
i8042 reset (QEMU -no-reboot exits), Ctrl-Alt-Del from QEMU's keyboard
(monitor `sendkey ctrl-alt-delete`) at the shell and during the boot
report, virtio-rng (/dev/hwrng) and virtio-net (ip, udhcpc, ping, nc with
QEMU's user-mode network), the ext4 root both as root=/dev/vda and through
the initramfs lks.root= hook, the built-in command line of the PVM kernel,
the bzImage, and the triple-fault reset path (reboot=t). (vsock needs a VMM
with a vsock device of its own: QEMU's needs /dev/vhost-vsock, which these
hosts lack; lks-vsock is checked with lockstep, see resources/README.md.)
"""
import os
import re
import socket
import sys
import threading
import time

import pexpect

CPU_FLAGS = "host,-smap,-xsave,-popcnt,-arch-capabilities"
CMDLINE = "console=ttyS0 reboot=k panic=-1"
# CONFIG_CMDLINE of the pvm kernel (resources/linux/config/pvm.config).
BUILTIN_CMDLINE = "noxsave clearcpuid=popcnt,smap i8042.noaux i8042.dumbkbd"
PROMPT = "lks# "
BOOT_TIMEOUT = 150


def manifest():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.environ.get("LOCKSTEP_CACHE", os.path.expanduser("~/.cache/lockstep")),
        "linux", "current", "manifest.env")
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                k, v = line.split("=", 1)
                env[k] = v
    return env


M = manifest()
RESULTS = []


class Guest:
    def __init__(self, name, kernel, initrd=None, disk=None, smp=1, cpu=CPU_FLAGS,
                 append=CMDLINE, i8042=True, trace=None, monitor=False, extra=()):
        self.name = name
        # acpi=off: this kernel has no ACPI, and only without ACPI does
        # microvm put its virtio-mmio devices on the kernel command line.
        args = ["120", "qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm",
                "-cpu", cpu, "-m", "256", "-smp", str(smp), "-nographic",
                "-no-reboot", "-kernel", kernel, "-append", append]
        if i8042:
            # QEMU's microvm has no keyboard controller unless asked for;
            # lockstep (like Firecracker) emulates its reset line.
            args += ["-device", "i8042"]
        if initrd:
            args += ["-initrd", initrd]
        if disk:
            args += ["-drive", f"id=d0,file={disk},format=raw,if=none,snapshot=on",
                     "-device", "virtio-blk-device,drive=d0"]
        self.monitor = None
        if monitor:
            # The QEMU monitor on a Unix socket, for `sendkey`.
            self.monitor = f"/tmp/lks-smoke-{name}.monitor"
            if os.path.exists(self.monitor):
                os.unlink(self.monitor)
            args += ["-monitor", f"unix:{self.monitor},server,nowait"]
        args += list(extra)
        self.trace = f"/tmp/lks-smoke-{name}.trace"
        if trace:
            # Trace lines go to a file: on the console they would split
            # the guest's output.
            args += ["-trace", trace, "-D", self.trace]
        self.log = open(f"/tmp/lks-smoke-{name}.log", "w")
        print(f"--- {name}: timeout {' '.join(args)}", flush=True)
        self.t0 = time.monotonic()
        self.p = pexpect.spawn("timeout", args, encoding="utf-8", codec_errors="replace",
                               timeout=BOOT_TIMEOUT, logfile=self.log)

    def expect(self, pattern, timeout=BOOT_TIMEOUT):
        self.p.expect(pattern, timeout=timeout)
        return self.p.match

    def report(self):
        """Wait for the report; return (dict of key=value, seconds to ready)."""
        rep = {}
        while True:
            self.p.expect(r"LKS-LINUX ([^\r\n]*)\r*\n", timeout=BOOT_TIMEOUT)
            line = self.p.match.group(1)
            if line == "ready":
                return rep, time.monotonic() - self.t0
            if "=" in line:
                k, v = line.split("=", 1)
                rep[k] = v

    def cmd(self, line, expect, timeout=30):
        self.p.sendline(line)
        self.p.expect(expect, timeout=timeout)
        self.p.expect_exact(PROMPT, timeout=timeout)

    def monitor_cmd(self, line):
        """One command to the QEMU monitor."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.monitor)
            s.recv(4096)  # the banner and prompt
            s.sendall(line.encode() + b"\n")
            time.sleep(0.5)

    def traced(self, pattern):
        with open(self.trace) as f:
            return re.search(pattern, f.read(), re.M) is not None

    def wait_exit(self, timeout=90):
        self.p.expect(pexpect.EOF, timeout=timeout)
        self.p.close()
        self.log.close()
        return self.p.exitstatus, time.monotonic() - self.t0


def check(name, cond, detail=""):
    RESULTS.append((name, bool(cond)))
    print(f"{'PASS' if cond else 'FAIL'} {name} {detail}", flush=True)


def run(name, fn):
    try:
        fn()
    except (pexpect.TIMEOUT, pexpect.EOF) as e:
        check(name, False, f"({type(e).__name__}; see /tmp/lks-smoke-*.log)")


def test_initramfs_smp2():
    g = Guest("initramfs-smp2", M["LINUX_VMLINUX_PVM"], initrd=M["LINUX_INITRAMFS"], smp=2,
              trace="pckbd_kbd_write_command")
    rep, t = g.report()
    check("smp2.report", rep.get("nproc") == "2" and rep.get("root") == "initramfs"
          and rep.get("kernel", "").endswith("-lockstep-pvm")
          and CMDLINE in rep.get("cmdline", "")
          and rep.get("image_id") == M["LINUX_CACHE_KEY"], f"{rep} ready after {t:.1f} s")
    g.p.expect_exact(PROMPT)
    g.cmd("echo hello-$((6*7))", "hello-42")
    g.cmd("cat /etc/lockstep-initramfs-id", M["LINUX_CACHE_KEY"])
    # Job control: a controlling tty, background jobs, ^C to the foreground.
    g.cmd("tty", "/dev/ttyS0")
    g.cmd("set -o | grep monitor", r"monitor +on")
    g.cmd("sleep 300 &", "sleep 300 &")
    g.cmd("jobs", r"\[1\]\+ +Running +sleep 300")
    g.p.sendline("sleep 200")
    time.sleep(3)
    g.p.sendcontrol("c")
    g.p.expect_exact(PROMPT, timeout=30)
    g.cmd("kill %1; wait %1; echo rc=$?", "rc=143")
    check("smp2.shell", True, "commands, jobs, ^C")
    g.p.sendline("reboot")
    g.p.expect_exact("LKS-LINUX reboot", timeout=60)
    rc, t2 = g.wait_exit()
    kbd = g.traced(r"pckbd_kbd_write_command (cmd )?0xfe")
    check("smp2.shell+reboot", rc == 0 and kbd,
          f"qemu exit {rc} after {t2:.1f} s, i8042 reset command 0xfe seen: {kbd}")


def test_initramfs_smp1():
    g = Guest("initramfs-smp1", M["LINUX_VMLINUX_PVM"], initrd=M["LINUX_INITRAMFS"], smp=1)
    rep, t = g.report()
    check("smp1.report", rep.get("nproc") == "1", f"nproc={rep.get('nproc')} ready after {t:.1f} s")
    g.p.expect_exact(PROMPT)
    g.cmd("uname -r", M["LINUX_RELEASE_PVM"])
    g.p.sendline("exit")
    g.p.expect_exact("LKS-LINUX reboot", timeout=60)
    rc, t2 = g.wait_exit()
    check("smp1.exit-resets", rc == 0, f"qemu exit {rc}")


def test_rootfs_direct():
    g = Guest("rootfs-direct", M["LINUX_VMLINUX_PVM"], disk=M["LINUX_ROOTFS"], smp=1,
              append=CMDLINE + " root=/dev/vda rw")
    rep, t = g.report()
    check("rootfs.root=/dev/vda", rep.get("root") == "ext4" and rep.get("block") == "vda"
          and rep.get("image_id") == M["LINUX_CACHE_KEY"], f"{rep} ready after {t:.1f} s")
    g.p.expect_exact(PROMPT)
    g.cmd("grep ' / ' /proc/mounts", r"/dev/root / ext4 rw")
    g.cmd("echo written > /root/x && cat /root/x", "written")
    g.p.sendline("poweroff")
    g.p.expect_exact("LKS-LINUX reboot", timeout=60)
    rc, _ = g.wait_exit()
    check("rootfs.poweroff-resets", rc == 0, f"qemu exit {rc}")


def test_rootfs_hook():
    g = Guest("rootfs-hook", M["LINUX_VMLINUX_PVM"], initrd=M["LINUX_INITRAMFS"],
              disk=M["LINUX_ROOTFS"], smp=1, append=CMDLINE + " lks.root=/dev/vda")
    rep1, _ = g.report()
    rep2, t = g.report()
    check("rootfs.lks.root-hook", rep1.get("root") == "initramfs" and rep2.get("root") == "ext4",
          f"root={rep1.get('root')} then root={rep2.get('root')}, ready after {t:.1f} s")
    g.p.expect_exact(PROMPT)
    g.cmd("ls /etc", "lockstep-rootfs-id")
    g.p.sendline("reboot")
    g.p.expect_exact("LKS-LINUX reboot", timeout=60)
    rc, _ = g.wait_exit()
    check("rootfs.hook-reboot", rc == 0, f"qemu exit {rc}")


def test_builtin_cmdline():
    g = Guest("builtin-cmdline", M["LINUX_VMLINUX_PVM"], initrd=M["LINUX_INITRAMFS"], smp=1,
              cpu="host,-arch-capabilities", append=CMDLINE + " lks.exit")
    rep, t = g.report()
    cl = rep.get("cmdline", "")
    check("builtin-cmdline.boots", cl.startswith(BUILTIN_CMDLINE + " ")
          and cl.endswith("lks.exit"), f"cmdline={cl!r} ready after {t:.1f} s")
    rc, _ = g.wait_exit()
    check("builtin-cmdline.lks.exit", rc == 0, f"qemu exit {rc}")


def test_bzimage():
    g = Guest("bzimage", M["LINUX_BZIMAGE_PVM"], initrd=M["LINUX_INITRAMFS"], smp=1,
              append=CMDLINE + " lks.exit")
    rep, t = g.report()
    check("bzimage.boots", rep.get("nproc") == "1", f"ready after {t:.1f} s")
    rc, _ = g.wait_exit()
    check("bzimage.exit", rc == 0, f"qemu exit {rc}")


def test_triple_fault():
    g = Guest("triple-fault", M["LINUX_VMLINUX_PVM"], initrd=M["LINUX_INITRAMFS"], smp=1,
              append="console=ttyS0 reboot=t panic=-1 lks.exit", i8042=False,
              trace="kvm_run_exit")
    g.report()
    rc, _ = g.wait_exit()
    shutdown = g.traced(r"kvm_run_exit cpu_index \d+, reason 8$")  # KVM_EXIT_SHUTDOWN
    check("reboot=t.triple-fault", rc == 0 and shutdown,
          f"qemu exit {rc}, KVM_EXIT_SHUTDOWN seen: {shutdown}")


def test_ctrl_alt_del():
    g = Guest("ctrl-alt-del", M["LINUX_VMLINUX_PVM"], initrd=M["LINUX_INITRAMFS"], smp=1,
              trace="pckbd_kbd_write_command", monitor=True)
    rep, t = g.report()
    check("cad.keyboard", rep.get("keyboard") == "AT Raw Set 2 keyboard",
          f"keyboard={rep.get('keyboard')!r}")
    g.p.expect_exact(PROMPT)
    t0 = time.monotonic()
    g.monitor_cmd("sendkey ctrl-alt-delete")
    g.p.expect_exact("LKS-LINUX ctrl-alt-del", timeout=60)
    t1 = time.monotonic() - t0
    g.p.expect_exact("LKS-LINUX reboot", timeout=60)
    rc, _ = g.wait_exit()
    kbd = g.traced(r"pckbd_kbd_write_command (cmd )?0xfe")
    check("cad.at-the-shell", rc == 0 and kbd,
          f"marker {t1:.1f} s after sendkey, qemu exit {rc} {time.monotonic() - t0:.1f} s "
          f"after it, i8042 reset 0xfe seen: {kbd}")


def test_ctrl_alt_del_during_report():
    # The /init script is PID 1 here (busybox init has not started): its
    # SIGINT trap does the same as busybox init's ctrlaltdel action.
    g = Guest("ctrl-alt-del-early", M["LINUX_VMLINUX_PVM"], initrd=M["LINUX_INITRAMFS"],
              smp=1, monitor=True)
    g.expect("LKS-LINUX nproc=")
    g.monitor_cmd("sendkey ctrl-alt-delete")
    g.p.expect_exact("LKS-LINUX ctrl-alt-del", timeout=60)
    g.p.expect_exact("LKS-LINUX reboot", timeout=60)
    rc, _ = g.wait_exit()
    check("cad.during-report", rc == 0, f"qemu exit {rc}")


def test_rng_and_network():
    # QEMU's user-mode network: DHCP server, gateway 10.0.2.2 (answers
    # ping itself), which forwards TCP to the host's loopback.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(120)
    port = srv.getsockname()[1]
    got = []

    def accept():
        try:
            c, _ = srv.accept()
            c.settimeout(60)
            data = b""
            while True:
                b = c.recv(4096)
                if not b:
                    break
                data += b
            got.append(data)
            c.close()
        except OSError:
            pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    g = Guest("rng-net", M["LINUX_VMLINUX_PVM"], initrd=M["LINUX_INITRAMFS"], smp=1,
              extra=["-object", "rng-random,filename=/dev/urandom,id=rng0",
                     "-device", "virtio-rng-device,rng=rng0",
                     "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"])
    rep, t = g.report()
    check("rng-net.report", rep.get("hwrng") == "virtio_rng.0" and rep.get("net") == "eth0",
          f"hwrng={rep.get('hwrng')} net={rep.get('net')}")
    g.p.expect_exact(PROMPT)
    g.cmd("head -c 16 /dev/hwrng | od -An -tx1", r"( [0-9a-f]{2}){16}")
    check("rng-net.hwrng", True, "16 bytes from /dev/hwrng")
    g.cmd("lks-vsock; echo rc=$?", "rc=2")
    check("rng-net.lks-vsock-present", True, "usage, exit 2")
    g.cmd("udhcpc -i eth0 -n -q -t 5 -T 2; echo dhcp=$?", r"dhcp=0", timeout=120)
    g.cmd("ip -4 addr show dev eth0", r"inet 10\.0\.2\.15/24")
    g.cmd("ip route", r"default via 10\.0\.2\.2")
    check("rng-net.udhcpc", True, "lease 10.0.2.15/24, default route")
    g.cmd("ping -c 2 -W 10 10.0.2.2", r"2 packets received", timeout=60)
    check("rng-net.ping", True, "2 replies from 10.0.2.2")
    g.cmd(f"echo from-the-guest | nc 10.0.2.2 {port}; echo nc=$?", r"nc=0", timeout=60)
    th.join(30)
    check("rng-net.nc", got == [b"from-the-guest\n"], f"host got {got}")
    # A static address as the tests on lockstep set one (here on a second
    # run of `ip`, after the lease).
    g.cmd("ip addr flush dev eth0; ip addr add 10.0.2.16/24 dev eth0; ip link set eth0 up; "
          "echo ip=$?", r"ip=0")
    g.cmd("ping -c 1 -W 10 10.0.2.2", r"1 packets received", timeout=60)
    check("rng-net.static-address", True, "ip addr add, ip link set up, ping")
    g.p.sendline("reboot")
    g.p.expect_exact("LKS-LINUX reboot", timeout=60)
    rc, _ = g.wait_exit()
    check("rng-net.reboot", rc == 0, f"qemu exit {rc}")
    srv.close()


TESTS = {
    "smp2": test_initramfs_smp2,
    "smp1": test_initramfs_smp1,
    "rootfs": test_rootfs_direct,
    "hook": test_rootfs_hook,
    "builtin": test_builtin_cmdline,
    "bzimage": test_bzimage,
    "triple": test_triple_fault,
    "cad": test_ctrl_alt_del,
    "cad-early": test_ctrl_alt_del_during_report,
    "rng-net": test_rng_and_network,
}

if __name__ == "__main__":
    only = os.environ.get("LKS_SMOKE", "").split()
    for key, fn in TESTS.items():
        if not only or key in only:
            run(key, fn)
    passed = sum(1 for _, ok in RESULTS if ok)
    print(f"{passed} passed, {len(RESULTS) - passed} failed")
    sys.exit(0 if passed == len(RESULTS) else 1)
