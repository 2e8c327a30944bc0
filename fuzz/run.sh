#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) with libFuzzer on stable Rust.
#   fuzz/run.sh [seconds-per-target]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --quiet cargo-fuzz
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
    echo "fuzz: $target for ${seconds}s" >&2
    mkdir -p "corpus/$target"
    # Seeds kept in the tree (fuzz/seeds/<target>) start the corpus where a target has them.
    seeds=()
    if [ -d "seeds/$target" ]; then seeds=("seeds/$target"); fi
    max_len=4096
    if [ "$target" = snapshot_state ]; then max_len=65536; fi
    if [ "$target" = migration_stream ]; then max_len=65536; fi
    cargo fuzz run "$target" "corpus/$target" "${seeds[@]}" -- -max_total_time="$seconds" -rss_limit_mb=2048 -max_len="$max_len"
done
