#!/usr/bin/env python3
"""Boot benchmark: lockstep against QEMU's microvm, side by side, on the same test guest.

For each run it measures, from the moment the VMM process is spawned:
  * ready: until the test guest prints its ready marker ("LKS ready") on the serial console;
  * first entry: until the first vCPU enters the guest (lockstep's boot_timer log line; QEMU's
    first KVM_RUN from its kvm_vcpu_ioctl trace event);
  * VMM overhead: the process's RSS minus the RSS of the guest-memory mapping, sampled once the
    guest is ready and halted.
Runs alternate between the VMMs so that machine noise hits both alike. Prints a table of medians
and writes JSON.

Usage: bench/boot.py [--runs N] [--json FILE]   (after `cargo build --release` and
tests/guest/build.sh; `bench/run.sh boot` does both)
"""

import argparse
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MEM_MIB = 128
BOOT_ARGS = "lks.mode=halt"
READY = b"LKS ready"
TIMEOUT_S = 20


def spawn(cmd, env=None):
    t0_mono = time.monotonic_ns()
    t0_real = time.time_ns()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    return proc, t0_mono, t0_real


def wait_ready(proc):
    """Reads stdout and stderr until the ready marker; returns (ready_ns_monotonic, stderr)."""
    out, err = b"", b""
    deadline = time.monotonic() + TIMEOUT_S
    fds = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
    while time.monotonic() < deadline:
        ready, _, _ = select.select(list(fds), [], [], 0.5)
        for fd in ready:
            chunk = os.read(fd, 65536)
            now = time.monotonic_ns()
            if fds[fd] == "out":
                out += chunk
                if READY in out:
                    return now, err
            else:
                err += chunk
        if proc.poll() is not None:
            break
    raise RuntimeError(f"no ready marker within {TIMEOUT_S}s\nstdout: {out[-2000:]!r}\nstderr: {err[-2000:]!r}")


def drain_stderr(proc, err, until_pred, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until_pred(err):
        ready, _, _ = select.select([proc.stderr.fileno()], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            err += chunk
    return err


def overhead_kib(pid, guest_mib):
    """RSS of the process minus the RSS of mappings at least as large as guest memory."""
    total, guest = 0, 0
    size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
                total += rss
                if size is not None and size >= guest_mib * 1024:
                    guest += rss
    return total - guest, guest


def stop(proc):
    proc.kill()
    proc.wait()


def run_lockstep(binary, image, workdir):
    cfg = os.path.join(workdir, "vm.json")
    with open(cfg, "w") as f:
        json.dump({"boot-source": {"kernel_image_path": image, "boot_args": BOOT_ARGS},
                   "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB}}, f)
    env = dict(os.environ, LOCKSTEP_LOG="warn,boot_timer=debug")
    proc, t0, _ = spawn([binary, "run", cfg], env)
    try:
        ready_ns, err = wait_ready(proc)
        err = drain_stderr(proc, err, lambda e: b"first vCPU entry" in e)
        m = re.search(rb"first vCPU entry at CLOCK_MONOTONIC (\d+) ns", err)
        entry_ms = (int(m.group(1)) - t0) / 1e6 if m else None
        time.sleep(0.2)
        vmm_kib, guest_kib = overhead_kib(proc.pid, MEM_MIB)
        return {"ready_ms": (ready_ns - t0) / 1e6, "first_entry_ms": entry_ms,
                "overhead_kib": vmm_kib, "guest_rss_kib": guest_kib}
    finally:
        stop(proc)


def run_qemu(image):
    cmd = ["qemu-system-x86_64", "-msg", "timestamp=on", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off",
           "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", str(MEM_MIB), "-smp", "1",
           "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
           "-kernel", image, "-append", BOOT_ARGS, "-trace", "kvm_vcpu_ioctl"]
    proc, t0, t0_real = spawn(cmd)
    try:
        ready_ns, err = wait_ready(proc)
        # log trace backend: "<pid>@<sec>.<usec>:kvm_vcpu_ioctl cpu_index 0, type 0xae80, arg (nil)"
        pat = rb"@(\d+)\.(\d+):kvm_vcpu_ioctl cpu_index \d+, type 0xae80"
        err = drain_stderr(proc, err, lambda e: re.search(pat, e) is not None)
        m = re.search(pat, err)
        entry_ms = None
        if m:
            entry_real_ns = int(m.group(1)) * 10**9 + int(m.group(2)) * 1000
            entry_ms = (entry_real_ns - t0_real) / 1e6
        time.sleep(0.2)
        vmm_kib, guest_kib = overhead_kib(proc.pid, MEM_MIB)
        return {"ready_ms": (ready_ns - t0) / 1e6, "first_entry_ms": entry_ms,
                "overhead_kib": vmm_kib, "guest_rss_kib": guest_kib}
    finally:
        stop(proc)


def median(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", default=os.path.join(root, "target", "bench", "boot.json"))
    ap.add_argument("--lockstep", default=os.path.join(root, "target", "release", "lockstep"))
    ap.add_argument("--image", default=os.path.join(root, "target", "guest-images", "guest.elf"))
    args = ap.parse_args()
    if not shutil.which("qemu-system-x86_64"):
        sys.exit("boot.py: qemu-system-x86_64 is required (apt-get install qemu-system-x86)")

    results = {"lockstep": [], "qemu-microvm": []}
    with tempfile.TemporaryDirectory() as workdir:
        for i in range(args.runs):
            results["lockstep"].append(run_lockstep(args.lockstep, args.image, workdir))
            results["qemu-microvm"].append(run_qemu(args.image))
            print(f"run {i + 1}/{args.runs}: lockstep {results['lockstep'][-1]['ready_ms']:.1f} ms, "
                  f"qemu {results['qemu-microvm'][-1]['ready_ms']:.1f} ms", file=sys.stderr)

    summary = {vmm: {k: median(runs, k) for k in ("ready_ms", "first_entry_ms", "overhead_kib")}
               for vmm, runs in results.items()}
    ls, qm = summary["lockstep"], summary["qemu-microvm"]
    fmt = lambda v, unit: "n/a" if v is None else f"{v:.1f} {unit}"
    print(f"\nBoot benchmark: test guest (PVH ELF, 1 vCPU, {MEM_MIB} MiB), median of {args.runs} runs each\n")
    print(f"| metric | lockstep | QEMU microvm | lockstep / QEMU |")
    print(f"|---|---|---|---|")
    for key, label, unit, scale in (("ready_ms", "process start to guest ready marker", "ms", 1),
                                    ("first_entry_ms", "process start to first vCPU entry", "ms", 1),
                                    ("overhead_kib", "VMM memory overhead (RSS - guest RSS)", "MiB", 1 / 1024)):
        a = ls[key] * scale if ls[key] is not None else None
        b = qm[key] * scale if qm[key] is not None else None
        ratio = f"{a / b:.2f}x" if a is not None and b else "n/a"
        print(f"| {label} | {fmt(a, unit)} | {fmt(b, unit)} | {ratio} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"mem_mib": MEM_MIB, "runs": args.runs, "summary": summary, "raw": results}, f, indent=2)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
