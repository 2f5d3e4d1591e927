#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running VM: set up, apply the bundled manifests/,
# wait for the guest to report in on its serial console, and show the status.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"

infinization plan "$ROOT/manifests"
infinization apply "$ROOT/manifests" --yes

state=${INFINIZATION_STATE_DIR:-/var/lib/infinization}
echo "waiting for the guest to boot (serial console: $state/vms/demo/serial.log)..."
for _ in $(seq 1 600); do
    grep -q "INFZ-REPORT" "$state/vms/demo/serial.log" 2>/dev/null && break
    sleep 0.1
done
infinization logs demo --tail 3
infinization status
echo
echo "Converged? (plan --detailed-exitcode: 0 means nothing left to do)"
infinization plan "$ROOT/manifests" --detailed-exitcode && echo "yes: exit code 0"
