#!/usr/bin/env bash
# Builds what the benchmarks need (release lockstep, the test guest, QEMU) and runs one of them.
#   bench/run.sh boot|io|snapshot|migrate [args...]     e.g. bench/run.sh io --runs 5 --only block
# (bench/cim.sh builds what it needs itself.)
set -euo pipefail
cd "$(dirname "$0")/.."
bench="${1:?usage: bench/run.sh boot|io|snapshot|migrate [args...]}"
shift
case "$bench" in boot | io | snapshot | migrate) ;; *) echo "bench/run.sh: no benchmark $bench" >&2; exit 2 ;; esac
# QEMU, python3 and the rest: everything the benchmarks start (scripts/host-programs.tsv).
scripts/setup-host.sh
cargo build --release --quiet --bin lockstep
bash tests/guest/build.sh target/guest-images >/dev/null
exec python3 "bench/$bench.py" "$@"
