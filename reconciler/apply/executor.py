"""Run a Plan: each VM's steps in order, VMs side by side (``apply.scheduler``), every step re-checking
before it acts.

A failing step stops that VM's remaining steps (they depended on it); the other VMs go on, so one broken
VM never blocks the others. Dispatch is one exhaustive ``match`` over the ``Step``
union (``_run_step``): it says how each kind runs (on the VM's files and process, over its QMP monitor,
or on host networking in a worker thread), and each of those has its own exhaustive ``match``; a step
kind without a handler is a mypy error. ``INFINIZATION_CRASH_AT=before:KIND`` or ``after:KIND`` (KIND a
step kind such as ``start``) makes the process SIGKILL itself at that point (``apply.crashpoints``): the
fault injection the crash-safety tests use to prove that a re-run converges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import assert_never

from reconciler.adapters import monitor, procfs, threads
from reconciler.adapters import paths as host_paths
from reconciler.apply import disks, hostdev_plug, hostnet, hotplug, placement, scheduler, swtpm, vfio, vmprocess
from reconciler.apply import display as display_apply
from reconciler.apply import runstate as run_state
from reconciler.apply.crashpoints import maybe_crash
from reconciler.errors import InfinizationError, Permanent, Refused, StepFailed
from reconciler.plan import media, policy
from reconciler.plan import steps as s
from reconciler.plan.actions import Change, Plan
from reconciler.plan.steps import Step
from reconciler.spec.cloudinit import seed_digest, seed_files
from reconciler.spec.host import HostConfig
from reconciler.spec.models import CIDATA, REDACTED, Network, VirtualMachine, nic_bridge
from reconciler.spec.naming import host_device
from reconciler.state import files
from reconciler.state.layout import StateLayout, VMPaths
from reconciler.state.models import InstallRecord


@dataclass(frozen=True)
class StepResult:
    step: Step
    ok: bool
    detail: str
    seconds: float
    permanent: bool = False  # the failure needs a person (a refusal, a corrupt record): retrying cannot help
    ran: bool = True  # False: never begun (skipped, fail-closed, after a host-wide change failed)


@dataclass(repr=False)  # asyncio.run() of Python 3.11 formats its result's repr (see cli.common.View)
class ApplyResult:
    results: list[StepResult] = field(default_factory=list)
    failed_vms: dict[str, str] = field(default_factory=dict)
    permanent: set[str] = field(default_factory=set)  # resources whose failure needs a person

    @property
    def ok(self) -> bool:
        return not self.failed_vms


Reporter = Callable[[StepResult], None]
Starter = Callable[[Step], None]  # told when a step begins (a progress display shows it while it waits)
Finisher = Callable[[Change, bool], None]  # told when a change has ended (ok or not), as the others go on


class Executor:
    def __init__(self, layout: StateLayout, report: Reporter | None = None,
                 sources: dict[str, str] | None = None, revision: str | None = None,
                 host: HostConfig | None = None, jobs: int | None = None, started: Starter | None = None,
                 finished: Finisher | None = None) -> None:
        self.layout = layout
        self.jobs = jobs  # how many VMs' changes may run at once (None: scheduler.default_limit())
        self.host = host or HostConfig()  # the host's policy: QEMU's user and binary, storage roots
        self.report = report or (lambda result: None)
        self.started = started or (lambda step: None)
        self.finished = finished or (lambda change, ok: None)
        self.sources = sources or {}
        self.revision = revision

    async def run(self, plan: Plan) -> ApplyResult:
        """Run the plan's changes: host-wide ones in plan order, VMs' side by side, each VM's steps in order
        (``apply.scheduler`` decides when each runs). Fail-closed: once a bridge or firewall change has
        failed, no VM change runs after it (a VM started then could be on a bridge without its rules)."""
        outcome = ApplyResult()

        async def run_change(change: Change) -> bool:
            await self._run_change(change, outcome)
            ok = change.name not in outcome.failed_vms
            self.finished(change, ok)
            return ok

        def skip(change: Change, why: str) -> None:
            skipped = StepResult(change.steps[0], False, why, 0.0, ran=False)
            outcome.results.append(skipped)
            self.report(skipped)
            outcome.failed_vms[change.name] = why

        runnable = [change for change in plan.changes if change.steps and not change.refusals]
        await scheduler.run_all(runnable, run_change, skip, self.jobs)
        return outcome

    async def _run_change(self, change: Change, outcome: ApplyResult) -> None:
        for step in change.steps:
            began = time.monotonic()
            maybe_crash("before", step.kind.value)
            self.started(step)
            permanent = False
            try:
                detail = await self._run_step(step)
                ok = True
            except (InfinizationError, OSError, ValueError) as exc:
                detail, ok, permanent = str(exc), False, isinstance(exc, Permanent)
            result = StepResult(step, ok, detail, time.monotonic() - began, permanent)
            outcome.results.append(result)
            self.report(result)
            if not ok:
                outcome.failed_vms[change.name] = f"{step.summary}: {detail}"
                if permanent:
                    outcome.permanent.add(change.name)
                return
            maybe_crash("after", step.kind.value)

    async def _run_step(self, step: Step) -> str:
        """The one dispatch table: how each kind of step runs."""
        match step:
            case (s.WriteRecord() | s.CreateDisk() | s.GrowDiskLive() | s.GrowDiskOffline() | s.Stop() | s.Start()
                  | s.DeleteDisk() | s.Forget() | s.StopTpm() | s.DeleteTpmState() | s.FinishInstall()
                  | s.RecordDisplayPort() | s.SetDisplayPassword() | s.RecordLaunch()):
                return await self._vm_step(step)
            case (s.HotplugDisk() | s.UnplugDisk() | s.HotplugNic() | s.UnplugNic() | s.SetLink() | s.SetIoLimits()
                  | s.AddCpus() | s.AddMemory() | s.SetBalloon() | s.HotplugCdrom() | s.UnplugCdrom()
                  | s.ChangeMedia() | s.HotplugHostDevice() | s.UnplugHostDevice() | s.SetPlacement() | s.Pause()
                  | s.Resume()):
                paths = self.layout.vm(step.name)
                vm = self._recorded_vm(paths)
                if isinstance(step, s.HotplugHostDevice):
                    vm = self._resolved_vm(vm)  # a romFile re-checked and resolved, as at a start
                step = self._media_checked(step)
                async with monitor.session(paths.qmp) as qmp:
                    return await _live_step(qmp, paths, vm, step, self._bridges(vm))
            case (s.WriteNetworkRecord() | s.EnsureBridge() | s.DeleteBridge() | s.ForgetNetwork() | s.ApplyFirewall()
                  | s.RepairTap() | s.EnsureDhcp() | s.StopDhcp()):
                # pyroute2's sync IPRoute refuses to run in the event loop's thread.
                return await threads.run(self._host_step, step)
            case s.CreateEfiVars() | s.DeleteEfiVars() | s.ResetEfiVars() | s.PrepareHostDevice() \
                    | s.ReleaseHostDevice():
                return await self._vm_step(step)
            case _:
                assert_never(step)

    async def _vm_step(self, step: s.VMStep) -> str:
        """Steps on a VM's record, disk files and process."""
        paths = self.layout.vm(step.name)
        match step:
            case s.WriteRecord():
                # Blocking file work (fsync) and qemu-img runs go to a worker thread: other VMs' steps go on.
                await threads.run(files.write_record, paths, step.vm, self.sources.get(step.name),
                                        self.revision)
                return "recorded"
            case s.CreateDisk():
                return await threads.run(self._create_disk, paths, step)
            case s.GrowDiskLive():
                return await disks.grow_live(paths.qmp, step.node, Path(step.path), step.size)
            case s.GrowDiskOffline():
                # qemu-img takes the image's write lock: it refuses an image a running QEMU has open.
                return await threads.run(disks.grow_offline, Path(step.path), step.size)
            case s.Start():
                return await self._start(paths)
            case s.RecordLaunch():
                return await self._record_adopted(paths, step.pid) or "already recorded"
            case s.Stop():
                return await vmprocess.stop(paths, float(step.timeout))
            case s.DeleteDisk():
                return self._delete_disk(paths, step)
            case s.Forget():
                return await self._forget(paths)
            case s.StopTpm() | s.DeleteTpmState():
                return await _tpm_step(paths, step)
            case s.CreateEfiVars() | s.DeleteEfiVars() | s.ResetEfiVars():
                return self._efi_vars_step(paths, step)
            case s.FinishInstall():
                return self._finish_install(paths, step)
            case s.RecordDisplayPort():
                files.record_display_port(paths, step.port)
                return f"port {step.port} kept for the display"
            case s.SetDisplayPassword():
                vm = self._recorded_vm(paths)
                return await display_apply.set_password(self.layout, paths, self.host, vm.name, vm.spec.display)
            case s.PrepareHostDevice() | s.ReleaseHostDevice():
                return await self._host_device_step(paths, step)
            case _:
                assert_never(step)

    def _create_disk(self, paths: VMPaths, step: s.CreateDisk) -> str:
        if Path(step.path).exists():
            return "already exists (kept as it is)"
        image = self._require(f"spec.disks[{step.target}].image", step.image) if step.image else None
        files.claim_disk(paths, step.target)
        try:
            return disks.create(Path(step.path), step.size, image, step.image_format,
                                owner=vmprocess.qemu_account(self.host), preallocation=step.preallocation)
        except BaseException:
            if not Path(step.path).exists():  # rolled back: the record claims no disk that is not there
                files.unclaim_disk(paths, step.target)
            raise

    @staticmethod
    async def _forget(paths: VMPaths) -> str:
        if procfs.find_qemu(paths) is not None or procfs.find_swtpm(paths) is not None:
            raise StepFailed("the VM is still running: refusing to forget it (it is stopped first)")
        await placement.remove_cgroups(paths)  # a QEMU that died leaves its empty cgroups: none outlives the VM
        files.forget_vm(paths)
        return "forgotten"

    async def _host_device_step(self, paths: VMPaths, step: s.PrepareHostDevice | s.ReleaseHostDevice) -> str:
        """Take a host device for the VM (vfio-pci, node owners), or give it back once its QEMU lacks it."""
        if isinstance(step, s.ReleaseHostDevice):
            if procfs.find_qemu(paths) is not None:
                async with monitor.session(paths.qmp) as qmp:
                    if host_device(step.target) in await monitor.peripheral_ids(qmp):
                        raise StepFailed(f"the VM's QEMU still has hostdev-{step.target}: not giving it back")
            return await threads.run(vfio.release, self.layout, self.host, step.name, step.keys)
        account = vmprocess.qemu_account(self.host)
        if step.bus == "usb":
            return await threads.run(vfio.take_usb, self.layout, self.host, step.name, step.target,
                                           step.address, account)
        return await threads.run(vfio.take_pci, self.layout, self.host, step.name, step.target, step.address,
                                       step.members, step.group, account)

    def _efi_vars_step(self, paths: VMPaths, step: s.CreateEfiVars | s.DeleteEfiVars | s.ResetEfiVars) -> str:
        """A UEFI VM's variable store: copied once from the template (re-checked in the firmware
        directories; an existing store is kept), replaced from the other template (Secure Boot toggled;
        the old one kept as a dated backup), or deleted, each of the last two only once its QEMU is gone."""
        if isinstance(step, s.DeleteEfiVars | s.ResetEfiVars) and procfs.find_qemu(paths) is not None:
            raise StepFailed("the VM is still running: refusing to replace or delete its UEFI variables")
        if isinstance(step, s.DeleteEfiVars):
            return "deleted" if files.delete_efi_vars(paths) else "already gone"
        template = host_paths.require("firmware VARS template", step.template, self.host, str(self.layout.root),
                                      roots=self.host.firmwareDirs)
        uid, gid = vmprocess.qemu_account(self.host)
        if isinstance(step, s.ResetEfiVars):
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            return files.reset_efi_vars(template, paths, uid, gid, step.secure_boot, stamp)
        copied = files.install_efi_vars(template, paths, uid, gid, step.secure_boot)
        return "copied" if copied else "already exists (kept as it is)"

    def _require(self, field_name: str, path: str) -> str:
        """The host policy's re-check right before a path is opened: the resolved path, or Refused."""
        return host_paths.require(field_name, path, self.host, str(self.layout.root))

    def _media_checked(self, step: s.LiveStep) -> s.LiveStep:
        """A CD-ROM's new medium, re-checked and resolved (the cloud-init seed: built from the record)."""
        if isinstance(step, s.HotplugCdrom | s.ChangeMedia) and step.target == CIDATA:
            paths = self.layout.vm(step.name)
            return step.model_copy(update={"image": str(_seed(paths, self._recorded_vm(paths)))})
        if isinstance(step, s.HotplugCdrom | s.ChangeMedia) and step.image:
            return step.model_copy(update={"image": self._require(f"spec.cdroms[{step.target}].image", step.image)})
        return step

    def _resolved_vm(self, vm: VirtualMachine) -> VirtualMachine:
        """The VM as QEMU is to get it: every host path re-checked against the host policy and resolved
        (the planner compares the running QEMU with the same resolved spec)."""
        resolved = {path: host_paths.require(field_name, path, self.host, str(self.layout.root),
                                             roots=policy.roots_for(field_name, self.host))
                    for field_name, path in policy.manifest_paths(vm.spec)}
        return vm.model_copy(update={"spec": policy.resolve_spec(vm.spec, resolved.__getitem__)})

    async def _start(self, paths: VMPaths) -> str:
        await vmprocess.settle_interrupted_launch(paths)
        if procfs.find_qemu(paths) is not None:  # e.g. launched by a start interrupted before it was recorded
            adopted = await self._record_adopted(paths)
            return f"already running; {adopted}" if adopted else "already running"
        vm = self._resolved_vm(self._recorded_vm(paths))
        vm = self._as_started(paths, vm)
        fw = host_paths.require_firmware(vm.spec, self.host, str(self.layout.root))
        started = await vmprocess.start(self.layout, paths, vm, self._bridges(vm), self.host, firmware=fw)
        try:  # atomic: a QEMU that runs without the links or I/O limits its manifest asks is not left running
            extra = []
            if hotplug.needs_after_start(vm):
                async with monitor.session(paths.qmp) as qmp:
                    extra = await hotplug.after_start(qmp, paths, vm)
            if vm.spec.display.passwordFile is not None:  # QEMU started locked (password=on, none set) until now
                extra.append(await display_apply.set_password(self.layout, paths, self.host, vm.name,
                                                              vm.spec.display))
        except (InfinizationError, OSError) as exc:
            cleaned = await asyncio.shield(vmprocess.abort_started(paths))
            raise StepFailed(f"{exc}; {cleaned}") from exc
        installing = self._began_installs(paths, vm)
        return ", ".join([started, *installing, *extra])

    async def _record_adopted(self, paths: VMPaths, pid: int | None = None) -> str | None:
        """A QEMU launched by an interrupted start: recorded now, with the installs its start began."""
        return await vmprocess.record_adopted(
            paths, pid, lambda vm, qemu, began: self._began_installs(paths, vm, (qemu, began)))

    def _as_started(self, paths: VMPaths, vm: VirtualMachine) -> VirtualMachine:
        """The VM as QEMU gets it: install media per the record, and the cloud-init seed (built here)."""
        record = files.read_record(paths)
        spec = media.effective_spec(vm.name, vm.spec, record.installs if record else [], str(self.layout.root))
        if vm.spec.cloudInit is not None:
            _seed(paths, vm)
        return display_apply.as_started(paths, vm.model_copy(update={"spec": spec}))

    @staticmethod
    def _began_installs(paths: VMPaths, vm: VirtualMachine, qemu: tuple[int, int] | None = None) -> list[str]:
        """Record the installs this start began (booting from bootOnce CD-ROMs), with the QEMU that runs them
        (``qemu``: its pid and start time; else those launch.json recorded)."""
        if qemu is None:
            launch = files.read_launch(paths)
            qemu = (launch.pid, launch.start_time) if launch and launch.pid and launch.start_time else None
        booting = [cdrom for cdrom in vm.spec.cdroms if cdrom.bootOnce]
        if not booting or qemu is None:
            return []
        files.record_installs(paths, [InstallRecord(cdrom=cdrom.name, image=cdrom.image, pid=qemu[0],
                                                    start_time=qemu[1]) for cdrom in booting])
        return [f"install from CD-ROM {', '.join(cdrom.name for cdrom in booting)} began (boots from it once)"]

    @staticmethod
    def _finish_install(paths: VMPaths, step: s.FinishInstall) -> str:
        if procfs.find_qemu(paths) is not None:
            raise StepFailed("the VM runs again: its install is not over (re-plan)")
        record = files.read_record(paths)
        begun = [i for i in (record.installs if record else []) if i.cdrom in step.cdroms]
        files.record_installs(paths, [i.model_copy(update={"done": True, "ejected": i.cdrom in step.ejected})
                                      for i in begun])
        return "install done" + (f", {', '.join(step.ejected)} ejected" if step.ejected else "")

    @staticmethod
    def _delete_disk(paths: VMPaths, step: s.DeleteDisk) -> str:
        record = files.read_record(paths)
        if record is None or step.target not in record.owned_disks:
            raise Refused(f"disk {step.target} was not created by infinization: refusing to delete it")
        if procfs.find_qemu(paths) is not None:
            raise StepFailed("the VM is still running: refusing to delete its disk")
        return disks.delete(Path(step.path))

    def _host_step(self, step: s.HostStep) -> str:
        """Steps on host networking; runs in a worker thread."""
        match step:
            case s.WriteNetworkRecord():
                files.write_network_record(self.layout, step.network)
                return "recorded"
            case s.EnsureBridge():
                return hostnet.ensure_bridge(step.bridge, step.address, step.remove_address, step.ip_forward,
                                             ipv6=step.ipv6)
            case s.DeleteBridge():
                if not files.has_network_record(self.layout, step.name):
                    raise Refused(f"no record of Network {step.name}: refusing to delete a bridge we did not create")
                return hostnet.delete_bridge(step.bridge)
            case s.ForgetNetwork():
                files.forget_network(self.layout, step.name)
                return "forgotten"
            case s.ApplyFirewall():
                return hostnet.apply_firewall(step.script)
            case s.RepairTap():
                if step.bridge is None:
                    raise Refused(f"NIC {step.target}: its bridge is unknown (its Network does not exist)")
                return hostnet.repair_tap(step.tap, step.bridge)
            case s.EnsureDhcp():
                return hostnet.ensure_dhcp(step.argv, Path(step.pidfile))
            case s.StopDhcp():
                return hostnet.stop_dhcp(Path(step.pidfile))
            case _:
                assert_never(step)

    def _bridges(self, vm: VirtualMachine) -> dict[str, str]:
        """Each bridged NIC's bridge: its own, or its Network's (from the records of Networks we created)."""
        created: dict[str, Network] = {n: r.network for n, r in files.read_network_records(self.layout).items()}
        bridges = {}
        for nic in vm.spec.networks:
            if nic.type != "bridge":
                continue
            bridge = nic_bridge(nic, created)
            if bridge is None:
                raise StepFailed(f"NIC {nic.name}: Network {nic.network} has not been created")
            bridges[nic.name] = bridge
        return bridges

    @staticmethod
    def _recorded_vm(paths: VMPaths) -> VirtualMachine:
        record = files.read_record(paths)
        if record is None:
            raise Refused("no record of this VM: the record step must run first (re-run apply)")
        return record.vm


def _seed(paths: VMPaths, vm: VirtualMachine) -> Path:
    """Build (or find) the VM's cloud-init seed ISO from its record; its path."""
    cloud_init = vm.spec.cloudInit
    if cloud_init is None:
        raise Refused("the VM has no cloudInit: no seed to build")
    if cloud_init.userData.startswith(REDACTED):
        raise Refused("the record holds a redacted user-data: re-apply the manifests")
    return files.write_seed(paths, seed_digest(vm.name, cloud_init), seed_files(vm.name, cloud_init))


async def _live_step(qmp: monitor.Monitor, paths: VMPaths, vm: VirtualMachine, step: s.LiveStep,
                     bridges: dict[str, str]) -> str:
    """Steps on a running VM, within one QMP session."""
    target = step.target
    match step:
        case s.HotplugDisk():
            return await hotplug.hotplug_disk(qmp, paths, vm, target, step.iops, step.bps)
        case s.UnplugDisk():
            return await hotplug.unplug_disk(qmp, paths, target)
        case s.HotplugNic():
            done = await hotplug.hotplug_nic(qmp, vm, target, bridges)
            if step.link == "down":
                done += ", link " + await hotplug.set_link(qmp, paths, target, False)
            return done
        case s.UnplugNic():
            return await hotplug.unplug_nic(qmp, paths, target)
        case s.SetLink():
            return await hotplug.set_link(qmp, paths, target, step.up)
        case s.SetIoLimits():
            return await hotplug.set_io_limits(qmp, target, step.iops, step.bps)
        case s.AddCpus():
            return await hotplug.add_cpus(qmp, step.count)
        case s.SetPlacement():
            return await placement.apply(qmp, paths, step)
        case s.AddMemory():
            return await hotplug.add_memory(qmp, step.size, step.hugepages)
        case s.SetBalloon():
            return await hotplug.set_balloon(qmp, paths, step.size)
        case s.HotplugCdrom():
            return await hotplug.hotplug_cdrom(qmp, target, step.image)
        case s.UnplugCdrom():
            return await hotplug.unplug_cdrom(qmp, paths, target)
        case s.ChangeMedia():
            return await hotplug.change_media(qmp, target, step.image)
        case s.HotplugHostDevice():
            return await hostdev_plug.hotplug_host_device(qmp, vm, target)
        case s.UnplugHostDevice():
            return await hostdev_plug.unplug_host_device(qmp, paths, target)
        case s.Pause():
            return await run_state.pause(qmp)
        case s.Resume():
            return await run_state.resume(qmp, step.from_state)
        case _:
            assert_never(step)


async def _tpm_step(paths: VMPaths, step: s.StopTpm | s.DeleteTpmState) -> str:
    """A swtpm left without its QEMU, or the TPM state of a VM deleted with its disks: never while QEMU runs."""
    if procfs.find_qemu(paths) is not None:
        raise StepFailed("the VM's QEMU runs: refusing to touch its TPM")
    if isinstance(step, s.StopTpm):
        return await swtpm.stop(paths) or "no swtpm of this VM runs"
    if procfs.find_swtpm(paths) is not None:
        raise StepFailed("its swtpm still runs: refusing to delete the TPM state")
    return "deleted" if files.delete_tpm_state(paths) else "already gone"
