#!/usr/bin/env bash
# Set up (see setup.sh) and run every check: ruff, mypy, then the whole pytest suite, including the
# end-to-end tests that boot real QEMU guests. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
VENV=${INFZ_VENV:-/opt/infinization/venv}
cd "$ROOT"
echo "== ruff"
"$VENV/bin/ruff" check reconciler tests bench
echo "== mypy (strict on spec/ and plan/)"
"$VENV/bin/mypy" reconciler
echo "== packaging (sdist and wheel build; twine check --strict)"
DIST=$(mktemp -d)
trap 'rm -rf "$DIST"' EXIT
"$VENV/bin/python" -m build -q --outdir "$DIST" "$ROOT" >/dev/null
"$VENV/bin/twine" check --strict "$DIST"/*
echo "== pytest"
# setup.sh installed QEMU and built the guest: here the end-to-end tests must run, never be skipped.
export INFZ_REQUIRE_E2E=1
"$VENV/bin/python" -m pytest "$@"
