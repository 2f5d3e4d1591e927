"""The host policy, as pure rules over observed facts: which host paths and ports a manifest may use.

A manifest comes from whoever can commit to the manifests' repository; ``spec.host.HostConfig`` comes
from the host's administrator. Every host path a VM names (``spec.boot.kernel``/``initrd``, a disk's
``image``, a CD-ROM's ``image``) must, after symlinks, be a regular file inside one of the storage roots
(themselves resolved), and not in the state directory (another VM's disk or state: our own disks are
addressed by name). A path nobody observed is refused (fail closed). A user-mode NIC's forwarded host port
must be in ``portForwardRange`` and not privileged.

The facts (``ObservedPath``) come from ``observe.paths`` for the planner and from ``adapters.paths`` for
the executor's re-check right before it acts; both judge them with ``path_refusal``, so there is one rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from reconciler.plan import steps as s
from reconciler.plan.observed import ObservedPath
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachineSpec

PRIVILEGED_BELOW = 1024
_STATE_SUBDIRS = ("vms", "disks", "networks", "tpm")
_UNSAFE = re.compile(r"[,=\x00-\x1f\x7f]")
_KIND_TEXT = {"directory": "a directory, not a regular file", "device": "a device node, not a regular file",
              "missing": "which does not exist", "other": "a socket, a FIFO or unreadable, not a regular file"}

Facts = Mapping[str, ObservedPath]


def manifest_paths(spec: VirtualMachineSpec) -> list[tuple[str, str]]:
    """Every host path the spec names, as (field, path), fields spelled as in the manifest."""
    named: list[tuple[str, str]] = []
    if spec.boot is not None:
        named.append(("spec.boot.kernel", spec.boot.kernel))
        if spec.boot.initrd:
            named.append(("spec.boot.initrd", spec.boot.initrd))
    named += [(f"spec.disks[{disk.name}].image", disk.image) for disk in spec.disks if disk.image]
    named += [(f"spec.cdroms[{cdrom.name}].image", cdrom.image) for cdrom in spec.cdroms if cdrom.image]
    named += [(f"spec.hostDevices[{dev.name}].romFile", dev.romFile) for dev in spec.hostDevices if dev.romFile]
    return named


def roots_for(field_name: str, host: HostConfig) -> list[str]:
    """Where a field's path may come from: a PCI option ROM from the firmware directories or the storage
    roots (ROMs ship under /usr/share), everything else from the storage roots."""
    if field_name.endswith(".romFile"):
        return [*host.firmwareDirs, *host.storageRoots]
    return list(host.storageRoots)


def under(path: str, root: str) -> bool:
    """``path`` is ``root`` or inside it (both absolute and normalised)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _in_state(path: str, state_dir: str) -> bool:
    """A file of the state directory itself (lock, store) or anything under its vms/, disks/, networks/."""
    if not under(path, state_dir) or path == state_dir:
        return False
    head, sep, _ = path[len(state_dir.rstrip("/")) + 1:].partition("/")
    return not sep or head in _STATE_SUBDIRS


def _resolved(path: str, facts: Facts) -> str:
    fact = facts.get(path)
    return fact.resolved if fact is not None else path


def usable_roots(roots: Sequence[str], facts: Facts) -> list[str]:
    """The storage roots that resolve to an existing directory, resolved."""
    return [fact.resolved for root in roots if (fact := facts.get(root)) is not None and fact.kind == "directory"]


def _roots_text(roots: Sequence[str], facts: Facts) -> str:
    shown = []
    for root in roots:
        fact = facts.get(root)
        if fact is None or fact.kind != "directory":
            shown.append(f"{root} (unusable: {'not observed' if fact is None else fact.kind})")
        else:
            shown.append(root if fact.resolved == root else f"{root} (-> {fact.resolved})")
    return ", ".join(shown) or "none"


def path_refusal(field_name: str, path: str, facts: Facts, roots: Sequence[str], state_dir: str) -> str | None:
    """Why the host policy refuses ``path`` for ``field_name``, or None when it may be opened."""
    roots_text = _roots_text(roots, facts)
    fact = facts.get(path)
    if fact is None:
        return f"{field_name}: {path} was not observed, so the host policy refuses it; storage roots: {roots_text}"
    head = f"{field_name}: {path} resolves to {fact.resolved}"
    if not any(under(fact.resolved, root) for root in usable_roots(roots, facts)):
        return f"{head}, outside the storage roots ({roots_text})"
    if _in_state(fact.resolved, _resolved(state_dir, facts)) or _in_state(path, state_dir):
        return (f"{head}, in the state directory {state_dir} (another VM's disk or state; a VM's own disks "
                f"are named, not given as image); storage roots: {roots_text}")
    if fact.kind != "file":
        return f"{head}, {_KIND_TEXT[fact.kind]}; storage roots: {roots_text}"
    if _UNSAFE.search(fact.resolved):
        return f"{head}, which contains ',' '=' or a control character; storage roots: {roots_text}"
    return None


def port_refusals(spec: VirtualMachineSpec, host: HostConfig) -> list[str]:
    """User-mode NICs' forwarded host ports outside the host's range, or privileged."""
    low, high = host.port_range
    refusals = []
    for nic in spec.networks:
        for index, forward in enumerate(nic.portForwards):
            where = f"spec.networks[{nic.name}].portForwards[{index}].host: port {forward.host}"
            if forward.host < PRIVILEGED_BELOW:
                refusals.append(f"{where} is privileged (below {PRIVILEGED_BELOW}); the host's portForwardRange "
                                f"is {host.portForwardRange}")
            elif not low <= forward.host <= high:
                refusals.append(f"{where} is outside the host's portForwardRange {host.portForwardRange}")
    return refusals


@dataclass(frozen=True)
class Verdict:
    """The policy's answer for one VM: refusals, or the spec with every host path resolved."""

    refusals: list[str] = field(default_factory=list)
    spec: VirtualMachineSpec | None = None


def check_vm(spec: VirtualMachineSpec, facts: Facts, host: HostConfig, state_dir: str) -> Verdict:
    """Judge every path and port of ``spec``; when all pass, the spec QEMU and qemu-img are to get (its
    paths resolved, so they open what was checked and the running QEMU is compared with that)."""
    refusals = [reason for name, path in manifest_paths(spec)
                if (reason := path_refusal(name, path, facts, roots_for(name, host), state_dir))]
    refusals += port_refusals(spec, host)
    if refusals:
        return Verdict(refusals=refusals)
    return Verdict(spec=resolve_spec(spec, lambda path: facts[path].resolved))


def resolve_spec(spec: VirtualMachineSpec, resolve: Callable[[str], str]) -> VirtualMachineSpec:
    """``spec`` with each host path replaced by ``resolve(path)``."""
    boot = spec.boot
    if boot is not None:
        boot = boot.model_copy(update={"kernel": resolve(boot.kernel),
                                       "initrd": resolve(boot.initrd) if boot.initrd else None})
    disks = [disk.model_copy(update={"image": resolve(disk.image)}) if disk.image else disk for disk in spec.disks]
    cdroms = [cd.model_copy(update={"image": resolve(cd.image)}) if cd.image else cd for cd in spec.cdroms]
    devices = [dev.model_copy(update={"romFile": resolve(dev.romFile)}) if dev.romFile else dev
               for dev in spec.hostDevices]
    return spec.model_copy(update={"boot": boot, "disks": disks, "cdroms": cdroms, "hostDevices": devices})


def _opened_fields(steps: Iterable[s.Step]) -> set[str] | None:
    """The fields whose paths these steps open; None: all of them (QEMU starts)."""
    fields: set[str] = set()
    for step in steps:
        match step:
            case s.Start():
                return None
            case s.CreateDisk() | s.HotplugDisk():
                fields.add(f"spec.disks[{step.target}].image")
            case s.HotplugCdrom() | s.ChangeMedia():
                fields.add(f"spec.cdroms[{step.target}].image")
            case s.HotplugHostDevice():
                fields.add(f"spec.hostDevices[{step.target}].romFile")
    return fields


def opens(spec: VirtualMachineSpec, steps: Iterable[s.Step], facts: Facts) -> list[str]:
    """What the plan shows a reviewer: each host path these steps make QEMU or qemu-img open, as
    ``field path`` (``-> resolved`` when a symlink leads elsewhere)."""
    wanted = _opened_fields(steps)
    shown = []
    for name, path in manifest_paths(spec):
        if wanted is None or name in wanted:
            resolved = _resolved(path, facts)
            shown.append(f"{name} {path}" + ("" if resolved == path else f" -> {resolved}"))
    return shown

