"""Resolve host paths for the host policy: the one place that looks at what a path really is.

``observe_path`` follows symlinks (``os.path.realpath``) and stats the result; ``require`` is the
executor's re-check right before it hands a manifest's path to QEMU or qemu-img: it observes the path, the
storage roots and the state directory again, judges them with the planner's own rule
(``plan.policy.path_refusal``) and returns the resolved path to open, or raises ``Refused``. A symlink
swapped between plan and apply is caught here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence

from reconciler.errors import Refused
from reconciler.plan.firmware import Firmware, probe_paths, select
from reconciler.plan.observed import ObservedPath, PathKind
from reconciler.plan.policy import path_refusal
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachineSpec


def observe_path(path: str) -> ObservedPath:
    """What ``path`` resolves to after every symlink, and the kind of file found there."""
    resolved = os.path.realpath(path)
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        return ObservedPath(path=path, resolved=resolved, kind="missing")
    except OSError:
        return ObservedPath(path=path, resolved=resolved, kind="other")
    kind: PathKind
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "directory"
    elif stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        kind = "device"
    else:
        kind = "other"
    return ObservedPath(path=path, resolved=resolved, kind=kind)


def policy_facts(host: HostConfig, state_dir: str, named: Iterable[str]) -> dict[str, ObservedPath]:
    """Facts for the given manifest paths, every storage root and the state directory, by path."""
    wanted = sorted({*named, *host.storageRoots, state_dir})
    return {path: observe_path(path) for path in wanted}


def require(field: str, path: str, host: HostConfig, state_dir: str, roots: Sequence[str] | None = None) -> str:
    """The resolved ``path`` if the host policy lets ``field`` open it now.

    :raise Refused: When it resolves outside the storage roots, into the state directory, or to anything
        but a regular file.
    """
    roots = host.storageRoots if roots is None else roots  # firmware: the firmware directories
    facts = policy_facts(host, state_dir, [path, *roots])
    reason = path_refusal(field, path, facts, roots, state_dir)
    if reason is not None:
        raise Refused(f"host policy: {reason}")
    return facts[path].resolved


def require_firmware(spec: VirtualMachineSpec, host: HostConfig, state_dir: str) -> Firmware | None:
    """The OVMF files for a UEFI VM, probed again right before QEMU starts (None for BIOS).

    :raise Refused: When none is usable now (the planner's rule: ``plan.firmware.select``).
    """
    if spec.firmware.type != "uefi":
        return None
    found = select(spec, policy_facts(host, state_dir, [*host.firmwareDirs, *probe_paths(host)]), host, state_dir)
    if isinstance(found, str):
        raise Refused(f"host policy: {found}")
    return found
