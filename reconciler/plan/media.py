"""Install media and the cloud-init seed: the spec QEMU is given, from the manifest and the record (pure).

``effective_spec`` is what the planner compares with the running QEMU and what the executor starts:
- a ``bootOnce`` CD-ROM keeps ``bootOnce`` (the argv gives it ``bootindex`` 1 and ``-action
  reboot=shutdown``, so the guest's first reboot ends QEMU) until the record says its install is done;
  then ``bootOnce`` is off and, with ``ejectAfterInstall``, the drive is empty;
- ``cloudInit`` becomes one more CD-ROM, ``cidata``, whose medium is the seed ISO in the VM's state folder
  (named by a hash of its content, so a changed user-data is a new medium).

``ended_installs`` says which begun installs are over: their QEMU is gone and did not end by a crash, a
panic or a stop by us (exit.json), so the guest powered off or rebooted by itself. Without the sync daemon
nothing records such an exit, and no exit record means exactly that (a stop by us always writes one).
"""

from __future__ import annotations

from collections.abc import Iterable

from reconciler.plan.observed import ObservedVM
from reconciler.spec.cloudinit import seed_digest
from reconciler.spec.models import CIDATA, CdromSpec, VirtualMachineSpec
from reconciler.state import paths
from reconciler.state.models import FAILURES, STOPPED, InstallRecord


def _install(installs: Iterable[InstallRecord], cdrom: CdromSpec) -> InstallRecord | None:
    """The record of an install from this CD-ROM's current medium (another medium is another install)."""
    return next((i for i in installs if i.cdrom == cdrom.name and i.image == cdrom.image), None)


def effective_spec(name: str, spec: VirtualMachineSpec, installs: Iterable[InstallRecord],
                   state_dir: str) -> VirtualMachineSpec:
    installs = list(installs)
    cdroms = []
    for cdrom in spec.cdroms:
        install = _install(installs, cdrom) if cdrom.bootOnce else None
        if install is not None and install.done:
            cdrom = cdrom.model_copy(update={"bootOnce": False,
                                             "image": None if cdrom.ejectAfterInstall else cdrom.image})
        cdroms.append(cdrom)
    if spec.cloudInit is not None:
        seed = paths.seed_file(state_dir, name, seed_digest(name, spec.cloudInit))
        cdroms.append(CdromSpec(name=CIDATA, image=seed))
    return spec.model_copy(update={"cdroms": cdroms})


def ended_installs(spec: VirtualMachineSpec, installs: Iterable[InstallRecord], obs: ObservedVM) -> list[str]:
    """The CD-ROMs whose install the guest ended (powered off or rebooted) since the record says it began."""
    process = obs.process
    ended = []
    for cdrom in spec.cdroms:
        install = _install(installs, cdrom) if cdrom.bootOnce else None
        if install is None or install.done:
            continue
        if process is not None and process.pid == install.pid and process.start_time in (None, install.start_time):
            continue  # the install runs
        if process is None and obs.last_exit not in FAILURES | {STOPPED}:
            ended.append(cdrom.name)
    return ended


def shown_opens(opens: list[str], spec: VirtualMachineSpec) -> list[str]:
    """The plan's ``opens`` without the media an install ejected (QEMU does not get them)."""
    empty = {f"spec.cdroms[{cdrom.name}].image " for cdrom in spec.cdroms if cdrom.image is None}
    return [line for line in opens if not any(line.startswith(prefix) for prefix in empty)]
