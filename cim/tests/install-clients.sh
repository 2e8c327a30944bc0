#!/bin/sh
# Installs the WBEM clients the CIM tests drive: pywbem and pywbemcli (package pywbemtools)
# from PyPI, sblim-wbemcli from Debian, and wrk for the benchmark. Run as root.
set -eu
if ! python3 -c 'import pywbem, pywbemtools' 2>/dev/null; then
    # A Debian system Python refuses pip without --break-system-packages (PEP 668).
    python3 -m pip install --quiet pywbem pywbemtools ||
        python3 -m pip install --quiet --break-system-packages pywbem pywbemtools
fi
missing=""
command -v wbemcli >/dev/null || missing="$missing sblim-wbemcli"
command -v wrk >/dev/null || missing="$missing wrk"
if [ -n "$missing" ]; then
    apt-get update -q
    # The image's post-install hook can remove packages mid-install; run without it.
    apt-get -o 'DPkg::Post-Invoke::=' install -y $missing
fi
