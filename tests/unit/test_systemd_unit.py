"""The shipped systemd unit (``examples/08-systemd-unit``): systemd's own tools accept it and score its
exposure, and it keeps the settings the daemon relies on. ``systemd-analyze`` works without systemd as
PID 1 (``security --offline=true``); Debian's ``systemd`` package has it (scripts/setup.sh installs it).
That the hardened unit really runs the daemon and its VMs is proven under a real systemd in
``tests/e2e/test_systemd_unit.py``."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "examples/08-systemd-unit/infinization-sync.service"
# Measured with systemd 252 (Debian 12): ours 3.6 OK; Debian's libvirtd.service 9.6 UNSAFE (README there).
# An option loosened by mistake shows here; a deliberate change moves this bound and the README's numbers.
MAX_EXPOSURE = 3.8

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (Debian package systemd; scripts/setup.sh)")


def _service() -> dict[str, list[str]]:
    """The [Service] section: each key with all its values (systemd keys may repeat)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def exposure(unit: Path) -> float:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, f"no score in systemd-analyze's output:\n{done.stdout}\n{done.stderr}"
    return float(found.group(1))


def test_systemd_analyze_verify_accepts_the_unit() -> None:
    done = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, check=False)
    # Only the lines about our unit: verify also loads the units it is ordered after (host-dependent).
    ours = [line for line in done.stderr.splitlines() if UNIT.name in line and "not executable" not in line]
    assert done.returncode == 0 or not ours, done.stderr
    assert not ours, done.stderr


def test_exposure_stays_low() -> None:
    assert exposure(UNIT) <= MAX_EXPOSURE


def test_a_loosened_unit_scores_worse(tmp_path: Path) -> None:
    """The score does measure the hardening: without it, the same unit is back to UNSAFE."""
    hardening = ("Protect", "Restrict", "Private", "SystemCall", "Capability", "NoNewPrivileges", "Device",
                 "LockPersonality", "MemoryDeny", "UMask")
    loose = tmp_path / UNIT.name
    loose.write_text("\n".join(line for line in UNIT.read_text().splitlines() if not line.startswith(hardening)))
    assert exposure(loose) > 9


def test_the_settings_the_daemon_relies_on() -> None:
    service = _service()
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] and service["Restart"] == ["on-failure"]
    assert service["KillMode"] == ["process"]  # VMs survive a stop or restart of the daemon
    assert service["UMask"] == ["0077"]
    assert int(service["LimitNOFILE"][0]) >= 8192
    assert "/var/lib/infinization" in service["ReadWritePaths"]  # the state directory the unit sets
    assert "INFINIZATION_STATE_DIR=/var/lib/infinization" in service["Environment"]
    exec_start = service["ExecStart"][0]
    assert "--host" not in exec_start  # the demo has no spec.host: --host %H would leave it unmanaged
    manifests = exec_start.split()[2]
    assert f"MANIFESTS={manifests}" in (ROOT / "scripts/setup.sh").read_text()  # setup installs what it manages
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(re.sub(r"^(DeviceAllow|ReadWritePaths|Environment)=.*$", "", UNIT.read_text(), flags=re.M))
    assert unit["Unit"]["StartLimitBurst"] and unit["Unit"]["StartLimitIntervalSec"]
