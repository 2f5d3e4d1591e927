"""Start and stop QEMU processes, confined.

Start: check QEMU's user exists, give it its run directory, open what QEMU needs (disks read-write,
backing images and CD-ROM media read-only: fd sets; TAPs), copy the kernel and initrd for it, write the
launch record, and launch the argv from the pure builder through a tiny ``/bin/sh`` launcher (the argv
goes in as ``"$@"``, never parsed) that backgrounds ``setpriv`` (QEMU's uid and gid, only the
supplementary groups the host gives that user, e.g. ``kvm``; NoNewPrivs, no capabilities, empty
bounding set) and prints its pid: QEMU runs in the foreground
under its seccomp sandbox (QEMU 7.2 kills a ``-daemonize``d QEMU under ``spawn=deny``), in its own session,
re-parented to PID 1 once the launcher exits. Its stderr goes to ``qemu.log`` (root's); the pid and start
time go to ``launch.json``. Then wait until the monitor says the guest runs, or until QEMU is gone: then
report the log's last lines (QEMU's own message). Where the host has a cgroup v2 hierarchy, QEMU is moved
into a cgroup of its own (``infinization.slice/vm-NAME-HASH.scope``); its cgroups go when it stops. A VM
with ``memory.hugepages`` gets a private hugetlbfs (``apply/hugetlb.py``) for QEMU's memory backend.
Stop: the guest agent's ``guest-shutdown`` when the VM has the agent's port and the agent answers, then
``system_powerdown``, each waiting within the grace period, then ``quit``, then SIGKILL, each only to the
PID we verified (and re-verify right before signalling, the SIGKILL through a pidfd opened before that
check) as this VM's QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from reconciler.adapters import agent, cgroups, monitor, procfs, threads
from reconciler.apply import disks, hostnet, hugetlb, placement, swtpm, tpm_setup
from reconciler.apply.crashpoints import maybe_crash
from reconciler.errors import MonitorError, Refused, StepFailed
from reconciler.plan.firmware import Firmware
from reconciler.plan.placement import hugepage_dir
from reconciler.qemu.argv import OpenedFiles, build_argv, swtpm_argv
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachine, nic_mac, tap_name
from reconciler.state import files
from reconciler.state.layout import StateLayout, VMPaths
from reconciler.state.models import STOPPED, ExitRecord

QUIT_TIMEOUT = 5.0
READY_TIMEOUT = 30.0
POLL = 0.02
REPRESS = 2.0
SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
TASKSET = "/usr/bin/taskset"
VHOST_NET = Path("/dev/vhost-net")
# Background QEMU (under setpriv), print its pid, exit: QEMU is re-parented to PID 1.
LAUNCHER = 'umask 077; "$@" </dev/null >/dev/null & echo "$!"'
LAUNCH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def qemu_account(host: HostConfig) -> tuple[int, int]:
    """QEMU's uid and gid. :raise Refused: When the configured user does not exist (or is root)."""
    try:
        entry = pwd.getpwnam(host.qemuUser)
    except KeyError:
        raise Refused(f"QEMU's user {host.qemuUser!r} does not exist: run scripts/setup.sh as root "
                      "(it creates it)") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise Refused(f"QEMU's user {host.qemuUser!r} is root's uid or group: name an unprivileged user")
    return entry.pw_uid, entry.pw_gid


def _open_files(paths: VMPaths, vm: VirtualMachine, uid: int, gid: int,
                firmware: Firmware | None = None) -> OpenedFiles:
    """Open what QEMU will use (fd sets) and copy its boot files; on failure nothing stays open."""
    sets = itertools.count(1)
    fds: dict[int, int] = {}
    names: dict[int, str] = {}
    vhost: dict[str, list[int]] = {}
    chosen: dict[str, dict[str, int]] = {"disks": {}, "backing": {}, "cdroms": {}, "firmware": {}}

    def add(kind: str, name: str, path: str, fd: int) -> None:
        fdset = next(sets)
        fds[fdset], names[fdset] = fd, path
        chosen[kind][name] = fdset

    try:
        for disk in vm.spec.disks:
            path = paths.disk(disk.name)
            add("disks", disk.name, str(path), disks.open_for_qemu(path, uid, gid, disk.readOnly))
            if disk.image:
                add("backing", disk.name, disk.image, disks.open_read_only(disk.image))
        for cdrom in vm.spec.cdroms:
            if cdrom.image:
                add("cdroms", cdrom.name, cdrom.image, disks.open_read_only(cdrom.image))
        if firmware is not None:  # OVMF's code read-only, the VM's own variable store read-write
            add("firmware", "code", firmware.code, disks.open_read_only(firmware.code))
            add("firmware", "vars", str(paths.efi_vars), files.open_efi_vars(paths))
        for nic in vm.spec.networks:
            if nic.type == "bridge" and VHOST_NET.exists():
                vhost[nic.name] = []
                for _ in range(nic.queues):
                    vhost[nic.name].append(_open_vhost())
        kernel = initrd = None
        if vm.spec.boot is not None:
            kernel = _boot_copy(paths, "kernel", vm.spec.boot.kernel, uid, gid)
            initrd = _boot_copy(paths, "initrd", vm.spec.boot.initrd, uid, gid) if vm.spec.boot.initrd else None
    except BaseException:
        hostnet.close_all([*fds.values(), *(fd for opened in vhost.values() for fd in opened)])
        raise
    return OpenedFiles(fds=fds, names=names, vhost=vhost, kernel=kernel, initrd=initrd, disks=chosen["disks"],
                       backing=chosen["backing"], cdroms=chosen["cdroms"], firmware=chosen["firmware"])


def _open_vhost() -> int:
    """A /dev/vhost-net fd for one TAP queue (root-only device: QEMU's user cannot open it)."""
    try:
        return os.open(VHOST_NET, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise StepFailed(f"cannot open {VHOST_NET}: {exc.strerror or exc}") from exc


def _inherited(taps: dict[str, list[int]], opened: OpenedFiles) -> list[int]:
    """Every fd QEMU inherits: TAP queues, fd sets, vhost-net."""
    return [*(fd for fds in taps.values() for fd in fds), *opened.fds.values(),
            *(fd for fds in opened.vhost.values() for fd in fds)]


def _boot_copy(paths: VMPaths, what: str, source: str, uid: int, gid: int) -> str:
    try:
        files.install_boot_copy(source, paths.boot_copy(what), uid, gid)
    except OSError as exc:
        raise StepFailed(f"cannot copy the {what} {source} for QEMU: {exc.strerror or exc}") from exc
    return str(paths.boot_copy(what))


def memlock_limit(vm: VirtualMachine) -> int | None:
    """The locked-memory limit QEMU needs: with a PCI device passed through, VFIO pins all guest memory for
    DMA, so (libvirt's rule) the guest's maximum memory plus 1 GiB; None: the user's default."""
    if not any(device.pci for device in vm.spec.hostDevices):
        return None
    return (vm.spec.memory.maxSize or vm.spec.memory.size) + 1024**3


def _launch(paths: VMPaths, argv: list[str], uid: int, gid: int, fds: list[int], what: str = "QEMU",
            memlock: int | None = None, cpus: str | None = None) -> int:
    """Run QEMU (or, ``what`` = "swtpm", the VM's swtpm) detached as ``uid``:``gid`` with no privileges; its pid.
    ``cpus``: the CPUs it may run on from its first instruction (taskset execs setpriv, which execs QEMU)."""
    # prlimit as root, before setpriv drops privileges: an unprivileged process cannot raise its hard limit.
    limits = [PRLIMIT, f"--memlock={memlock}:{memlock}", "--"] if memlock is not None else []
    # --init-groups: the user's groups from the host's database only (e.g. kvm, for /dev/kvm), never ours.
    setpriv = [*limits, *([TASKSET, "-c", cpus] if cpus else []), SETPRIV, f"--reuid={uid}", f"--regid={gid}",
               "--init-groups", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
    log = files.open_qemu_log(paths) if what == "QEMU" else files.open_swtpm_log(paths)
    try:
        done = subprocess.run(["/bin/sh", "-c", LAUNCHER, "infinization-launch", *setpriv, *argv],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, pass_fds=fds,
                              cwd=paths.run, env=LAUNCH_ENV, start_new_session=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StepFailed(f"cannot launch {what}: {exc}") from exc
    finally:
        os.close(log)
    pid = done.stdout.strip()
    if done.returncode != 0 or not pid.isdigit():
        said = files.qemu_log_tail(paths) if what == "QEMU" else files.swtpm_log_tail(paths)
        raise StepFailed(f"cannot launch {what}: {said or f'exit status {done.returncode}'}")
    return int(pid)


def _own_cgroup(paths: VMPaths, pid: int, cpus: str | None = None) -> str:
    """Move QEMU into a cgroup v2 of its own (``infinization.slice/vm-NAME-HASH.scope``), where the host mounts
    one, and under the ``cpu`` controller's slice; what was done (best effort: grouping, accounting and CPU
    weight; a pinned VM's cpuset is set by set-placement)."""
    mount = cgroups.cgroup2_mount()
    placement.sweep_empty()  # empty cgroups of QEMUs that were killed: the kernel keeps populated ones
    done = "no cgroup v2"
    if mount is not None:
        group = mount / cgroups.SLICE / cgroups.scope_name(paths.dir)
        try:
            group.mkdir(parents=True, exist_ok=True)
            if cpus and (group / "cpuset.cpus").exists():  # v2 with cpuset: joining would reset QEMU's affinity
                (group / "cpuset.cpus").write_text(f"{cpus}\n")
            (group / "cgroup.procs").write_text(f"{pid}\n")
            done = f"cgroup {group}"
        except OSError as exc:
            done = f"cgroup v2 not used ({exc.strerror or exc})"
    return f"{done}; {_cpu_weight(paths, pid)}"


def _cpu_weight(paths: VMPaths, pid: int) -> str:
    """Put QEMU under ``infinization.slice`` in the ``cpu`` controller: every VM together then weighs as much as
    one other top-level cgroup, so guests booting or spinning leave the reconciler (and the host's services) a
    fair share of the CPU instead of 1/(N+1) of it. What was done (best effort)."""
    found = cgroups.cpu_weight_mount()
    if found is None:
        return "no cpu controller"
    version, mount = found
    slice_dir = mount / cgroups.SLICE
    try:
        slice_dir.mkdir(mode=0o755, exist_ok=True)
        if version == "v2":  # the VM's scope (joined above) gets the controller from its parents
            for parent in (mount, slice_dir):
                if "cpu" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+cpu\n")
            return f"cpu weight under {slice_dir}"
        group = slice_dir / cgroups.scope_name(paths.dir)
        group.mkdir(mode=0o755, exist_ok=True)
        (group / "cgroup.procs").write_text(f"{pid}\n")  # v1: the tgid moves every thread
        return f"cpu weight under {slice_dir}"
    except OSError as exc:
        return f"cpu weight not set ({exc.strerror or exc})"


async def start(layout: StateLayout, paths: VMPaths, vm: VirtualMachine, bridges: dict[str, str],
                host: HostConfig, firmware: Firmware | None = None) -> str:
    """Start the VM unless its QEMU already runs (its swtpm first, when it has a TPM); what was done."""
    if not vm.spec.tpm.enabled or procfs.find_qemu(paths) is not None:
        return await _start_qemu(layout, paths, vm, bridges, host, firmware)
    tpm = await _start_swtpm(layout, paths, host)
    try:
        return f"{await _start_qemu(layout, paths, vm, bridges, host, firmware)}, {tpm}"
    except BaseException:
        await swtpm.stop(paths)  # a swtpm without its QEMU would wait forever for a connection
        raise


async def _start_swtpm(layout: StateLayout, paths: VMPaths, host: HostConfig) -> str:
    """Start the VM's swtpm (one per TPM state: a stale one of ours is stopped first) and wait for its socket."""
    stale = await swtpm.stop(paths)
    uid, gid = qemu_account(host)
    files.prepare_vm_dirs(layout, paths, uid, gid)
    files.prepare_tpm_state(layout, paths, uid, gid)
    made = await tpm_setup.manufacture(layout, paths, host, uid, gid)
    argv = swtpm_argv(paths, host.swtpmBinary)
    files.wait_next_tick(files.write_tpm_launch(paths, argv, uid, host.swtpmBinary))
    files.remove_pidfile(paths.tpm_pidfile)
    pid = await threads.run(_launch, paths, argv, uid, gid, [], "swtpm")
    if (began := procfs.start_time(pid)) is not None:
        files.record_tpm_launched(paths, pid, began)
    deadline = time.monotonic() + READY_TIMEOUT
    while not (paths.tpm_socket.is_socket() and procfs.find_swtpm(paths) is not None):
        if not procfs.is_alive(pid) or time.monotonic() >= deadline:
            said = files.swtpm_log_tail(paths)
            await swtpm.stop(paths)
            raise StepFailed(f"swtpm did not start: {said or f'pid {pid} gave no control socket'}")
        await asyncio.sleep(POLL)
    return f"swtpm pid {pid}" + (f" ({stale} first)" if stale else "") + (f"; {made}" if made else "")


async def _start_qemu(layout: StateLayout, paths: VMPaths, vm: VirtualMachine, bridges: dict[str, str],
                      host: HostConfig, firmware: Firmware | None = None) -> str:
    """Start the VM's QEMU unless it already runs; return what was done.

    ``bridges`` maps each bridged NIC to its bridge: their TAPs are created here and handed to QEMU as
    file descriptors (closed on our side once QEMU has them), like its disks and media, and, where the
    host has /dev/vhost-net, one vhost-net fd per TAP queue.
    """
    if procfs.find_qemu(paths) is not None:
        return "already running"
    uid, gid = qemu_account(host)
    files.prepare_vm_dirs(layout, paths, uid, gid)
    if (blocked := files.unreachable_for(paths.run, uid, gid)) is not None:
        raise Refused(f"QEMU's user {host.qemuUser} cannot traverse {blocked} to reach {paths.run}: "
                      "make the state directory's parents searchable (chmod o+x)")
    taps: dict[str, list[int]] = {}
    opened = OpenedFiles()
    try:
        for nic in vm.spec.networks:
            if nic.type == "bridge":
                taps[nic.name] = await threads.run(
                    hostnet.open_tap, tap_name(vm.name, nic.name), bridges[nic.name], nic.queues, nic_mac(vm.name, nic))
        opened = await threads.run(_open_files, paths, vm, uid, gid, firmware)
        if vm.spec.memory.hugepages:
            size = "1G" if vm.spec.memory.hugepageSize == "1Gi" else "2M"
            opened = dataclasses.replace(opened, hugepages=hugetlb.ensure(
                hugepage_dir(host, vm.spec.memory), size, uid, gid))
        argv = build_argv(vm.name, vm.spec, paths, binary=host.qemuBinary, taps=taps, files=opened)
        cpus = placement.launch_cpus(vm.spec, files.read_record(paths))
        pid = await threads.run(_record_and_launch, paths, argv, vm, (uid, gid), host.qemuBinary,
                                _inherited(taps, opened), memlock_limit(vm), cpus)
        maybe_crash("launched", "start")
    finally:
        hostnet.close_all(_inherited(taps, opened))
    return await _until_running(paths, pid, uid, host.startTimeout, cpus, vm.spec.paused)


def _record_and_launch(paths: VMPaths, argv: list[str], vm: VirtualMachine, account: tuple[int, int], binary: str,
                       fds: list[int], memlock: int | None, cpus: str | None) -> int:
    """launch.json first (fsynced: a QEMU is only ever adopted by its record), then QEMU; its pid. In a
    worker thread: the fsync and the launcher's fork and exec do not hold up the other VMs' starts."""
    uid, gid = account
    files.wait_next_tick(files.write_launch(paths, argv, vm, uid=uid, binary=binary))
    # Whatever the pidfile names is not our QEMU (we checked): QEMU writes its own. A QEMU of ours we
    # could not verify still holds its disks' locks, so a second one fails to start rather than share them.
    files.remove_pidfile(paths.pidfile)
    return _launch(paths, argv, uid, gid, fds, "QEMU", memlock, cpus)


def _record_launched(paths: VMPaths, pid: int, began: int | None, cpus: str | None) -> str:
    """After the launch (in a worker thread: fsync): its pid into launch.json, the last exit cleared, its
    cgroup; which cgroup."""
    if began is not None:
        files.record_launched(paths, pid, began)
    files.clear_exit(paths)  # a new run: how the previous one ended no longer matters
    return _own_cgroup(paths, pid, cpus)


async def record_adopted(paths: VMPaths, pid: int | None = None,
                         installs: Callable[[VirtualMachine, int, int], list[str]] | None = None) -> str | None:
    """Finish what an interrupted start left: a QEMU adopted from a launch.json that does not name its pid is
    moved into its cgroup, the installs its start began recorded (``installs(vm as launched, pid,
    start_time)``), the last
    run's exit cleared and, last, its pid written: a crash on the way leaves it unrecorded, so the step is
    planned again (each part is idempotent). What was done; None when the VM's QEMU is recorded already (or
    none runs). ``pid``: only that process (the planned one).

    :raise StepFailed: When ``pid`` is no longer the VM's adopted QEMU (it exited, or another one runs).
    """
    examined = procfs.examine(paths)
    process, launch = examined.process, examined.launch
    if pid is not None and (process is None or process.pid != pid):
        raise StepFailed(f"QEMU pid {pid} is no longer this VM's QEMU: "
                         f"{examined.unverified or 'it exited'} (re-plan)")
    if process is None or examined.recorded or launch is None:
        return None
    cpus = placement.launch_cpus(launch.vm.spec, files.read_record(paths))
    cgroup = await threads.run(_own_cgroup, paths, process.pid, cpus)
    if procfs.start_time(process.pid) != process.start_time:  # it exited meanwhile (its pid may be reused)
        raise StepFailed(f"QEMU pid {process.pid} exited while it was being recorded (re-plan)")
    began = installs(launch.vm, process.pid, process.start_time) if installs is not None else []

    def record() -> None:
        files.clear_exit(paths)
        files.record_launched(paths, process.pid, process.start_time)
    await threads.run(record)
    return ", ".join([f"QEMU pid {process.pid}, launched by an interrupted start, recorded; {cgroup}", *began])


async def settle_interrupted_launch(paths: VMPaths) -> None:
    """Before a start replaces it: a launch.json written moments ago without a pid (the start that wrote it was
    killed right after the launch) may name a QEMU that has not written its pidfile yet. Wait while such a
    process runs (its argv, forked in the launch's window) until the pidfile names it, so it is adopted
    rather than shadowed by a second QEMU that cannot get its disks' locks. Returns at once otherwise."""
    launch = files.read_launch(paths)
    if launch is None or launch.pid is not None or launch.not_before is None:
        return
    ticks = os.sysconf("SC_CLK_TCK")
    left = (launch.not_before - files.boot_ticks()) / ticks + procfs.LAUNCH_WINDOW
    deadline = time.monotonic() + max(0.0, min(left, procfs.LAUNCH_WINDOW))
    while procfs.find_qemu(paths) is None and time.monotonic() < deadline and procfs.launched_from(launch):
        await asyncio.sleep(POLL)


async def _until_running(paths: VMPaths, pid: int, uid: int, timeout: float, cpus: str | None = None,
                         paused: bool = False) -> str:
    """Record the QEMU just launched and wait for its guest to run. Atomic: if anything fails on the way
    (it does not run within ``timeout``, it is not verified, we are cancelled), the QEMU we launched is
    killed through a pidfd opened right after launch (the very process, whatever happens to its pid) and
    its pidfile, sockets and cgroup removed, so a failed start never leaves a QEMU half-started."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None  # already gone: _wait_running reports QEMU's own words
    began = procfs.start_time(pid)
    try:
        cgroup = await threads.run(_record_launched, paths, pid, began, cpus)
        await _wait_running(paths, pid, timeout, paused)
        examined = procfs.examine(paths)
        if examined.process is None or examined.process.pid != pid:
            raise StepFailed(f"QEMU pid {pid} runs but is not verified: {examined.unverified or 'no pidfile'}")
    except BaseException as exc:
        cleaned = await asyncio.shield(_abort_start(paths, pid, pidfd, began))
        if isinstance(exc, StepFailed):
            raise StepFailed(f"{exc}; {cleaned}") from exc
        raise
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return f"started{' paused (-S)' if paused else ''}, pid {pid} as uid {uid}, {cgroup}"


async def _abort_start(paths: VMPaths, pid: int, pidfd: int | None, began: int | None) -> str:
    """Kill the QEMU this start launched (through its pidfd, and only while its start time is the one
    recorded at launch), then remove its pidfile, sockets and cgroup; what was done, in a few words."""
    done = []
    if pidfd is not None and began is not None and procfs.start_time(pid) == began and procfs.is_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        gone = await procfs.wait_dead(pid, QUIT_TIMEOUT)
        done.append(f"the QEMU it launched (pid {pid}) was killed" if gone else f"QEMU pid {pid} survived SIGKILL")
    await placement.remove_cgroups(paths)
    if removed := files.remove_qemu_sockets(paths):
        done.append(f"removed {', '.join(removed)}")
    return "; ".join(done) or "nothing was left running"


async def abort_started(paths: VMPaths) -> str:
    """A start whose set-up after boot failed (e.g. an I/O limit QEMU rejects): kill the verified QEMU it
    started and remove what it left, so the VM is not left running without what its manifest asks."""
    process = procfs.find_qemu(paths)
    if process is None:
        return "its QEMU is gone"
    _kill(process, paths)
    gone = await procfs.wait_dead(process.pid, QUIT_TIMEOUT)
    await placement.remove_cgroups(paths)
    files.remove_qemu_sockets(paths)
    return f"the QEMU it started (pid {process.pid}) was killed" if gone else f"QEMU pid {process.pid} survived SIGKILL"


async def _wait_running(paths: VMPaths, pid: int, timeout: float = READY_TIMEOUT, paused: bool = False) -> None:
    """Wait for the guest to run (started paused, with -S: for QEMU to be ready, in 'prelaunch'); fail at
    once if its QEMU dies meanwhile (a start error, or killed or crashed while loading), with QEMU's last
    words from its stderr log.

    Cheap while many VMs start at once: until QEMU has created its monitor socket only the socket's
    existence is polled (a ``stat``, not a QMP client per try); then one session waits for QEMU's greeting
    (sent once its main loop runs, which is when a guest started without ``-S`` runs) and asks
    ``query-status`` over that same session until it says running (or prelaunch)."""
    deadline = time.monotonic() + timeout
    last = "no monitor socket yet"
    ready = "prelaunch" if paused else "running"
    while time.monotonic() < deadline:
        _require_alive(paths, pid)
        if paths.qmp.is_socket():
            try:
                async with monitor.session(paths.qmp, timeout=max(POLL, deadline - time.monotonic())) as qmp:
                    seen = await _until_status(qmp, paths, pid, deadline, ready)
                    if seen == ready:
                        return
                    last = f"status {seen}"  # what it said last (a start stuck in 'prelaunch'...)
            except MonitorError as exc:
                last = str(exc)
        await asyncio.sleep(POLL)
    raise StepFailed(f"the VM did not reach {ready!r} within {timeout:g}s ({last})")


def _require_alive(paths: VMPaths, pid: int) -> None:
    if not procfs.is_alive(pid):
        said = files.qemu_log_tail(paths)
        raise StepFailed(f"QEMU refused to start: {said}" if said else
                         f"QEMU pid {pid} exited before its guest ran (see `infinization logs`)")


async def _until_status(qmp: monitor.Monitor, paths: VMPaths, pid: int, deadline: float, ready: str) -> str:
    """Ask ``query-status`` over one session until it says ``ready`` or the deadline passes; the last status
    it said. :raise MonitorError: When the session breaks (the caller reconnects). :raise StepFailed: QEMU
    died."""
    status = "unknown"
    while time.monotonic() < deadline:
        status = str((await qmp.execute("query-status")).get("status", "unknown"))
        if status == ready:
            break
        _require_alive(paths, pid)
        await asyncio.sleep(POLL)
    return status


async def _press_power_button(paths: VMPaths, pid: int, grace: float) -> bool:
    """Press the ACPI power button until the guest powers off or ``grace`` runs out.

    The press is repeated every ``REPRESS`` seconds because a guest that is still booting has no ACPI
    handler yet and would lose a single press; a guest already shutting down ignores the extra ones.
    """
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            async with monitor.session(paths.qmp) as qmp:
                await qmp.execute("system_powerdown")
        except MonitorError:
            return await procfs.wait_dead(pid, 0)
        if await procfs.wait_dead(pid, min(REPRESS, max(0.0, deadline - time.monotonic()))):
            return True
    return False


def _kill(process: procfs.QemuProcess, paths: VMPaths) -> None:
    """SIGKILL through a pidfd opened before the last check: the signal reaches the process we verified,
    even if it exits and its pid is reused in between."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    try:
        if procfs.still_same(process, paths):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


async def stop(paths: VMPaths, grace: float) -> str:
    """Stop the VM's QEMU, then its swtpm (which exits by itself when QEMU goes); return what worked."""
    how = await _stop_qemu(paths, grace)
    tpm = await swtpm.stop(paths)
    return f"{how}, {tpm}" if tpm else how


async def _stop_qemu(paths: VMPaths, grace: float) -> str:
    """Stop the VM's QEMU if it runs: ACPI power button, then quit, then SIGKILL; return what worked."""
    process = procfs.find_qemu(paths)
    if process is None:
        return "not running"
    how = await _stop(paths, process, grace)
    await placement.remove_cgroups(paths)
    # The guest saw a power button and shut down cleanly, but it was our doing: RerunOnFailure must start
    # it again when asked to, as it would not after a shutdown the guest chose.
    files.write_exit(paths, ExitRecord(reason=STOPPED, how=how))
    return how


async def _through_agent(paths: VMPaths, pid: int, grace: float) -> tuple[bool, float]:
    """Ask the guest agent to power off (when QEMU has its port); wait up to ``grace`` for QEMU to exit.
    Return whether it did, and the grace left for the power button."""
    if grace <= 0 or not agent_port(paths):
        return False, grace
    started = time.monotonic()
    if await agent.shutdown(paths.agent_socket, min(agent.DEADLINE, grace)) is not None:
        return False, max(0.0, grace - (time.monotonic() - started))
    if await procfs.wait_dead(pid, max(0.0, grace - (time.monotonic() - started))):
        return True, 0.0
    return False, max(0.0, grace - (time.monotonic() - started))


def agent_port(paths: VMPaths) -> bool:
    """The running QEMU was launched with the guest agent's port (its launch record says so)."""
    launch = files.read_launch(paths)
    return launch is not None and launch.vm.spec.guestAgent.enabled


async def _unpause(paths: VMPaths) -> str | None:
    """Before a graceful stop: a paused guest cannot see the power button or the agent's request (its vCPUs
    do not run), so one we paused is resumed first (``cont``) and shuts down like a running one. One started
    with -S has never run: there is nothing to shut down, so it is quit at once ("prelaunch"). A VM QEMU
    paused by itself (io-error...) is left paused: resuming it would repeat the failure; the power button
    then goes unanswered and QEMU is quit after the grace period."""
    try:
        async with monitor.session(paths.qmp) as qmp:
            status = str((await qmp.execute("query-status")).get("status", ""))
            if status == "paused":
                await qmp.execute("cont")
                return "resumed to shut down"
    except MonitorError:
        return None
    return status if status == "prelaunch" else None


async def _stop(paths: VMPaths, process: procfs.QemuProcess, grace: float) -> str:
    unpaused = await _unpause(paths)
    if unpaused == "prelaunch":
        how = await _quit(paths, process, 0)
        return f"{how} (started paused, its guest never ran)"
    how = await _shutdown(paths, process, grace)
    return f"{unpaused}, {how}" if unpaused else how


async def _shutdown(paths: VMPaths, process: procfs.QemuProcess, grace: float) -> str:
    stopped, grace = await _through_agent(paths, process.pid, grace)
    if stopped:
        return "guest powered off through the guest agent"
    if grace > 0 and await _press_power_button(paths, process.pid, grace):
        return "guest powered off"
    return await _quit(paths, process, grace)


async def _quit(paths: VMPaths, process: procfs.QemuProcess, grace: float) -> str:
    """QMP quit, then SIGKILL; ``grace``: how long the guest ignored the power button (0: not pressed)."""
    try:
        async with monitor.session(paths.qmp) as qmp:
            await qmp.execute("quit")
    except MonitorError:
        pass
    if await procfs.wait_dead(process.pid, QUIT_TIMEOUT):
        return f"quit after the guest ignored the power button for {grace:g}s" if grace else "quit"
    _kill(process, paths)
    if await procfs.wait_dead(process.pid, QUIT_TIMEOUT):
        return "killed (SIGKILL) after quit did not work"
    raise StepFailed(f"QEMU pid {process.pid} is still alive after SIGKILL")
