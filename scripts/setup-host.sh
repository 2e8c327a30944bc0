#!/usr/bin/env bash
# Installs what lockstep's build, tests, benchmarks and demo need on a Debian 12 host: the build
# tools and every program listed in scripts/host-programs.tsv (Debian packages with apt-get,
# Python packages with pip). Idempotent, and quiet when everything is already there. Run as root.
set -euo pipefail
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
table=$here/host-programs.tsv

say() { echo "setup-host: $*" >&2; }

has_package() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

has_pip() { command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; }

apt_need=()
pip_need=()
for pkg in build-essential pkg-config; do
    has_package "$pkg" || apt_need+=("$pkg")
done
while IFS=$'\t' read -r program installer; do
    [[ -z "$program" || "$program" == \#* ]] && continue
    command -v "$program" >/dev/null && continue
    case "$installer" in
        pip:*) pip_need+=("${installer#pip:}") ;;
        rustup)
            say "$program (Rust stable, from rustup) is required and cannot be installed here"
            exit 1
            ;;
        *) apt_need+=("$installer") ;;
    esac
done <"$table"
if ((${#pip_need[@]})); then
    command -v python3 >/dev/null || apt_need+=(python3)
    has_pip || apt_need+=(python3-pip)
fi

if ((${#apt_need[@]})); then
    say "installing ${apt_need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The image's apt clean-up hook can delete packages mid-install; disable it for this run.
    apt=(apt-get -o 'DPkg::Post-Invoke::=' install -y -qq --no-install-recommends)
    if ! "${apt[@]}" "${apt_need[@]}" >/dev/null 2>&1; then
        # One package may clash with a newer relative from bookworm-backports already on the
        # host (qemu-system-x86 with a backported qemu-utils): then take it from there too.
        for pkg in "${apt_need[@]}"; do
            "${apt[@]}" "$pkg" >/dev/null 2>&1 || "${apt[@]}" -t bookworm-backports "$pkg" >/dev/null ||
                { say "cannot install $pkg"; exit 1; }
        done
    fi
fi
if ((${#pip_need[@]})); then
    say "installing ${pip_need[*]} (pip)"
    # Debian's own Python refuses pip without --break-system-packages (PEP 668).
    python3 -m pip install --quiet --root-user-action=ignore "${pip_need[@]}" 2>/dev/null ||
        python3 -m pip install --quiet --root-user-action=ignore --break-system-packages "${pip_need[@]}"
    hash -r
fi

missing=()
while IFS=$'\t' read -r program installer; do
    [[ -z "$program" || "$program" == \#* ]] && continue
    command -v "$program" >/dev/null || missing+=("$program ($installer)")
done <"$table"
if ((${#missing[@]})); then
    say "still missing after installing: ${missing[*]}"
    exit 1
fi
