#!/usr/bin/env bash
# Installs what lockstep's build and tests need on a Debian 12 host (idempotent; quiet when
# everything is already there).
set -euo pipefail

need=()
for pkg in build-essential pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "setup-host: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The image's apt clean-up hook can delete packages mid-install; disable it for this run.
    apt-get -o 'DPkg::Post-Invoke::=' install -y -qq "${need[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup-host: cargo (Rust stable) is required: https://rustup.rs" >&2; exit 1; }

