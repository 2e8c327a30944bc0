#!/usr/bin/env bash
# Builds what the boot benchmark needs (release lockstep, the test guest, QEMU) and runs it.
#   bench/run-boot.sh [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-system-x86_64 >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get -o 'DPkg::Post-Invoke::=' install -y -qq qemu-system-x86 >/dev/null
fi
cargo build --release --quiet --bin lockstep
bash tests/guest/build.sh target/guest-images >/dev/null
exec python3 bench/boot.py "$@"
