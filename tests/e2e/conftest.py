"""Fixtures for end-to-end tests on real QEMU: the test guest (built once, cached) and isolated hosts.

Without what they need (root, QEMU, qemu-img, the test guest in $INFZ_GUEST_DIR or
/var/cache/infinization/guest) the end-to-end tests are skipped with the reason, so plain ``pytest`` works
on any machine. CI must never skip them: ``scripts/test.sh`` sets ``INFZ_REQUIRE_E2E=1``, and then a
missing prerequisite is an error instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import GUEST_DIR, ROOT, ROOTFS_DIR, ROOTFS_FILES, Host
from tests.e2e.pgserver import PostgresServer


def missing_prerequisites() -> list[str]:
    """What this machine lacks to boot the test guests (empty: the end-to-end tests can run)."""
    missing = [f"{tool} is not installed" for tool in ("qemu-system-x86_64", "qemu-img") if not shutil.which(tool)]
    missing += [f"no test guest {GUEST_DIR / name}" for name in ("vmlinuz", "initrd.img")
                if not (GUEST_DIR / name).is_file()]
    if os.geteuid() != 0:
        missing.append("not root (the tests manage QEMU processes, TAPs and network namespaces)")
    return missing


def missing_rootfs() -> list[str]:
    """What the real-OS guest tests (fixture ``rootfs``) lack: the image of scripts/build-rootfs.sh."""
    return [f"no Debian root filesystem {ROOTFS_DIR / name} (scripts/build-rootfs.sh builds it)"
            for name in ROOTFS_FILES if not (ROOTFS_DIR / name).is_file()]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    e2e = [item for item in items if "/e2e/" in str(item.fspath)]
    missing = missing_prerequisites() if e2e else []
    real_os = [item for item in e2e if "rootfs" in getattr(item, "fixturenames", ())]
    missing_os = missing_rootfs() if real_os else []
    if (missing or missing_os) and os.environ.get("INFZ_REQUIRE_E2E") == "1":
        raise pytest.UsageError("INFZ_REQUIRE_E2E=1 but the end-to-end tests cannot run: "
                                f"{'; '.join(missing + missing_os)}")
    skip = pytest.mark.skip(reason=f"end-to-end: {'; '.join(missing)} (run scripts/setup.sh as root)")
    skip_os = pytest.mark.skip(reason=f"end-to-end, real OS: {'; '.join(missing_os)} (run scripts/setup.sh)")
    for item in e2e:
        item.add_marker(pytest.mark.e2e)
        if missing:
            item.add_marker(skip)
        elif missing_os and item in real_os:
            item.add_marker(skip_os)


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """The Debian 12 guest of scripts/build-rootfs.sh (built by setup.sh, not here: a cold build downloads
    ~100 MB and takes minutes; collection skips the tests that need it when it is missing)."""
    return ROOTFS_DIR


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """Build (or reuse) the busybox test guest from Debian packages (cached: a no-op when it is current)."""
    subprocess.run(["bash", str(ROOT / "scripts/build-guest.sh"), str(GUEST_DIR)], check=True)
    return GUEST_DIR


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


def _show_logs(h: Host) -> None:
    """After a failure, print the daemon logs of the test's host: CI keeps only what the run printed."""
    for log in sorted(h.base.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        print(f"--- {log} (last 80 of {len(lines)} lines)")
        print("\n".join(lines[-80:]))
    if h.state.exists():
        print("--- events")
        print(h.cli("events", "--limit", "60").stdout)


def _clean_up(h: Host, request: pytest.FixtureRequest) -> None:
    """Kill what the test started, and fail if anything survives (a leak is a defect)."""
    if request.node.stash.get(_FAILED, False):
        _show_logs(h)
    h.kill_all()
    h.delete_firewall()
    deadline = time.monotonic() + 10
    while (left := h.leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes left behind by the test: {left}"


@pytest.fixture
def host(guest_image: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    # A short path: QMP socket paths must stay under 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="infz-", dir="/tmp"))
    h = Host(base)
    try:
        yield h
    finally:
        _clean_up(h, request)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def net_host(guest_image: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    """A Host whose reconciler runs in its own network namespace: bridges, TAPs, nftables and ip_forward
    stay inside it, and deleting the namespace removes them all."""
    netns = f"infz-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
    base = Path(tempfile.mkdtemp(prefix="infz-", dir="/tmp"))
    h = Host(base, netns=netns)
    try:
        yield h
    finally:
        _clean_up(h, request)
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A running throwaway PostgreSQL server the test may stop and start (see ``PostgresServer``)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> str:
    """The URL of a running throwaway PostgreSQL server (``postgres_server`` for one to stop and start)."""
    return postgres_server.url
