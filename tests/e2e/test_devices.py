"""Device models, seen from inside the guest where it can see them, and from QEMU's side where it cannot.

The guest (busybox + the Debian cloud kernel) reports the hardware RNG it uses, its SMBIOS UUID, its
block devices (a scsi disk is an sd*) and which of them are read-only. It has no AHCI and no e1000e
driver, so the sata disk and the e1000e NIC are proved over QMP (their QOM types, the AHCI bus), and so
are the cache modes (``query-block``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from reconciler.adapters import monitor
from tests.e2e.harness import Host, vm_manifest

MiB = 1024**2

DISKS = """    - {name: root, size: 64Mi}
    - {name: data, size: 32Mi, bus: scsi, discard: unmap}
    - {name: ro, size: 16Mi, readOnly: true, cache: none}
    - {name: inst, size: 48Mi, bus: sata, cache: writethrough, preallocation: full}"""
E1000E = "    - {name: legacy, type: user, model: e1000e}"


def _qmp(host: Host, vm: str, *commands: tuple[str, dict[str, Any]]) -> list[Any]:
    async def ask() -> list[Any]:
        async with monitor.session(host.state / "vms" / vm / "run" / "qmp.sock") as qmp:
            return [await qmp.execute(command, args) for command, args in commands]
    return asyncio.run(ask())


def test_device_models_rng_and_smbios_uuid(host: Host) -> None:
    nat = "    - {name: nat, type: user}"
    manifest = vm_manifest("dev", disks=DISKS).replace(nat, f"{nat}\n{E1000E}")
    host.write("dev.yaml", manifest)
    host.apply()
    guest = host.guest("dev")
    # vda root, vdb the read-only disk; sda the scsi disk; the sata disk has no driver in this guest.
    report = guest.wait_report(lambda r: {"vda", "vdb", "sda"} <= set(r.disks) and r.rng is not None, what="boot")
    assert report.rng == "virtio_rng.0"
    assert report.disks["sda"] == 32 * MiB and report.disks["vdb"] == 16 * MiB
    assert report.read_only == ("vdb",)
    status = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]
    assert report.uuid == status["uuid"] and status["inSync"] is True

    devices, block, qtree = _qmp(host, "dev", ("qom-list", {"path": "/machine/peripheral"}), ("query-block", {}),
                                 ("human-monitor-command", {"command-line": "info qtree"}))
    types = {d["name"]: d["type"] for d in devices}
    assert types["nic-legacy"] == "child<e1000e>" and types["nic-nat"] == "child<virtio-net-pci>"
    assert types["disk-inst"] == "child<ide-hd>" and types["disk-data"] == "child<scsi-hd>"
    ahci = qtree.split("dev: ich9-ahci", 1)[1]
    assert 'dev: ide-hd, id "disk-inst"' in ahci, "the sata disk sits on q35's AHCI controller"
    inserted = {b["qdev"].removeprefix("/machine/peripheral/").removesuffix("/virtio-backend"): b["inserted"]
                for b in block if b.get("inserted")}
    assert inserted["disk-ro"]["ro"] is True
    assert inserted["disk-ro"]["cache"] == {"writeback": True, "direct": True, "no-flush": False}
    assert inserted["disk-inst"]["cache"] == {"writeback": False, "direct": False, "no-flush": False}
    assert inserted["disk-root"]["cache"] == {"writeback": True, "direct": False, "no-flush": False}
    # preallocation=full: the file's blocks are allocated at creation.
    assert host.disk("dev", "inst").stat().st_blocks * 512 >= 48 * MiB

    # A scsi disk hot-plugs onto the virtio-scsi controller (no spare slot), with an I/O limit read back.
    (pid,) = host.qemu_pids("dev")
    more = manifest.replace(DISKS, DISKS + "\n    - {name: more, size: 8Mi, bus: scsi, iops: 100}")
    host.write("dev.yaml", more)
    assert "on the virtio-scsi controller" in host.apply().stdout
    guest.wait_report(lambda r: r.disks.get("sdb") == 8 * MiB, what="the hot-plugged scsi disk")
    assert host.qemu_pids("dev") == [pid] and host.plan_exit() == 0

    # The UUID is the VM's, not the process's: the same after a stop and a start.
    boots = guest.boots()
    host.write("dev.yaml", more.replace("runStrategy: Always", "runStrategy: Halted"))
    host.apply()
    host.write("dev.yaml", more)
    host.apply()
    again = guest.wait_report(lambda r: r.rng is not None and "sda" in r.disks, what="boot after a restart",
                              boot=boots + 1)
    assert again.uuid == report.uuid and again.rng == "virtio_rng.0"
