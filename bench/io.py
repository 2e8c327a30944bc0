#!/usr/bin/env python3
"""I/O benchmark: lockstep against QEMU's microvm on the same test guest, side by side.

Both VMMs run the test guest (tests/guest) with its own virtio-mmio drivers, found on the kernel
command line the same way, against the same backing file and the same kind of tap device (a tap in
a network namespace the benchmark creates, with the VMM process started inside it). The guest's
benchmark commands print `LKS bench start` and `LKS bench done` around the timed part; the host
timestamps those lines. Runs alternate between the VMMs; the table shows medians.

Rows: block sequential read and write (MiB/s, 1 MiB requests), 4 KiB random reads at queue depth
1 and 32 (requests/s), and the host's own read of the same file (the block ceiling); network
frames/s (64-byte payloads) and Gbit/s (1400-byte payloads), guest to host and host to guest.

Usage: bench/io.py [--runs N] [--json FILE] [--only block|net]   (bench/run.sh io builds first)
"""

import argparse
import json
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEM_MIB = 256
DISK_MIB = 1024
SEQ_MIB = 512
NS = "lksbench"
TAP = "lkstap0"
HOST_IP, GUEST_IP = "10.0.77.1", "10.0.77.2"
GUEST_MAC = "06:00:0a:00:4d:02"
TIMEOUT_S = 120


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Network:
    """A namespace with a persistent tap and the host side's address."""

    def __enter__(self):
        sh("ip", "netns", "del", NS, check=False)
        sh("ip", "netns", "add", NS)
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"],
                    ["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP],
                    ["ip", "link", "set", TAP, "up"]):
            sh("ip", "netns", "exec", NS, *cmd)
        return self

    def __exit__(self, *exc):
        sh("ip", "netns", "del", NS, check=False)

    @staticmethod
    def counter(name):
        out = sh("ip", "netns", "exec", NS, "cat", f"/sys/class/net/{TAP}/statistics/{name}")
        return int(out.stdout)


def lockstep_cmd(binary, image, disk, net, script, workdir):
    cfg = {"boot-source": {"kernel_image_path": image,
                           "boot_args": f"lks.mode=run lks.ip={GUEST_IP}/24 lks.run=\"{script}\""},
           "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB}}
    if disk:
        cfg["drives"] = [{"drive_id": "bench", "path_on_host": disk, "is_root_device": False}]
    if net:
        cfg["network-interfaces"] = [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC}]
    path = os.path.join(workdir, "vm.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return [binary, "run", path]


def qemu_cmd(image, disk, net, script):
    cmd = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off,ioapic2=off",
           "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", str(MEM_MIB), "-smp", "1",
           "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
           "-global", "virtio-mmio.force-legacy=false", "-kernel", image,
           "-append", f"lks.mode=run lks.ip={GUEST_IP}/24 lks.run=\"{script}\""]
    if disk:
        cmd += ["-drive", f"id=d0,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=d0"]
    if net:
        cmd += ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}"]
    return cmd


def run_guest(cmd, in_netns, on_start=None):
    """Runs a VM until `LKS run done`; returns (start_ns, done_ns, done_line)."""
    if in_netns:
        cmd = ["ip", "netns", "exec", NS] + cmd
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, start_ns, done_ns, done_line = b"", None, None, None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout, proc.stderr], [], [], 0.5)
            for stream in ready:
                chunk = os.read(stream.fileno(), 65536)
                now = time.monotonic_ns()
                if stream is proc.stderr:
                    continue
                out += chunk
                if start_ns is None and b"LKS bench start" in out:
                    start_ns = now
                    if on_start:
                        on_start()
                m = re.search(rb"LKS bench done [^\r\n]*", out)
                if done_ns is None and m and out.find(b"\n", m.end() - 1) >= 0:
                    done_ns, done_line = now, m.group(0).decode()
                if b"LKS run done" in out:
                    return start_ns, done_ns, done_line
            if proc.poll() is not None:
                break
        raise RuntimeError(f"{cmd[0]}: benchmark did not finish\n{out[-3000:].decode(errors='replace')}")
    finally:
        proc.kill()
        proc.wait()


def field(line, name):
    m = re.search(rf"\b{name}=(\S+)", line)
    return m.group(1) if m else None


def host_read_mib_s(path):
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(1 << 20)
    t0 = time.monotonic()
    total = 0
    while True:
        n = os.readv(fd, [buf])
        if n == 0:
            break
        total += n
    dt = time.monotonic() - t0
    os.close(fd)
    return total / (1 << 20) / dt


class Blaster(threading.Thread):
    """Sends numbered UDP test payloads to the guest until stopped (for host-to-guest rows)."""

    def __init__(self, size):
        super().__init__(daemon=True)
        self.size, self.stop = size, threading.Event()

    def run(self):
        # The sender lives in the benchmark's namespace through setns by way of `ip netns exec`.
        # One payload in the test guest's UDP test format (magic, sequence number, FNV-1a 64 of
        # the data), so that the guest checks every datagram it counts.
        code = (
            "import socket,struct,sys,time\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"d=bytes(i % 256 for i in range({self.size - 16}))\n"
            "h=0xcbf29ce484222325\n"
            "for b in d: h=((h^b)*0x100000001b3)&0xffffffffffffffff\n"
            "p=b'LKS1'+struct.pack('<IQ',0,h)+d\n"
            f"a=('{GUEST_IP}',7000)\n"
            "end=time.monotonic()+60\n"
            "while time.monotonic()<end:\n"
            "    for _ in range(1000):\n"
            "        try: s.sendto(p,a)\n"
            "        except OSError: pass\n")
        self.proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", code])
        self.stop.wait()
        self.proc.kill()
        self.proc.wait()


def block_rows(vmms, image, disk):
    rows = {}
    plans = [("seq_read_mib_s", f"bench blk-seq-read 0 {SEQ_MIB}", "MiB/s"),
             ("seq_write_mib_s", f"bench blk-seq-write 0 {SEQ_MIB}", "MiB/s"),
             ("rand_read_qd1_iops", "bench blk-rand-read 0 20000 1", "req/s"),
             ("rand_read_qd32_iops", "bench blk-rand-read 0 200000 32", "req/s")]
    for key, script, _ in plans:
        for name, make in vmms:
            start, done, line = run_guest(make(disk, False, script), in_netns=False)
            if field(line, "status") != "ok":
                raise RuntimeError(f"{name} {key}: {line}")
            secs = (done - start) / 1e9
            value = int(field(line, "bytes")) / (1 << 20) / secs if "mib" in key else int(field(line, "ops")) / secs
            rows.setdefault(key, {}).setdefault(name, []).append(value)
    return rows


def net_rows(vmms):
    rows = {}
    # Frames per run: guest-to-host runs are the faster, so they send more to last about as long
    # (a second or more, so that timing the guest's start and done lines adds little noise).
    for size, tag, tx_frames, rx_frames in ((64, "small", 1000000, 200000), (1400, "large", 300000, 100000)):
        for name, make in vmms:
            # Guest to host: frames the tap delivered to the host during the timed window.
            before = Network.counter("rx_packets")
            start, done, line = run_guest(make(None, True, f"bench net-tx {HOST_IP} 9 {tx_frames} {size}"), in_netns=True)
            got = Network.counter("rx_packets") - before
            secs = (done - start) / 1e9
            sent = int(field(line, "ops"))
            rows.setdefault(f"g2h_{tag}_fps", {}).setdefault(name, []).append(min(got, sent) / secs)
            rows.setdefault(f"g2h_{tag}_gbps", {}).setdefault(name, []).append(min(got, sent) * size * 8 / secs / 1e9)
            # Host to guest: the guest counts what arrives in its window.
            blaster = Blaster(size)
            try:
                start, done, line = run_guest(make(None, True, f"bench net-rx 7000 {rx_frames}"), in_netns=True,
                                              on_start=blaster.start)
            finally:
                blaster.stop.set()
                if blaster.is_alive():
                    blaster.join()
            if field(line, "status") != "ok" or int(field(line, "ops")) == 0 or field(line, "bad") != "0":
                raise RuntimeError(f"{name} host-to-guest {tag}: {line}")
            count, us = int(field(line, "ops")), int(field(line, "us"))
            rows.setdefault(f"h2g_{tag}_fps", {}).setdefault(name, []).append(count / (us / 1e6))
            rows.setdefault(f"h2g_{tag}_gbps", {}).setdefault(name, []).append(count * size * 8 / (us / 1e6) / 1e9)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=["block", "net"])
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench", "io.json"))
    ap.add_argument("--lockstep", default=os.path.join(ROOT, "target", "release", "lockstep"))
    ap.add_argument("--image", default=os.path.join(ROOT, "target", "guest-images", "guest.elf"))
    args = ap.parse_args()
    if not shutil.which("qemu-system-x86_64"):
        sys.exit("io.py: qemu-system-x86_64 is required")

    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        disk = os.path.join(workdir, "disk.img")
        with open(disk, "wb") as f:
            for _ in range(DISK_MIB):
                f.write(os.urandom(1 << 20))
        vmms = [("lockstep", lambda d, n, s: lockstep_cmd(args.lockstep, args.image, d, n, s, workdir)),
                ("qemu-microvm", lambda d, n, s: qemu_cmd(args.image, d, n, s))]
        rows = {}
        for run in range(args.runs):
            if args.only != "net":
                rows.setdefault("host_read_mib_s", {}).setdefault("host", []).append(host_read_mib_s(disk))
                for k, v in block_rows(vmms, args.image, disk).items():
                    for name, vals in v.items():
                        rows.setdefault(k, {}).setdefault(name, []).extend(vals)
            if args.only != "block":
                with Network():
                    for k, v in net_rows(vmms).items():
                        for name, vals in v.items():
                            rows.setdefault(k, {}).setdefault(name, []).extend(vals)
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    med = {k: {n: statistics.median(v) for n, v in per.items()} for k, per in rows.items()}
    labels = [("seq_read_mib_s", "block sequential read, 1 MiB requests", "MiB/s"),
              ("seq_write_mib_s", "block sequential write, 1 MiB requests", "MiB/s"),
              ("rand_read_qd1_iops", "block 4 KiB random read, QD 1", "req/s"),
              ("rand_read_qd32_iops", "block 4 KiB random read, QD 32", "req/s"),
              ("g2h_small_fps", "net guest to host, 64 B payloads", "frames/s"),
              ("g2h_large_gbps", "net guest to host, 1400 B payloads", "Gbit/s"),
              ("h2g_small_fps", "net host to guest, 64 B payloads", "frames/s"),
              ("h2g_large_gbps", "net host to guest, 1400 B payloads", "Gbit/s")]
    print(f"\nI/O benchmark: test guest, 1 vCPU, {MEM_MIB} MiB; median of {args.runs} runs each\n")
    print("| metric | lockstep | QEMU microvm | lockstep / QEMU |")
    print("|---|---|---|---|")
    for key, label, unit in labels:
        if key not in med:
            continue
        a, b = med[key].get("lockstep"), med[key].get("qemu-microvm")
        fmt = (lambda v: f"{v:.2f}") if unit == "Gbit/s" else (lambda v: f"{v:,.0f}")
        print(f"| {label} | {fmt(a)} {unit} | {fmt(b)} {unit} | {a / b:.2f}x |")
    if "host_read_mib_s" in med:
        ceiling = med["host_read_mib_s"]["host"]
        print(f"| host's own read of the same file (ceiling) | {ceiling:,.0f} MiB/s | | |")
        print(f"\nlockstep sequential read / host ceiling: {med['seq_read_mib_s']['lockstep'] / ceiling:.2f}x")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"runs": args.runs, "median": med, "raw": rows}, f, indent=2)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
