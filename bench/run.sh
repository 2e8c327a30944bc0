#!/usr/bin/env bash
# Builds what the benchmarks need (release lockstep, the test guest, QEMU) and runs one of them.
#   bench/run.sh boot|io|snapshot|migrate [args...]     e.g. bench/run.sh io --runs 5 --only block
#   bench/run.sh migrate-faults [trials]                 migrations cut and destinations killed at
#                                                        random points (default 100 of each)
# (bench/cim.sh builds what it needs itself.)
set -euo pipefail
cd "$(dirname "$0")/.."
bench="${1:?usage: bench/run.sh boot|io|snapshot|migrate|migrate-faults [args...]}"
shift
case "$bench" in boot | io | snapshot | migrate | migrate-faults) ;; *) echo "bench/run.sh: no benchmark $bench" >&2; exit 2 ;; esac
# QEMU, python3 and the rest: everything the benchmarks start (scripts/host-programs.tsv).
scripts/setup-host.sh
if [ "$bench" = migrate-faults ]; then
    # The failure tests of the suite, with many more random points (each printed with its seed).
    LKS_MIGRATION_TRIALS="${1:-100}" exec timeout 3h cargo test --quiet -p lockstep-tests \
        --test migration failures:: -- --nocapture --test-threads 1
fi
cargo build --release --quiet --bin lockstep
bash tests/guest/build.sh target/guest-images >/dev/null
exec python3 "bench/$bench.py" "$@"
