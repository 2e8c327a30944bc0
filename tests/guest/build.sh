#!/usr/bin/env bash
# Builds the lockstep test guests and packs each one: writes <OUT_DIR>/<name>.elf and
# <OUT_DIR>/<name>.bzimage for every guest program and prints their paths.
# Usage: tests/guest/build.sh [OUT_DIR]   (default: tests/guest/target/images)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out_dir="${1:-$here/target/images}"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"

cd "$here"
# The target triple is set in .cargo/config.toml, so artifacts land under target/<triple>/release.
cargo build --release --quiet
release="$here/target/x86_64-unknown-linux-gnu/release"

for source in programs/src/bin/*.rs; do
    name="$(basename "$source" .rs)"
    "$release/lks-pack" "$release/$name" "$out_dir" "$name"
done
