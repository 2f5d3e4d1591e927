"""``infinization status``: each VM's phase and whether it matches its manifest, and each Network's state.

Called by ``cli.parser``. Reads without any lock (it works while ``apply`` or the sync daemon runs) and
tolerates a broken manifest file: its VMs are shown against their last-applied spec. The "in sync" column
is ``Change.in_sync``, the one definition the daemon's Ready condition also uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from reconciler.cli.common import CliError, View, config_of, layout_of, out, read_view
from reconciler.cli.display import display_url
from reconciler.plan import runstate
from reconciler.plan.actions import Change
from reconciler.plan.observed import ObservedVM
from reconciler.runtime.store import VMStatus, conditions_text, open_readonly
from reconciler.spec.models import VirtualMachineSpec
from reconciler.spec.naming import channel_key, smbios_uuid
from reconciler.state import files
from reconciler.state.layout import StateLayout

# Conditions the NOTES column already shows from the plan itself (pending restart, refusal, unplug).
_SHOWN_FROM_PLAN = ("RestartRequired", "Refused", "UnplugPending", "Unverified", "NotPruned", "PausedByQemu")


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _phase(view: View, name: str) -> str:
    vm = view.observed.vm(name)
    if vm.process is not None:
        return runstate.phase(vm.process.status)  # Running, Paused (whoever paused it) or Unknown
    return "Stopped" if name in view.records else "Pending"


def _daemon_status(layout: StateLayout, host: str | None) -> dict[str, VMStatus]:
    store = open_readonly(layout.database, host)
    if store is None:
        return {}
    try:
        return store.statuses()
    finally:
        store.close()


def _spec(view: View, name: str) -> VirtualMachineSpec | None:
    loaded = view.manifests.vms.get(name)
    if loaded is not None:
        return loaded.vm.spec
    return view.records[name].vm.spec if name in view.records else None


def _channels(view: View, name: str) -> dict[str, str]:
    """Each channel's unix socket (QEMU listens on it while the VM runs; the host platform connects)."""
    spec = _spec(view, name)
    paths = StateLayout(Path(view.observed.state_dir)).vm(name)
    return {c.name: str(paths.channel_socket(channel_key(c.name))) for c in spec.channels} if spec else {}


def _host_devices(view: View, name: str) -> dict[str, dict[str, Any]]:
    """The host devices held for the VM (hostdevs.json): each key (PCI address or usb:BUS-PORT) with the
    device that took it, and the driver it goes back to."""
    return {key: {"device": claim.device, "originalDriver": claim.original_driver, "iommuGroup": claim.group}
            for key, claim in sorted(view.observed.devices.claims.items()) if claim.vm == name}


def _agent(vm: ObservedVM) -> dict[str, Any] | None:
    """The guest agent's answer: None when not asked (the VM is not running, or has no agent port)."""
    found = vm.process.agent if vm.process else None
    if found is None:
        return None
    return {"answering": found.answering, "addresses": found.addresses, "os": found.os, "detail": found.detail}


def _vm_row(view: View, change: Change, daemon: dict[str, VMStatus]) -> dict[str, Any]:
    name = change.name
    vm = view.observed.vm(name)
    loaded = view.manifests.vms.get(name)
    status = daemon.get(name)
    return {
        "name": name,
        "phase": _phase(view, name),
        "pid": vm.process.pid if vm.process else None,
        "runStrategy": loaded.vm.spec.runStrategy if loaded else None,
        "paused": loaded.vm.spec.paused if loaded else None,
        # QMP query-status as observed (running, paused, prelaunch, io-error...), and why QEMU paused it itself
        "runState": vm.process.status if vm.process else None,
        "pausedByQemu": runstate.paused_by_qemu(vm.process.status if vm.process else None),
        "inSync": change.in_sync,
        "action": change.action.value if change.steps else None,
        "pendingRestart": change.pending_restart,
        "refused": change.refusals,
        "unplugPending": change.unplug_pending,
        "unverified": vm.unverified,
        "kept": change.kept,
        "disks": {n: d.virtual_size for n, d in vm.disks.items() if d.exists},
        "uuid": smbios_uuid(name),
        "channels": _channels(view, name),
        "display": display_url(view, name, _spec(view, name)),
        "hostDevices": _host_devices(view, name),
        "agent": _agent(vm),  # the SMBIOS system UUID QEMU gives the guest (-uuid)
        # where its threads may run now (vCPU index -> CPUs, the other threads' CPUs) and its cpuset cgroup
        "placement": vm.process.placement.model_dump(mode="json") if vm.process and vm.process.placement else None,
        "manifest": loaded.source.file if loaded else change.source,
        "revision": view.records[name].revision if name in view.records else None,
        "conditions": status.conditions if status is not None else {},
        "lastReconcile": status.last_reconcile if status is not None else None,
    }


def status_rows(view: View, daemon: dict[str, VMStatus] | None = None) -> list[dict[str, Any]]:
    # Networks and the firewall have their own rows (network_rows) or none: "vms" lists VMs only.
    return [_vm_row(view, change, daemon or {}) for change in view.plan.changes if change.resource == "VirtualMachine"]


def _network_row(view: View, name: str) -> dict[str, Any] | None:
    loaded = view.manifests.networks.get(name)
    record = view.observed.network_records.get(name)
    network = loaded.network if loaded else record.network if record else None
    if network is None:
        return None
    link = view.observed.host.links.get(network.spec.bridge)
    dhcp = view.observed.host.dhcp.get(name)
    change = next((c for c in view.plan.changes if c.resource == "Network" and c.name == name), None)
    return {
        "name": name,
        "bridge": network.spec.bridge,
        "up": bool(link and link.up),
        "addresses": link.addresses if link else [],
        "nat": network.spec.nat,
        "dhcpPid": dhcp.pid if dhcp else None,
        "leases": [lease.model_dump() for lease in dhcp.leases] if dhcp else [],
        "inSync": change is None or change.in_sync,
    }


def network_rows(view: View) -> list[dict[str, Any]]:
    names = sorted(set(view.manifests.networks) | set(view.observed.network_records))
    return [row for name in names if (row := _network_row(view, name)) is not None]


def _agent_notes(found: dict[str, Any] | None) -> list[str]:
    if found is None:
        return []
    if not found["answering"]:
        return [f"agent: not answering ({found['detail']})"]
    detail = f" ({found['detail']})" if found["detail"] else ""
    return [f"agent: {found['os'] or 'answering'}; ips: {', '.join(found['addresses']) or '-'}{detail}"]


def _notes(row: dict[str, Any]) -> str:
    notes = [f"pending: {row['action']}"] if row["action"] else []
    notes += [f"restart pending: {cause}" for cause in row["pendingRestart"]]
    notes += [f"refused: {why}" for why in row["refused"]]
    notes += [f"unplug pending: {why}" for why in row["unplugPending"]]
    notes += [f"unverified: {row['unverified']}"] if row["unverified"] else []
    notes += [f"run state: {row['runState']}"] if row["runState"] not in (None, "running", "paused") else []
    notes += [row["pausedByQemu"]] if row["pausedByQemu"] and not row["refused"] else []
    notes += [f"kept: {row['kept']}"] if row["kept"] else []
    notes += _agent_notes(row["agent"])
    notes += [f"display: {row['display']}"] if row["display"] else []
    notes += [c for c in conditions_text(row["conditions"]) if c != "Ready" and not c.startswith(_SHOWN_FROM_PLAN)]
    return escape("\n".join(notes))


def _vm_table(directory: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"VMs on this host (manifests: {directory})")
    for column in ("NAME", "PHASE", "PID", "IN SYNC", "REVISION", "NOTES"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["phase"], str(row["pid"] or "-"), _yes_no(row["inSync"]),
                      row["revision"] or "-", _notes(row))
    return table


def _network_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Networks")
    for column in ("NAME", "BRIDGE", "UP", "ADDRESS", "NAT", "DHCP LEASES", "IN SYNC"):
        table.add_column(column)
    for row in rows:
        leases = "\n".join(f"{lease['ip']} {lease['mac']}" for lease in row["leases"]) or "-"
        table.add_row(row["name"], row["bridge"], _yes_no(row["up"]), ", ".join(row["addresses"]) or "-",
                      _yes_no(row["nat"]), leases, _yes_no(row["inSync"]))
    return table


def cmd_status(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    directory = args.directory or files.read_source(layout)
    if directory is None:
        raise CliError("no manifest directory given and none applied yet: infinization status DIR")
    view = asyncio.run(read_view(directory, layout, allow_restart=False, host=args.host, tolerate_errors=True,
                                 config=config_of(args), ask_agent=True))
    rows = status_rows(view, _daemon_status(layout, args.host))
    networks = network_rows(view)
    if args.json:
        print(json.dumps({"formatVersion": 1, "manifests": directory, "vms": rows, "networks": networks},
                         indent=2))
        return 0
    out.print(_vm_table(directory, rows))
    if networks:
        out.print(_network_table(networks))
    return 0
