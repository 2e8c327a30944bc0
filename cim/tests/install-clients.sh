#!/bin/sh
# Installs the WBEM clients the CIM tests drive (pywbem, pywbemcli, wbemcli) and wrk for the
# benchmark: they are part of what scripts/setup-host.sh installs for everything. Run as root.
set -eu
exec bash "$(dirname "$0")/../../scripts/setup-host.sh"
