#!/usr/bin/env bash
# Builds what the benchmarks need (release lockstep, the test guest, QEMU) and runs one of them.
#   bench/run.sh boot|io|snapshot|migrate [args...]     e.g. bench/run.sh io --runs 5 --only block
#   bench/run.sh migrate-faults [trials]                 migrations cut and destinations killed at
#                                                        random points (default 100 of each)
#   bench/run.sh ft [--runs N] [--window W] ...          FT's cost and failover time at 25, 50 and
#                                                        100 ms epochs (tests/src/bin/ft_bench.rs)
#   bench/run.sh ft-kill [trials]                        the FT journal workload under SIGKILLs of
#                                                        the primary (default 100 trials)
# (bench/cim.sh builds what it needs itself.)
set -euo pipefail
cd "$(dirname "$0")/.."
bench="${1:?usage: bench/run.sh boot|io|snapshot|migrate|migrate-faults|ft|ft-kill [args...]}"
shift
case "$bench" in boot | io | snapshot | migrate | migrate-faults | ft | ft-kill) ;; *) echo "bench/run.sh: no benchmark $bench" >&2; exit 2 ;; esac
# QEMU, python3 and the rest: everything the benchmarks start (scripts/host-programs.tsv).
scripts/setup-host.sh
if [ "$bench" = migrate-faults ]; then
    # The failure tests of the suite, with many more random points (each printed with its seed).
    LKS_MIGRATION_TRIALS="${1:-100}" exec timeout 3h cargo test --quiet -p lockstep-tests \
        --test migration failures:: -- --nocapture --test-threads 1
fi
if [ "$bench" = ft-kill ]; then
    # The SIGKILL trials of tests/tests/ft_kill.rs, many more of them; the seed is printed
    # (LKS_FT_SEED=<seed> replays them), then the result line.
    trials_test=every_answered_request_survives_a_sigkill_of_the_primary
    LKS_FT_TRIALS="${1:-100}" exec timeout 3h cargo test --quiet -p lockstep-tests --test ft_kill \
        "$trials_test" -- --nocapture --test-threads 1
fi
cargo build --release --quiet --bin lockstep
bash tests/guest/build.sh target/guest-images >/dev/null
if [ "$bench" = ft ]; then
    # The driver (the client and the captures) is optimized too, without the release profile's
    # whole-program LTO (its own profile, target/ftbench/); what it measures is the release
    # lockstep.
    cargo build --quiet -p lockstep-tests --bin ft_bench --profile ftbench \
        --config 'profile.ftbench.inherits="release"' --config 'profile.ftbench.lto=false' \
        --config 'profile.ftbench.codegen-units=16' --config 'profile.ftbench.debug=false'
    mkdir -p target/bench
    LKS_LOCKSTEP_BIN="$PWD/target/release/lockstep" exec timeout 2h target/ftbench/ft_bench \
        --json "target/bench/ft-$(date -u +%Y%m%d-%H%M%S).json" "$@"
fi
exec python3 "bench/$bench.py" "$@"
