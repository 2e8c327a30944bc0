#!/usr/bin/env python3
"""Live-migration benchmark: lockstep against QEMU, side by side, on the same test guest.

Each run migrates one guest between two VMM processes on this machine over loopback TCP, the
guest running the test guest's `counter 10` (a line every 10 ms with the KVM clock and the TSC) or
`memdirty` (rewriting a 256 MiB block at a set rate, with the same lines every 10 ms). Rows: an
idle 512 MiB and an idle 2 GiB guest, and a 512 MiB guest dirtying 50 and 200 MiB/s (with
auto-converge at 200). Figures per row, medians of --runs each, runs alternating between the VMMs:

  * downtime: source paused to destination running. lockstep: the migration's `downtime_ms`
    (measured by the source from its pause to the destination's Running). QEMU: the larger of its
    own `downtime` (source side, from before its vCPUs stop to its last byte sent) and the time
    from the STOP event of the source's QMP to the RESUME event of the destination's (timestamped
    by QEMU; STOP comes once the vCPUs have stopped): each misses a part of the pause. Both are
    in the JSON;
  * guest gap: the longest interval between the guest's consecutive lines around the switch (two
    lines either side), minus the 10 ms interval, by the KVM clock the guest prints and by its
    TSC (both VMMs restore the KVM clock, so it does not count the whole pause; on a PVM host the
    guest's TSC is the host's and does);
  * total time: migration request to completion (lockstep's `elapsed_ms`, QEMU's `total-time`);
  * bytes on the wire (lockstep's `bytes`, QEMU's `ram.transferred`) and rounds (lockstep's last
    `round` + 1: rounds 0 to the switch's; QEMU's `ram.dirty-sync-count`, its last sync being
    the switch's);
  * console lines lost: `counter` lines the guest printed that are in neither log (QEMU's serial
    can drop what is in flight at the switch);
  * the dirty rate the VMM measured in its last pre-copy round (lockstep's `dirty_rate_mib_s`,
    QEMU's `dirty-pages-rate` times the page size, which QEMU measures over whole seconds: n/a for
    shorter migrations), and the rate the guest itself achieved in its last 200 ms before the
    pause (`memdirty`'s `dirtied_kib=` on its lines): on a 2-core machine the guest's vCPU shares
    the cores with both VMMs' migration threads, so it may dirty less than it asks for.

Both VMMs get the same downtime budget (--budget-ms, 20 by default, lockstep's default; QEMU's
`downtime-limit`) and no bandwidth cap (QEMU's `max-bandwidth` is raised from its 128 MiB/s
default). QEMU runs -M microvm with the test guest's ELF by -kernel (PVH).

Same-host rows (--same-host): lockstep over a Unix socket, idle 512 MiB and 2 GiB; they measure
whatever the host does for a Unix-socket destination (today memory is copied as over TCP; the
memfd path, once it lands, is meant to make them flat).

Usage: bench/migrate.py [--runs N] [--budget-ms MS] [--tick-ms MS] [--same-host] [--only ROW,...]
                        [--no-qemu] [--json FILE]
(bench/run.sh migrate builds first)
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK_MS = 10  # default of --tick-ms
DIRTY_BLOCK_MIB = 256
WAIT_S = 120

# key, label, guest MiB, script, auto-converge, transport
ROWS = [
    ("idle512", "idle, 512 MiB", 512, "counter {tick}", False, "tcp"),
    ("idle2g", "idle, 2 GiB", 2048, "counter {tick}", False, "tcp"),
    ("dirty50", "dirtying 50 MiB/s, 512 MiB", 512,
     f"memdirty {DIRTY_BLOCK_MIB} 50 3600 {{tick}}", False, "tcp"),
    ("dirty200", "dirtying 200 MiB/s, 512 MiB, auto-converge", 512,
     f"memdirty {DIRTY_BLOCK_MIB} 200 3600 {{tick}}", True, "tcp"),
]
SAME_HOST_ROWS = [
    ("samehost512", "same host (Unix socket), idle, 512 MiB", 512, "counter {tick}", False, "unix"),
    ("samehost2g", "same host (Unix socket), idle, 2 GiB", 2048, "counter {tick}", False, "unix"),
]


def boot_args(script, tick_ms):
    return 'lks.mode=halt lks.run="' + script.format(tick=tick_ms) + '"'


# ---- the guest's lines -------------------------------------------------------------------------

def counter_lines(text):
    """(n, ns, tsc) of every complete `LKS counter=` line."""
    out = []
    for line in text.replace("\r", "").split("\n"):
        if not line.startswith("LKS counter="):
            continue
        fields = dict(w.split("=", 1) for w in line[4:].split() if "=" in w)
        try:
            out.append((int(fields["counter"]), int(fields["ns"]), int(fields["tsc"])))
        except (KeyError, ValueError):
            continue
    return out


def guest_dirty_rate(before, window_ns=200_000_000):
    """MiB/s the guest rewrote in its last `window_ns` on the source (inside the migration), from
    `memdirty`'s `dirtied_kib=` on its counter lines; None for other guests."""
    points = []
    for line in before.replace("\r", "").split("\n"):
        fields = dict(w.split("=", 1) for w in line[4:].split() if "=" in w) if line.startswith("LKS counter=") else {}
        if "dirtied_kib" in fields and fields.get("ns", "none").isdigit():
            points.append((int(fields["ns"]), int(fields["dirtied_kib"])))
    if len(points) < 2:
        return None
    end_ns, end_kib = points[-1]
    start_ns, start_kib = next(p for p in points if p[0] >= end_ns - window_ns)
    if end_ns <= start_ns:
        return None
    return (end_kib - start_kib) / 1024 / ((end_ns - start_ns) / 1e9)


def guest_gap(before, after, tick_ms):
    """The guest's gap at the switch, ms, by its KVM clock and by its TSC, and how many of its
    lines never arrived: the longest interval between consecutive lines among the two either side
    of where the destination's log starts, minus the ticks it spans. `before` and `after` are the
    source's and destination's logs (a line cut at the switch is whole when they are joined; a
    line lost at the switch makes the interval span two ticks)."""
    lines = counter_lines(before + after)
    first_after = counter_lines(after)
    if len(lines) < 6 or not first_after:
        return None, None, None
    numbers = [n for n, _, _ in lines]
    if any(b <= a for a, b in zip(numbers, numbers[1:])):
        raise RuntimeError(f"the guest's counter went back or repeated: {numbers}")
    lost = sum(b - a - 1 for a, b in zip(numbers, numbers[1:]))
    switch = numbers.index(first_after[0][0])
    # TSC ticks per KVM-clock ns, from every interval.
    rates = [(t2 - t1) / (s2 - s1) for (_, s1, t1), (_, s2, t2) in zip(lines, lines[1:]) if s2 > s1 and t2 > t1]
    tsc_per_ns = statistics.median(rates) if rates else None
    window = lines[max(0, switch - 2):switch + 3]
    pairs = list(zip(window, window[1:]))
    ns_gap = max((b[1] - a[1]) / 1e6 - (b[0] - a[0]) * tick_ms for a, b in pairs)
    tsc_gap = None
    if tsc_per_ns:
        tsc_gap = max((b[2] - a[2]) / tsc_per_ns / 1e6 - (b[0] - a[0]) * tick_ms for a, b in pairs)
    return max(ns_gap, 0.0), (max(tsc_gap, 0.0) if tsc_gap is not None else None), lost


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_ready(read_log, dirty, timeout=WAIT_S):
    """Waits until the guest has ticked 30 times (after its first fill, for `memdirty`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = read_log()
        if dirty:
            at = text.find("LKS memdirty start")
            text = text[at:] if at >= 0 else ""
        if len(counter_lines(text)) >= 30:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the guest did not get going: {read_log()[-500:]!r}")


# ---- lockstep ----------------------------------------------------------------------------------

class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=600)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


class Host:
    """A `lockstep host` with its control socket and state folder."""

    def __init__(self, binary, work, tag):
        self.dir = os.path.join(work, tag)
        os.makedirs(self.dir)
        self.api = os.path.join(self.dir, "api.sock")
        self.state = os.path.join(self.dir, "state")
        config = os.path.join(self.dir, "host.json")
        with open(config, "w") as f:
            json.dump({"api_socket": self.api, "state_dir": self.state}, f)
        self.proc = subprocess.Popen([binary, "host", "--config", config], stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "host.log"), "w"),
                                     env=dict(os.environ, LOCKSTEP_LOG=os.environ.get("LOCKSTEP_LOG", "warn")))
        deadline = time.time() + 30
        while not os.path.exists(self.api):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"lockstep host {tag} did not start: {read(os.path.join(self.dir, 'host.log'))}")
            time.sleep(0.02)
        self.conn = UnixConnection(self.api)

    def call(self, method, path, body=None, ok=True):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers=headers)
        reply = self.conn.getresponse()
        payload = reply.read()
        if ok and reply.status >= 300:
            raise RuntimeError(f"{method} {path}: {reply.status} {payload[:500]!r}")
        return json.loads(payload) if payload else None

    def serial(self, name):
        return read(os.path.join(self.state, name, "serial.log"))

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def run_lockstep(image, source, destination, work, row, run, budget_ms, tick_ms):
    key, _, mib, script, converge, transport = row
    name = f"{key}-{run}"
    config = {"name": name, "boot-source": {"kernel_image_path": image, "boot_args": boot_args(script, tick_ms)},
              "machine-config": {"vcpu_count": 1, "mem_size_mib": mib}}
    source.call("POST", "/v1/vms?start=true", config)
    try:
        wait_ready(lambda: source.serial(name), script.startswith("memdirty"))
        listen = "127.0.0.1:0" if transport == "tcp" else f"unix:{os.path.join(work, name + '.sock')}"
        incoming = destination.call("POST", "/v1/migrations/incoming", {"listen": listen, "name": name})
        request = {"destination": incoming["listen"], "token": incoming["token"], "downtime_ms": budget_ms,
                   "auto_converge": converge}
        mid = source.call("POST", f"/v1/vms/{name}/migrate", request)["id"]
        deadline = time.time() + WAIT_S
        while True:
            info = source.call("GET", f"/v1/migrations/{mid}")
            if info["phase"] in ("completed", "failed", "cancelled"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"{name}: the migration did not end: {info}")
            time.sleep(0.005)
        if info["phase"] != "completed":
            raise RuntimeError(f"{name}: the migration {info['phase']}: {info.get('error')}")
        # A few lines on the destination, for the gap.
        deadline = time.time() + 10
        while len(counter_lines(destination.serial(name))) < 5 and time.time() < deadline:
            time.sleep(0.02)
        ns_gap, tsc_gap, lost = guest_gap(source.serial(name), destination.serial(name), tick_ms)
        return {"downtime_ms": info["downtime_ms"], "gap_kvmclock_ms": ns_gap, "gap_tsc_ms": tsc_gap,
                "lines_lost": lost,
                "total_ms": info["elapsed_ms"], "bytes": info["bytes"],
                # Rounds 0..=round: the last (the switch's) counted, as QEMU's last sync is.
                "rounds": info["round"] + 1, "dirty_rate_mib_s": info["dirty_rate_mib_s"],
                "guest_dirty_mib_s": guest_dirty_rate(source.serial(name)),
                "throttle_percent": info["throttle_percent"]}
    finally:
        # Wherever the VM is now (errors from the host that has none are ignored).
        for host in (source, destination):
            host.call("POST", f"/v1/vms/{name}/shutdown", {"force": True}, ok=False)
            host.call("DELETE", f"/v1/vms/{name}", ok=False)


# ---- QEMU --------------------------------------------------------------------------------------

class Qmp:
    """A QMP connection that keeps the events it reads."""

    def __init__(self, path, proc):
        deadline = time.time() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"no QMP socket at {path}")
                time.sleep(0.02)
        self.file = self.sock.makefile("rw")
        self.events = []
        self.file.readline()
        self.cmd("qmp_capabilities")

    def _message(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        message = json.loads(line)
        if "event" in message:
            self.events.append(message)
        return message

    def cmd(self, name, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        while True:
            message = self._message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise RuntimeError(f"QMP {name}: {message['error']}")

    def wait_event(self, name, timeout=10):
        self.sock.settimeout(timeout)
        try:
            while not any(e["event"] == name for e in self.events):
                self._message()
        finally:
            self.sock.settimeout(None)
        event = next(e for e in self.events if e["event"] == name)
        return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


def qemu(image, mib, script, work, tag, extra, tick_ms):
    cmd = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-enable-kvm",
           "-cpu", "host,-arch-capabilities", "-m", str(mib), "-smp", "1", "-nodefaults", "-no-user-config",
           "-display", "none", "-no-reboot", "-serial", f"file:{os.path.join(work, tag + '.log')}",
           "-kernel", image, "-append", boot_args(script, tick_ms),
           "-qmp", f"unix:{os.path.join(work, tag + '.qmp')},server=on,wait=off"] + extra
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, tag + ".err"), "w"))
    return proc, Qmp(os.path.join(work, tag + ".qmp"), proc)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_qemu(image, work, row, run, budget_ms, tick_ms):
    key, _, mib, script, converge, _ = row
    src_tag, dst_tag = f"q{key}-{run}-src", f"q{key}-{run}-dst"
    port = free_port()
    procs = []
    try:
        src, src_qmp = qemu(image, mib, script, work, src_tag, [], tick_ms)
        procs.append(src)
        dst, dst_qmp = qemu(image, mib, script, work, dst_tag, ["-incoming", f"tcp:127.0.0.1:{port}"], tick_ms)
        procs.append(dst)
        src_log = os.path.join(work, src_tag + ".log")
        dst_log = os.path.join(work, dst_tag + ".log")
        wait_ready(lambda: read(src_log), script.startswith("memdirty"))
        src_qmp.cmd("migrate-set-parameters", **{"downtime-limit": budget_ms, "max-bandwidth": 1 << 40})
        if converge:
            src_qmp.cmd("migrate-set-capabilities",
                        capabilities=[{"capability": "auto-converge", "state": True}])
        src_qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.time() + WAIT_S
        dirty_rate = None
        while True:
            info = src_qmp.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            # The last rate measured while it ran (it reads 0 once completed).
            ram = info.get("ram", {})
            if ram.get("dirty-pages-rate"):
                dirty_rate = ram["dirty-pages-rate"] * ram.get("page-size", 4096) / 2**20
            if time.time() > deadline:
                raise RuntimeError(f"QEMU {key}: the migration did not end: {info}")
            time.sleep(0.005)
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU {key}: the migration {info['status']}: {info.get('error-desc')}")
        stopped = src_qmp.wait_event("STOP")
        resumed = dst_qmp.wait_event("RESUME")
        deadline = time.time() + 10
        while len(counter_lines(read(dst_log))) < 5 and time.time() < deadline:
            time.sleep(0.02)
        ns_gap, tsc_gap, lost = guest_gap(read(src_log), read(dst_log), tick_ms)
        events_ms = (resumed - stopped) * 1e3
        return {"downtime_ms": max(events_ms, info.get("downtime", 0)), "stop_to_resume_ms": events_ms,
                "qemu_downtime_ms": info.get("downtime"),
                "gap_kvmclock_ms": ns_gap, "gap_tsc_ms": tsc_gap, "lines_lost": lost,
                "total_ms": info["total-time"],
                "bytes": info["ram"]["transferred"], "rounds": info["ram"]["dirty-sync-count"],
                "dirty_rate_mib_s": dirty_rate, "guest_dirty_mib_s": guest_dirty_rate(read(src_log)),
                "throttle_percent": info.get("cpu-throttle-percentage", 0)}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# ---- the table ---------------------------------------------------------------------------------

# key, label, format, whether the lockstep / QEMU ratio means something (the guest's gap does not:
# a pause shorter than what is left of the tick interval does not show in it, so either VMM's
# median can be 0)
METRICS = [
    ("downtime_ms", "downtime (pause to running)", lambda v: f"{v:.1f} ms", True),
    ("gap_kvmclock_ms", "guest gap, KVM clock", lambda v: f"{v:.1f} ms", False),
    ("gap_tsc_ms", "guest gap, TSC", lambda v: f"{v:.1f} ms", False),
    ("total_ms", "total time", lambda v: f"{v:.0f} ms", True),
    ("bytes", "bytes on the wire", lambda v: f"{v / 2**20:.1f} MiB", True),
    ("rounds", "rounds", lambda v: f"{v:g}", False),
    ("lines_lost", "guest console lines lost at the switch (sum of the runs)", lambda v: f"{v:g}", False),
    ("dirty_rate_mib_s", "dirty rate the VMM measured (last round)", lambda v: f"{v:.0f} MiB/s", False),
    ("guest_dirty_mib_s", "guest's own dirty rate, its last 200 ms before the pause", lambda v: f"{v:.0f} MiB/s",
     False),
]


def median(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget-ms", type=int, default=20)
    ap.add_argument("--tick-ms", type=int, default=TICK_MS, help="the guest's line interval")
    ap.add_argument("--same-host", action="store_true", help="add lockstep's Unix-socket rows")
    ap.add_argument("--only", help="comma-separated row keys: " + ",".join(r[0] for r in ROWS + SAME_HOST_ROWS))
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench", "migrate.json"))
    ap.add_argument("--lockstep", default=os.path.join(ROOT, "target", "release", "lockstep"))
    ap.add_argument("--image", default=os.path.join(ROOT, "target", "guest-images", "guest.elf"))
    args = ap.parse_args()
    if not args.no_qemu and not shutil.which("qemu-system-x86_64"):
        sys.exit("migrate.py: qemu-system-x86_64 is required (scripts/setup-host.sh installs it)")
    rows = ROWS + (SAME_HOST_ROWS if args.same_host else [])
    if args.only:
        wanted = args.only.split(",")
        rows = [r for r in ROWS + SAME_HOST_ROWS if r[0] in wanted]

    results = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        source = Host(args.lockstep, work, "source")
        destination = Host(args.lockstep, work, "destination")
        try:
            for row in rows:
                key = row[0]
                results[key] = {"lockstep": [], "qemu": []}
                for i in range(args.runs):
                    ls = run_lockstep(args.image, source, destination, work, row, i, args.budget_ms, args.tick_ms)
                    results[key]["lockstep"].append(ls)
                    line = f"{key} run {i + 1}/{args.runs}: lockstep {ls['downtime_ms']:.1f} ms down, {ls['total_ms']:.0f} ms"
                    if row[5] == "tcp" and not args.no_qemu:
                        qm = run_qemu(args.image, work, row, i, args.budget_ms, args.tick_ms)
                        results[key]["qemu"].append(qm)
                        line += f"; QEMU {qm['downtime_ms']:.1f} ms down, {qm['total_ms']:.0f} ms"
                    print(line, file=sys.stderr)
        finally:
            source.stop()
            destination.stop()

    summary = {key: {vmm: {m: median(runs, m) for m, _, _, _ in METRICS} for vmm, runs in r.items()}
               for key, r in results.items()}

    def spread(key, vmm, metric, fmt):
        """The median, with the range of the runs for the downtime."""
        value = summary[key][vmm][metric]
        if value is None:
            return "n/a"
        if metric == "lines_lost":
            return fmt(sum(r[metric] or 0 for r in results[key][vmm]))
        if metric != "downtime_ms":
            return fmt(value)
        values = [r[metric] for r in results[key][vmm]]
        return f"{fmt(value)} ({min(values):.1f}-{max(values):.1f})"

    print(f"\nMigration benchmark: test guest, 1 vCPU, loopback TCP, downtime budget {args.budget_ms} ms, "
          f"guest lines every {args.tick_ms} ms; median of {args.runs} runs each (downtime: and their range)\n")
    print("| row | metric | lockstep | QEMU microvm | lockstep / QEMU |")
    print("|---|---|---|---|---|")
    labels = {r[0]: r[1] for r in ROWS + SAME_HOST_ROWS}
    for key, per_vmm in summary.items():
        for metric, label, fmt, compare in METRICS:
            if all(per_vmm[vmm][metric] is None for vmm in per_vmm):
                continue
            a, b = per_vmm["lockstep"][metric], per_vmm["qemu"][metric]
            ratio = (f"{a / b:.2f}x" if a is not None and b else "n/a") if compare else ""
            print(f"| {labels[key]} | {label} | {spread(key, 'lockstep', metric, fmt)} | "
                  f"{spread(key, 'qemu', metric, fmt)} | {ratio} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"runs": args.runs, "budget_ms": args.budget_ms, "summary": summary, "raw": results}, f,
                  indent=2)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
