#!/usr/bin/env python3
"""Snapshot benchmark: snapshot creation time and restore-to-running latency for 256 MiB and
2 GiB guests, and control API latency for list and get.

A `lockstep host` runs the test guest (which fills 64 MiB of its memory first, so snapshots
carry real data). Timings are taken by a Python client on a persistent HTTP/1.1 connection to the
control API's Unix socket, request sent to response received; snapshot creation is
POST /v1/vms/{name}/snapshot, restore-to-running is POST /v1/restore with "resume": true (the
VM is running when the response arrives). Medians of --runs (default 10) each.

Usage: bench/snapshot.py [--runs N] [--json FILE]   (bench/run.sh snapshot builds first)
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


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=600)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def call(conn, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    t0 = time.perf_counter()
    conn.request(method, path, body=data, headers=headers)
    reply = conn.getresponse()
    payload = reply.read()
    dt = (time.perf_counter() - t0) * 1000
    if reply.status >= 300:
        raise RuntimeError(f"{method} {path}: {reply.status} {payload[:500]!r}")
    return dt, (json.loads(payload) if payload else None)


def wait_serial(state_dir, name, needle, timeout=60):
    path = os.path.join(state_dir, name, "serial.log")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and needle in open(path, errors="replace").read():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name}: no {needle!r} in its serial log")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench", "snapshot.json"))
    ap.add_argument("--lockstep", default=os.path.join(ROOT, "target", "release", "lockstep"))
    ap.add_argument("--image", default=os.path.join(ROOT, "target", "guest-images", "guest.elf"))
    args = ap.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        api = os.path.join(work, "api.sock")
        state_dir = os.path.join(work, "state")
        with open(os.path.join(work, "host.json"), "w") as f:
            json.dump({"api_socket": api, "state_dir": state_dir}, f)
        host = subprocess.Popen([args.lockstep, "host", "--config", os.path.join(work, "host.json")],
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "host.log"), "w"),
                                env=dict(os.environ, LOCKSTEP_LOG="warn"))
        try:
            while not os.path.exists(api):
                time.sleep(0.02)
            conn = UnixConnection(api)
            for mib in (256, 2048):
                name = f"g{mib}"
                config = {"name": name,
                          "boot-source": {"kernel_image_path": args.image,
                                          "boot_args": 'lks.mode=run lks.run="memfill 64 3;counter 1000"'},
                          "machine-config": {"vcpu_count": 1, "mem_size_mib": mib}}
                call(conn, "POST", "/v1/vms?start=true", config)
                wait_serial(state_dir, name, "LKS counter=")
                snaps, restores = [], []
                for i in range(args.runs):
                    paths = {"state_path": os.path.join(work, f"{name}-{i}.state"),
                             "memory_path": os.path.join(work, f"{name}-{i}.mem")}
                    dt, _ = call(conn, "POST", f"/v1/vms/{name}/snapshot", paths)
                    snaps.append(dt)
                    dt, _ = call(conn, "POST", "/v1/restore", dict(paths, name=f"{name}-r{i}", resume=True))
                    restores.append(dt)
                    call(conn, "POST", f"/v1/vms/{name}-r{i}/shutdown", {"force": True})
                    call(conn, "DELETE", f"/v1/vms/{name}-r{i}")
                    os.remove(paths["memory_path"])
                results[f"snapshot_create_ms_{mib}"] = snaps
                results[f"restore_to_running_ms_{mib}"] = restores
                call(conn, "POST", f"/v1/vms/{name}/shutdown", {"force": True})
            # API latency with 50 VMs defined.
            for i in range(50):
                call(conn, "POST", "/v1/vms", {"name": f"idle{i}", "boot-source": {"kernel_image_path": args.image},
                                               "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}})
            lists = [call(conn, "GET", "/v1/vms")[0] for _ in range(200)]
            gets = [call(conn, "GET", "/v1/vms/idle7")[0] for _ in range(200)]
            results["api_list_ms"] = lists
            results["api_get_ms"] = gets
        finally:
            host.terminate()
            host.wait()

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nSnapshot benchmark: test guest with 64 MiB of its memory filled, 1 vCPU; median of {args.runs} runs\n")
    print("| metric | 256 MiB guest | 2 GiB guest | 2 GiB / 256 MiB |")
    print("|---|---|---|---|")
    for key, label in (("snapshot_create_ms", "snapshot creation (API request to response)"),
                       ("restore_to_running_ms", "restore to running (API request to response)")):
        a, b = med[f"{key}_256"], med[f"{key}_2048"]
        print(f"| {label} | {a:.1f} ms | {b:.1f} ms | {b / a:.2f}x |")
    print(f"\n| control API request, 50 VMs defined (median of 200) | latency |")
    print("|---|---|")
    print(f"| GET /v1/vms (list) | {med['api_list_ms']:.2f} ms |")
    print(f"| GET /v1/vms/{{name}} (get) | {med['api_get_ms']:.2f} ms |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"runs": args.runs, "median": med, "raw": results}, f, indent=2)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
