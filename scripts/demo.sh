#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running VM: set up, show the plan for the bundled
# manifests/, start the main job (`infinization sync`, in the background, as a host would run it), wait
# for the guest to report in on its serial console, and show the status.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"

state=${INFINIZATION_STATE_DIR:-/var/lib/infinization}
mkdir -p "$state"

echo "== the plan for $ROOT/manifests"
infinization plan "$ROOT/manifests" || true

echo "== starting the sync daemon (log: $state/sync.log)"
setsid infinization sync "$ROOT/manifests" --state-dir "$state" --metrics-address none </dev/null >>"$state/sync.log" 2>&1 &
daemon=$!
sleep 0.5
if ! kill -0 "$daemon" 2>/dev/null; then
    echo "the daemon exited (one may already run for $state):"; tail -n 3 "$state/sync.log"; daemon=""
fi

echo "waiting for the guest to boot (serial console: $state/vms/demo/serial.log)..."
for _ in $(seq 1 600); do
    grep -q "INFZ-REPORT" "$state/vms/demo/serial.log" 2>/dev/null && break
    sleep 0.1
done
infinization logs demo --tail 3
for _ in $(seq 1 100); do  # the daemon writes Ready once its reconcile after the start is done
    infinization status --json "$ROOT/manifests" | grep -q '"Ready"' && break
    sleep 0.1
done
infinization status "$ROOT/manifests"
echo
infinization events demo --limit 8
echo
if [ -n "$daemon" ]; then
    echo "The sync daemon (pid $daemon) keeps the host converged with $ROOT/manifests:"
    echo "edit manifests/demo.yaml (e.g. the disk size) and watch 'infinization events demo'."
    echo "Stop it with 'kill $daemon' (the VM keeps running)."
fi
