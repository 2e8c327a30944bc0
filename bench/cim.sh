#!/usr/bin/env bash
# The CIM endpoint under load: requests per second and p50/p99 latency of EnumerateInstances
# (CIM_ComputerSystem) and GetInstance on a real `lockstep host` with 50 defined VMs, 1 and 8
# keep-alive connections, over HTTP and HTTPS, driven by wrk (pinned to CPU 1; the host's threads
# run where the scheduler puts them); and the memory (PSS) of the whole host process when idle,
# after start and after the load. Prints a table and writes target/bench/cim.json.
#   bench/cim.sh [--duration SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=10
if [ "${1:-}" = "--duration" ]; then duration="$2"; fi
command -v wrk >/dev/null || bash cim/tests/install-clients.sh
cargo build --release --quiet --bin lockstep
lockstep=target/release/lockstep

work=$(mktemp -d)
state="$work/state"
http_port=$((20000 + RANDOM % 20000))
https_port=$((http_port + 1))
# The VMs are defined, not started: the kernel only has to exist.
kernel="$work/vmlinux"
head -c 4096 /dev/zero >"$kernel"
hash=$(printf 'bench-password\n' | "$lockstep" hash-password)
python3 - "$work/host.json" "$state" "$kernel" "$http_port" "$https_port" "$hash" <<'EOF_PY'
import json, sys
path, state, kernel, http, https, hash_ = sys.argv[1:]
vms = [{"config": {"name": f"vm{i:03}", "boot-source": {"kernel_image_path": kernel},
                   "machine-config": {"vcpu_count": 1 + i % 2, "mem_size_mib": 128 + 64 * (i % 4)}},
        "autostart": False} for i in range(50)]
json.dump({"api_socket": f"{state}/api.sock", "state_dir": state, "vms": vms,
           "cim": {"http": f"127.0.0.1:{http}", "https": f"127.0.0.1:{https}",
                   "users": [{"name": "bench", "password_hash": hash_}]}}, open(path, "w"))
EOF_PY
"$lockstep" host --config "$work/host.json" >"$work/server.out" 2>"$work/server.err" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$http_port/cimom" && break
    kill -0 $server 2>/dev/null || { cat "$work/server.err" >&2; exit 1; }
    sleep 0.1
done

pss() { awk '/^Pss:/ {print $2}' "/proc/$server/smaps_rollup"; }
sleep 1
idle_start_kib=$(pss)

auth=$(printf 'bench:bench-password' | base64)
ns='<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="cimv2"/></LOCALNAMESPACEPATH>'
request() { # method params
    printf '<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1" PROTOCOLVERSION="1.0"><SIMPLEREQ><IMETHODCALL NAME="%s">%s%s</IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>' "$1" "$ns" "$2"
}
lua() { # file method body
    cat >"$1" <<EOF
wrk.method = "POST"
wrk.path = "/cimom"
wrk.headers["Content-Type"] = "application/xml; charset=\"utf-8\""
wrk.headers["CIMOperation"] = "MethodCall"
wrk.headers["CIMMethod"] = "$2"
wrk.headers["CIMObject"] = "root%2Fcimv2"
wrk.headers["Authorization"] = "Basic $auth"
wrk.body = [[$3]]
EOF
}
lua "$work/ei.lua" EnumerateInstances "$(request EnumerateInstances '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="CIM_ComputerSystem"/></IPARAMVALUE>')"
lua "$work/gi.lua" GetInstance "$(request GetInstance '<IPARAMVALUE NAME="InstanceName"><INSTANCENAME CLASSNAME="LKS_VirtualComputerSystem"><KEYBINDING NAME="CreationClassName"><KEYVALUE VALUETYPE="string">LKS_VirtualComputerSystem</KEYVALUE></KEYBINDING><KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string">vm025</KEYVALUE></KEYBINDING></INSTANCENAME></IPARAMVALUE>')"

# Check that both requests really succeed before timing them.
for op in ei gi; do
    body=$(sed -n 's/^wrk.body = \[\[\(.*\)\]\]$/\1/p' "$work/$op.lua")
    method=$(sed -n 's/^wrk.headers\["CIMMethod"\] = "\(.*\)"$/\1/p' "$work/$op.lua")
    reply=$(curl -s -u bench:bench-password -H 'CIMOperation: MethodCall' -H "CIMMethod: $method" \
        -H 'Content-Type: application/xml' --data-binary "$body" "http://127.0.0.1:$http_port/cimom")
    case "$reply" in *"<IRETURNVALUE>"*"INSTANCE"*) ;; *) echo "bench: $op failed: ${reply:0:300}" >&2; exit 1 ;; esac
    echo "$op reply: ${#reply} bytes" >&2
done

# wrk's latency lines look like "50%  812.00us"; convert to milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; printf "%.2f", v}'; }
results="$work/results.txt"
: >"$results"
for proto in http https; do
    port=$http_port
    [ "$proto" = https ] && port=$https_port
    for op in ei gi; do
        for conns in 1 8; do
            out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${duration}s" --latency -s "$work/$op.lua" "$proto://127.0.0.1:$port")
            rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
            p50=$(echo "$out" | awk '$1=="50%" {print $2}' | to_ms)
            p99=$(echo "$out" | awk '$1=="99%" {print $2}' | to_ms)
            errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
            [ -n "$errors" ] && echo "bench: $proto $op c=$conns: $errors" >&2
            echo "$proto $op $conns $rps $p50 $p99" >>"$results"
        done
    done
done
sleep 8 # let the endpoint notice it is idle and give memory back
idle_after_kib=$(pss)

python3 - "$results" "$idle_start_kib" "$idle_after_kib" <<'EOF'
import json, os, sys
rows = [l.split() for l in open(sys.argv[1])]
names = {"ei": "EnumerateInstances CIM_ComputerSystem (51 instances)", "gi": "GetInstance LKS_VirtualComputerSystem"}
print("| protocol | operation | connections | requests/s | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|")
out = []
for proto, op, conns, rps, p50, p99 in rows:
    print(f"| {proto.upper()} | {names[op]} | {conns} | {float(rps):,.0f} | {p50} | {p99} |")
    out.append({"protocol": proto, "operation": names[op], "connections": int(conns),
                "requests_per_s": float(rps), "p50_ms": float(p50), "p99_ms": float(p99)})
start, after = int(sys.argv[2]) / 1024, int(sys.argv[3]) / 1024
print(f"\nidle host memory (PSS of the whole lockstep process, 50 defined VMs): {start:.1f} MiB after start, {after:.1f} MiB after the load")
os.makedirs("target/bench", exist_ok=True)
json.dump({"vms": 50, "results": out, "idle_pss_mib_after_start": round(start, 2),
           "idle_pss_mib_after_load": round(after, 2)}, open("target/bench/cim.json", "w"), indent=2)
print("JSON: target/bench/cim.json")
EOF
