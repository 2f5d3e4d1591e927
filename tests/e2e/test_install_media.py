"""Install media and cloud-init on real QEMU: a cloud-init seed the guest reads back, and a boot-once install
CD that is ejected after the guest's first power-off, across a restart of the sync daemon."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pycdlib

from reconciler.adapters import monitor
from reconciler.spec.cloudinit import instance_id
from reconciler.spec.models import CloudInitSpec
from tests.e2e.harness import Host, vm_manifest, wait_gone

USER_DATA = "#cloud-config\npassword: s3cret-{n}\nchpasswd: {{expire: false}}\n"


def _iso(path: Path, label: str) -> None:
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident=label)
    iso.add_fp(io.BytesIO(b"hello\n"), 6, "/HELLO.TXT;1")
    iso.write(str(path))
    iso.close()


def _qmp(host: Host, vm: str, command: str, args: dict[str, Any] | None = None) -> Any:
    async def ask() -> Any:
        async with monitor.session(host.state / "vms" / vm / "run" / "qmp.sock") as qmp:
            return await qmp.execute(command, args or {})
    return asyncio.run(ask())



def _installs(host: Host, vm: str) -> list[dict[str, Any]]:
    installs: list[dict[str, Any]] = json.loads((host.state / "vms" / vm / "record.json").read_text())["installs"]
    return installs


def _cloud_init_vm(n: int) -> str:
    user_data = USER_DATA.format(n=n).replace("\n", "\n      ")
    return vm_manifest("ci", extra=f"""  cloudInit:
    userData: |
      {user_data.rstrip()}
    networkConfig: {{version: 2, ethernets: {{eth0: {{dhcp4: true}}}}}}
""")


def test_cloud_init_seed_is_read_by_the_guest_and_changes_live(host: Host) -> None:
    host.write("ci.yaml", _cloud_init_vm(1))
    shown = host.cli("plan", str(host.manifests), "--json", check=True).stdout + host.apply().stdout
    assert "s3cret" not in shown  # user-data may hold passwords: plans show a hash
    first = CloudInitSpec(userData=USER_DATA.format(n=1))
    report = host.guest("ci").wait_report(lambda r: r.cidata is not None, what="the cidata seed")
    assert report.cidata == (instance_id("ci", first), hashlib.sha256(first.userData.encode()).hexdigest())
    pid = host.running_pid("ci")

    # A new user-data: a new instance-id on a new seed, swapped live (cloud-init reads it at the next boot).
    host.write("ci.yaml", _cloud_init_vm(2))
    planned = host.cli("plan", str(host.manifests), check=True).stdout
    assert "cloud-init runs it only for a new instance-id" in planned and "s3cret" not in planned
    host.apply()
    second = CloudInitSpec(userData=USER_DATA.format(n=2))
    report = host.guest("ci").wait_report(lambda r: r.cidata is not None and r.cidata[0] == instance_id("ci", second),
                                          after_seq=report.seq, what="the new seed")
    assert report.cidata == (instance_id("ci", second), hashlib.sha256(second.userData.encode()).hexdigest())
    assert host.running_pid("ci") == pid
    assert len(list((host.state / "vms" / "ci").glob("cidata-*.iso"))) == 1  # the old seed is gone
    assert host.plan_exit() == 0


def test_boot_once_install_is_ejected_after_the_first_power_off_across_a_daemon_restart(host: Host) -> None:
    install, drivers = host.base / "install.iso", host.base / "drivers.iso"
    _iso(install, "INFZ_INSTALL")
    _iso(drivers, "INFZ_DRIVERS")
    host.write("vm.yaml", vm_manifest("inst", extra=f"""  cdroms:
    - {{name: install, image: {install}, bootOnce: true, ejectAfterInstall: true}}
    - {{name: drivers, image: {drivers}}}
"""))
    daemon = host.start_sync()
    try:
        pid = host.wait_for(lambda: host.running_pid("inst"), "the install start")
        host.guest("inst").wait_report(lambda r: "INFZ_INSTALL" in r.cds.values(), what="the install CD")
        assert _qmp(host, "inst", "qom-get", {"path": "cd-install", "property": "bootindex"}) == 1
        began = host.wait_for(lambda: _installs(host, "inst"), "the record to say the install began")
        assert began == [{"cdrom": "install", "image": str(install), "pid": pid,
                          "start_time": began[0]["start_time"], "done": False, "ejected": False}]
    finally:
        assert host.stop_sync(daemon) == 0

    # The reconciler is gone while the guest powers off: nothing records that exit.
    _qmp(host, "inst", "system_powerdown")
    assert wait_gone(pid, 60)
    daemon = host.start_sync()
    try:
        new_pid = host.wait_for(lambda: (p := host.running_pid("inst")) != pid and p, "the start after the install")
        after = host.guest("inst").wait_report(lambda r: "INFZ_DRIVERS" in r.cds.values(), boot=2,
                                               what="the boot after the install")
        assert "INFZ_INSTALL" not in after.cds.values() and "-" in after.cds.values(), after.cds
        assert _qmp(host, "inst", "qom-get", {"path": "cd-install", "property": "bootindex"}) == -1
        done = _installs(host, "inst")
        assert (done[0]["done"], done[0]["ejected"], done[0]["pid"]) == (True, True, pid)
        assert b"reboot=shutdown" not in Path(f"/proc/{new_pid}/cmdline").read_bytes()
    finally:
        assert host.stop_sync(daemon) == 0
    assert host.plan_exit() == 0  # the ejected medium is done, not drift
