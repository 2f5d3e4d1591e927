"""The only reader and writer of Infinization's own files under the state directory.

Every file has its path in ``state.layout`` and its model in ``state.models``; this module is the one
place that opens them (``tests/unit/test_state_ownership.py`` checks that no other module does). Writes
are atomic (temporary file, fsync, rename) and private to their owner (0600). Who calls what:

- ``record.json``: ``write_record`` / ``claim_disk`` by the executor (before it changes anything for a VM);
  read by the observers, the CLI and the sync daemon.
- ``launch.json``: ``write_launch`` by ``apply.vmprocess`` right before QEMU starts; read by the observers.
- ``live.json``: ``update_live`` by ``apply.hotplug``; read by the observers (only for the QEMU it names).
- ``exit.json``: ``write_exit`` by ``apply.vmprocess`` (a stop by us), ``record_exit`` by the sync daemon's
  QMP listener (a shutdown, crash or panic), ``clear_exit`` when a new QEMU starts; read by the observers.
- ``restarts.json``: the sync daemon's crash-loop history.
- ``display.json``: ``record_display_port`` / ``record_display_password`` by the executor (its display steps
  and a start); read by the observers. ``display.key`` (``display_key``): the host's key for password hashes,
  created by the executor the first time it sets a password; read by the observers.
- ``source.json``: the CLI's ``apply``; read by ``status``, ``start`` and ``stop``.
- ``networks/NAME.json``: the executor's network steps; read by the observers and the executor.
- ``swtpm.json``: ``write_tpm_launch`` / ``record_tpm_launched`` by ``apply.vmprocess``; ``tpm/NAME/`` (the
  TPM state, written by swtpm) is created by ``prepare_tpm_state`` and deleted by ``delete_tpm_state``;
  ``tpm/NAME.setup.json`` records its manufacture (swtpm_setup: begun, done), ``tpm/.localca/`` is the local
  CA that signs the EK and platform certificates (``prepare_tpm_ca``; QEMU's user's 0700).
- ``disks/NAME/efivars.fd``: a UEFI VM's variables, copied once from OVMF's template by
  ``install_efi_vars`` (the executor's create-efi-vars step), opened for QEMU by ``open_efi_vars``,
  deleted by ``delete_efi_vars``; QEMU's user's, 0600.
- QEMU's and dnsmasq's pidfiles, the serial log and the DHCP leases are written by those programs; they
  are read here only, never following a symbolic link (QEMU's user owns its run directory).
- Modes: directories we create are 0700; the state directory, ``vms/`` and a VM's folder are
  root:QEMU-group 0710 (QEMU's user may only traverse them to its own ``run/``, 0700, owned by it);
  ``disks/`` stays root's 0700 (QEMU gets its disks as file descriptors). ``check_private`` refuses a
  state directory that other users can write.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import stat
import tempfile
import time
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from reconciler.errors import CorruptRecord, Refused
from reconciler.spec.models import Network, VirtualMachine
from reconciler.state.layout import StateLayout, VMPaths
from reconciler.state.models import (
    CRASH,
    GUEST_SHUTDOWN,
    PANICKED,
    SHUTDOWN_CAUSES,
    SHUTDOWN_TRACE,
    STOPPED,
    AppliedRecord,
    DhcpLease,
    DisplayPassword,
    DisplayRecord,
    ExitRecord,
    HostDeviceClaim,
    HostDeviceClaims,
    InstallRecord,
    LaunchRecord,
    LiveRecord,
    NetworkRecord,
    SourceRecord,
    TpmLaunchRecord,
)


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700 (an existing directory keeps its mode)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write via a temporary file (0600), fsync and rename: a crash leaves the old or the new file, never
    half of one."""
    make_private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _drop_dead_writers_temps(path)


def _drop_dead_writers_temps(path: Path) -> None:
    """Remove temporary files of ``path`` left by a writer killed mid-write (its pid is in the name and no
    longer runs): the executor writes several VMs' files at once, in threads, so a crash can land inside
    one of these writes. A live writer's file (another thread's or process's) is left alone."""
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def _why(exc: ValidationError) -> str:
    """pydantic's message in one line (its own is several, with a URL): every field that is wrong, and why."""
    parts = []
    for error in exc.errors():
        where = ".".join(map(str, error["loc"]))
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def _dump(model: BaseModel) -> str:
    # Our files keep secrets (cloud-init user-data) verbatim; plans and logs get only their hash.
    return model.model_dump_json(indent=2, context={"secrets": True}) + "\n"


# -- record.json: the last-applied record ---------------------------------------------------------------


def read_record(paths: VMPaths) -> AppliedRecord | None:
    """The VM's last-applied record, or None when there is none.

    :raise CorruptRecord: When the file exists but is not a valid record.
    """
    try:
        text = paths.record.read_text()
    except FileNotFoundError:
        return None
    try:
        return AppliedRecord.model_validate_json(text)
    except ValidationError as exc:
        raise CorruptRecord(f"{paths.record}: {_why(exc)}; fix or remove it by hand (the VM is left as it is)") from exc


def record_stamp(paths: VMPaths) -> tuple[int, int] | None:
    """(mtime_ns, size) of record.json, or None: tells a record a person fixed from the one that failed."""
    try:
        stat = paths.record.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def record_identity(paths: VMPaths) -> tuple[int, int, int, int] | None:
    """(inode, mtime_ns, ctime_ns, size) of record.json, or None: the sync daemon re-parses a record only
    when this changed. Records are replaced by rename (``write_atomic``: a new inode), and a hand edit in
    place moves mtime and ctime, so an unchanged identity means unchanged contents."""
    try:
        stat = paths.record.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size


def known_vm_names(layout: StateLayout) -> list[str]:
    """VM folders in the state directory (ours by construction: only the executor creates them)."""
    if not layout.vms.is_dir():
        return []
    return sorted(entry.name for entry in layout.vms.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def read_records(layout: StateLayout, corrupt: dict[str, str] | None = None) -> dict[str, AppliedRecord]:
    """Every VM's last-applied record. A corrupt one raises CorruptRecord, unless ``corrupt`` is given: then
    it is left out and its error put there (the sync daemon: one bad file must not stall every VM)."""
    records = {}
    for name in known_vm_names(layout):
        try:
            record = read_record(layout.vm(name))
        except CorruptRecord as exc:
            if corrupt is None:
                raise
            corrupt[name] = str(exc)
            continue
        if record is not None:
            records[name] = record
    return records


def write_record(paths: VMPaths, vm: VirtualMachine, source: str | None, revision: str | None = None) -> AppliedRecord:
    """Record ``vm`` as last applied, keeping the list of disks we created, the CPUs a strategy chose (and
    the manifest it came from when ``source`` is not known here: `infinization start`/`stop` must not make a
    VM of unknown origin)."""
    current = read_record(paths)
    owned = current.owned_disks if current else []
    installs = current.installs if current else []
    source = source or (current.source if current else None)
    record = AppliedRecord(vm=vm, owned_disks=owned, installs=installs, source=source, revision=revision,
                           placement_cpus=current.placement_cpus if current else [])
    write_atomic(paths.record, _dump(record))
    return record


def record_placement(paths: VMPaths, cpus: list[int]) -> None:
    """Note in the record the host CPUs a placement strategy chose (kept by later record writes)."""
    current = read_record(paths)
    if current is not None and current.placement_cpus != cpus:
        write_atomic(paths.record, _dump(current.model_copy(update={"placement_cpus": list(cpus)})))


def claim_disk(paths: VMPaths, disk: str) -> None:
    """Note in the record that we are about to create ``disk`` (written before the file exists).

    :raise Refused: When the VM has no record (the record step must run first).
    """
    current = read_record(paths)
    if current is None:
        raise Refused(f"no record for {paths.dir.name}: the record step must run first (re-run apply)")
    if disk not in current.owned_disks:
        updated = current.model_copy(update={"owned_disks": sorted([*current.owned_disks, disk])})
        write_atomic(paths.record, _dump(updated))


def unclaim_disk(paths: VMPaths, disk: str) -> None:
    """Take back a claim whose create failed before the disk existed (the record says what is there)."""
    current = read_record(paths)
    if current is not None and disk in current.owned_disks:
        updated = current.model_copy(update={"owned_disks": [d for d in current.owned_disks if d != disk]})
        write_atomic(paths.record, _dump(updated))


def record_installs(paths: VMPaths, installs: list[InstallRecord]) -> None:
    """Replace the record's installs from bootOnce CD-ROMs (by CD-ROM name) with ``installs``.

    :raise Refused: When the VM has no record.
    """
    current = read_record(paths)
    if current is None:
        raise Refused(f"no record for {paths.dir.name}: the record step must run first (re-run apply)")
    names = {install.cdrom for install in installs}
    kept = [install for install in current.installs if install.cdrom not in names]
    updated = current.model_copy(update={"installs": sorted([*kept, *installs], key=lambda i: i.cdrom)})
    write_atomic(paths.record, _dump(updated))


# -- cidata-HASH.iso: the cloud-init seed ----------------------------------------------------------------


def write_seed(paths: VMPaths, digest: str, files_in_seed: dict[str, bytes]) -> Path:
    """Build the NoCloud seed ISO (volume label ``cidata``; Joliet and Rock Ridge names) unless the file for
    ``digest`` exists, remove the VM's other seeds, and return its path (root's 0600; QEMU gets an fd)."""
    target = paths.seed(digest)
    if not target.exists():
        import pycdlib  # only a cloud-init seed needs it: kept off every command's start-up

        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
        for index, (name, data) in enumerate(sorted(files_in_seed.items())):
            iso.add_fp(io.BytesIO(data), len(data), f"/F{index}.;1", rr_name=name, joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
        iso.close()
        write_atomic(target, out.getvalue())
    for old in paths.dir.glob("cidata-*.iso"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def forget_vm(paths: VMPaths) -> None:
    """Remove the VM's folder (records, logs, sockets); its disks live elsewhere and are kept."""
    if paths.dir.exists():
        shutil.rmtree(paths.dir)


# -- launch.json, live.json ---------------------------------------------------------------------------


def read_launch(paths: VMPaths) -> LaunchRecord | None:
    try:
        return LaunchRecord.model_validate_json(paths.launch.read_text())
    except (FileNotFoundError, ValidationError, json.JSONDecodeError):
        return None


def boot_ticks() -> int:
    """The boot clock now, in the clock ticks /proc/PID/stat counts a process's start time in (both
    CLOCK_BOOTTIME, both rounded down): a process started after this call has a start time >= its value."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // (1_000_000_000 // os.sysconf("SC_CLK_TCK"))


def wait_next_tick(ticks: int) -> None:
    """Return once the boot clock is past ``ticks`` (at most one tick, 10 ms): a process started then has a
    start time > ``ticks``, so a record holding ``ticks`` tells it from any process started before."""
    while boot_ticks() <= ticks:
        time.sleep(0.001)


def write_launch(paths: VMPaths, argv: list[str], vm: VirtualMachine, uid: int | None = None,
                 binary: str | None = None) -> int:
    """The QEMU about to start, with the boot clock now (no pid yet: until ``record_launched`` names it, only a
    process started after this record's clock can be adopted, see ``procfs.examine``); that clock reading
    (launch after ``wait_next_tick`` of it)."""
    now = boot_ticks()
    write_atomic(paths.launch, _dump(LaunchRecord(argv=argv, vm=vm, uid=uid, binary=binary, not_before=now)))
    return now


def record_launched(paths: VMPaths, pid: int, start_time: int) -> None:
    """Add the pid and start time of the QEMU just started to launch.json.

    :raise CorruptRecord: When launch.json is gone (it is written right before QEMU starts).
    """
    launch = read_launch(paths)
    if launch is None:
        raise CorruptRecord(f"{paths.launch} vanished while its QEMU started")
    write_atomic(paths.launch, _dump(launch.model_copy(update={"pid": pid, "start_time": start_time})))


def read_live(paths: VMPaths, pid: int, start_time: int) -> LiveRecord:
    """live.json for the QEMU ``pid`` started at ``start_time``; an empty one if it names another process."""
    try:
        record: LiveRecord | None = LiveRecord.model_validate_json(paths.live.read_text())
    except (FileNotFoundError, ValidationError, json.JSONDecodeError):
        record = None
    if record is None or (record.pid, record.start_time) != (pid, start_time):
        return LiveRecord(pid=pid, start_time=start_time)
    return record


def update_live(paths: VMPaths, pid: int, start_time: int, **changes: Any) -> LiveRecord:
    """Merge ``changes`` into live.json for that QEMU (a record of an older process is replaced)."""
    merged = read_live(paths, pid, start_time).model_dump()
    for key, value in changes.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    record = LiveRecord.model_validate(merged)
    write_atomic(paths.live, _dump(record))
    return record


# -- display.json, display.key -------------------------------------------------------------------------


def read_display(paths: VMPaths) -> DisplayRecord:
    """The VM's display record (an empty one when there is none or it cannot be read)."""
    try:
        return DisplayRecord.model_validate_json(paths.display.read_text())
    except (FileNotFoundError, ValidationError, json.JSONDecodeError):
        return DisplayRecord()


def read_display_ports(layout: StateLayout) -> dict[str, int]:
    """Every VM's recorded display port: ports that no other VM may be given."""
    ports = {}
    for name in known_vm_names(layout):
        if (port := read_display(layout.vm(name)).port) is not None:
            ports[name] = port
    return ports


def record_display_port(paths: VMPaths, port: int) -> None:
    make_private_dirs(paths.dir)
    write_atomic(paths.display, _dump(read_display(paths).model_copy(update={"port": port})))


def record_display_password(paths: VMPaths, digest: str, pid: int, start_time: int) -> None:
    """The keyed hash of the password just set on QEMU ``pid`` (never the password)."""
    password = DisplayPassword(digest=digest, pid=pid, start_time=start_time)
    write_atomic(paths.display, _dump(read_display(paths).model_copy(update={"password": password})))


def read_display_key(layout: StateLayout) -> bytes | None:
    try:
        key = _read_no_follow(layout.display_key, 4096)
    except FileNotFoundError:
        return None
    return key if len(key) == 32 else None


def display_key(layout: StateLayout) -> bytes:
    """The host's 32-byte key for display password hashes, created (root's 0600) the first time."""
    if (key := read_display_key(layout)) is not None:
        return key
    make_private_dirs(layout.root)
    with contextlib.suppress(FileNotFoundError):
        layout.display_key.unlink()  # the wrong size: replaced (every recorded hash just no longer matches)
    fd = os.open(layout.display_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(32))
        handle.flush()
        os.fsync(handle.fileno())
    return _read_no_follow(layout.display_key, 4096)


# -- exit.json, restarts.json --------------------------------------------------------------------------


def read_exit(paths: VMPaths) -> ExitRecord | None:
    """How the VM's last QEMU ended, if recorded (an unreadable file counts as unknown)."""
    try:
        return ExitRecord.model_validate_json(paths.exit.read_text())
    except (FileNotFoundError, ValidationError, json.JSONDecodeError):
        return None


def exit_from_log(paths: VMPaths, tail: int = 1 << 16) -> ExitRecord | None:
    """How the VM's last QEMU ended, from its stderr log: the last ``qemu_system_shutdown_request`` trace
    line QEMU wrote (a clean power-off, a quit, a signal...), or a crash when it wrote none. None when that
    QEMU was not launched with the trace (nothing can be said) or never ran. The caller checks that the
    QEMU the launch record names is gone; the log is truncated at each launch, so it is that QEMU's."""
    launch = read_launch(paths)
    if launch is None or launch.pid is None or f"enable={SHUTDOWN_TRACE}" not in launch.argv:
        return None
    try:
        fd = os.open(paths.qemu_log, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(fd).st_size
        handle.seek(max(0, size - tail))  # only the end: QEMU may have written much before it
        text = handle.read(tail).decode(errors="replace")
    causes = [line.split("reason=", 1)[1].strip() for line in text.splitlines()
              if line.startswith(f"{SHUTDOWN_TRACE} reason=")]
    if not causes:
        return ExitRecord(reason=CRASH, how="no shutdown in QEMU's log (killed or crashed)")
    number = int(causes[-1]) if causes[-1].isdigit() else -1
    reason = SHUTDOWN_CAUSES[number] if 0 <= number < len(SHUTDOWN_CAUSES) else f"cause {causes[-1][:20]}"
    return ExitRecord(reason=reason, guest=reason in (GUEST_SHUTDOWN, "guest-reset", PANICKED),
                      how="from QEMU's log (no daemon watched)")


def write_exit(paths: VMPaths, record: ExitRecord) -> None:
    write_atomic(paths.exit, _dump(record))


def record_exit(paths: VMPaths, pid: int, record: ExitRecord) -> bool:
    """Record how QEMU ``pid`` ended, unless the pidfile already names another QEMU (the late write would
    describe the new one by its predecessor's end) or we stopped it ourselves (a stop by us wins, whatever
    the guest said). QEMU removes its pidfile when it exits cleanly: no pidfile is fine. True if written."""
    current = read_exit(paths)
    if read_pidfile(paths.pidfile) not in (None, pid) or (current is not None and current.reason == STOPPED):
        return False
    write_exit(paths, record)
    return True


def clear_exit(paths: VMPaths) -> None:
    """A new QEMU runs: how the previous one ended no longer matters."""
    paths.exit.unlink(missing_ok=True)


def read_restarts(paths: VMPaths) -> list[float]:
    """The sync daemon's restarts of this VM after failures (wall-clock seconds, oldest first)."""
    try:
        return [float(t) for t in json.loads(paths.restarts.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def write_restarts(paths: VMPaths, times: list[float]) -> None:
    write_atomic(paths.restarts, json.dumps(times))


# -- source.json ---------------------------------------------------------------------------------------


def read_source(layout: StateLayout) -> str | None:
    try:
        return SourceRecord.model_validate_json(layout.source.read_text()).manifests
    except (FileNotFoundError, ValidationError, json.JSONDecodeError):
        return None


def write_source(layout: StateLayout, manifests: str) -> None:
    write_atomic(layout.source, SourceRecord(manifests=manifests).model_dump_json() + "\n")


# -- networks/ -----------------------------------------------------------------------------------------


def read_network_records(layout: StateLayout) -> dict[str, NetworkRecord]:
    """Every Network we created. :raise CorruptRecord: When one cannot be read."""
    records = {}
    if layout.networks.is_dir():
        for path in sorted(layout.networks.glob("*.json")):
            try:
                records[path.stem] = NetworkRecord.model_validate_json(path.read_text())
            except ValidationError as exc:
                raise CorruptRecord(f"{path}: {_why(exc)}; fix or remove it by hand") from exc
    return records


def has_network_record(layout: StateLayout, name: str) -> bool:
    return layout.network_record(name).exists()


def write_network_record(layout: StateLayout, network: Network) -> None:
    write_atomic(layout.network_record(network.name), _dump(NetworkRecord(network=network)))


def forget_network(layout: StateLayout, name: str) -> None:
    layout.network_record(name).unlink(missing_ok=True)


def read_dhcp_leases(leases: Path) -> list[DhcpLease]:
    """dnsmasq's lease file (``EXPIRY MAC IP HOSTNAME CLIENT-ID`` per line); missing: no lease."""
    found = []
    with contextlib.suppress(OSError):
        for line in leases.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0].isdigit():
                found.append(DhcpLease(expires=int(parts[0]), mac=parts[1], ip=parts[2],
                                       hostname=None if parts[3] == "*" else parts[3]))
    return found


# -- hostdevs.json -------------------------------------------------------------------------------------


def read_host_device_claims(layout: StateLayout) -> dict[str, HostDeviceClaim]:
    """The host devices we hold for VMs, by key (PCI address or usb:BUS-PORT); missing file: none.

    :raise CorruptRecord: When it cannot be read."""
    try:
        text = layout.host_devices.read_text()
    except FileNotFoundError:
        return {}
    try:
        return dict(HostDeviceClaims.model_validate_json(text).claims)
    except ValidationError as exc:
        raise CorruptRecord(f"{layout.host_devices}: {_why(exc)}; fix or remove it by hand") from exc


def write_host_device_claim(layout: StateLayout, key: str, claim: HostDeviceClaim | None) -> None:
    """Set (or with None, drop) one claim; the file goes when the last claim does."""
    claims = read_host_device_claims(layout)
    if claim is None:
        claims.pop(key, None)
    else:
        claims[key] = claim
    if claims:
        write_atomic(layout.host_devices, _dump(HostDeviceClaims(claims=dict(sorted(claims.items())))))
    else:
        layout.host_devices.unlink(missing_ok=True)


# -- written by QEMU and dnsmasq: read only ------------------------------------------------------------


def _read_no_follow(path: Path, limit: int | None = None) -> bytes:
    """Read a file a less trusted program writes, refusing a symbolic link put in its place.

    :raise OSError: When it is missing, a link, or unreadable.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        return handle.read() if limit is None else handle.read(limit)


def read_pidfile(pidfile: Path) -> int | None:
    try:
        text = _read_no_follow(pidfile, 64).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def launched_pid_if_no_pidfile(paths: VMPaths) -> int | None:
    """The pid launch.json (root's) recorded, when QEMU's pidfile is gone (deleted by hand or by a cleaner):
    the process is still checked against every other record before it is adopted. None while a pidfile
    exists, even an unreadable one or a link (that is not a missing file: nothing is adopted then)."""
    if os.path.lexists(paths.pidfile):
        return None
    launch = read_launch(paths)
    return launch.pid if launch is not None else None


def remove_pidfile(pidfile: Path) -> None:
    pidfile.unlink(missing_ok=True)


def remove_qemu_sockets(paths: VMPaths) -> list[str]:
    """After our QEMU was killed: its pidfile and the sockets it listened on (it removes none of them when
    killed), so nothing names a dead process. The names removed."""
    removed = []
    for path in (paths.pidfile, paths.qmp, paths.events, paths.agent_socket, *paths.run.glob("ch-*.sock")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def read_serial(paths: VMPaths) -> bytes | None:
    """The guest's serial console log, or None when the VM never ran."""
    try:
        return _read_no_follow(paths.serial)
    except FileNotFoundError:
        return None


# -- QEMU's directories and files ----------------------------------------------------------------------


def _own(path: Path, uid: int, gid: int, mode: int) -> None:
    """Give an existing directory (never a link) its owner and mode."""
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise Refused(f"{path} is not a directory: remove it by hand")
    if (info.st_uid, info.st_gid) != (uid, gid):
        os.chown(path, uid, gid, follow_symlinks=False)
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)


def prepare_vm_dirs(layout: StateLayout, paths: VMPaths, uid: int, gid: int) -> None:
    """Directories for a VM whose QEMU runs as ``uid``:``gid``: the state directory, ``vms/`` and the VM's
    folder root:gid 0710 (traverse only), its ``run/`` owned by QEMU's user 0700, disks root's 0700."""
    for directory in (paths.run, paths.disk_dir):
        make_private_dirs(directory)
    for directory in (layout.root, layout.vms, paths.dir):
        _own(directory, 0, gid, 0o710)
    _own(paths.run, uid, gid, 0o700)
    for directory in (layout.disks, paths.disk_dir):
        _own(directory, 0, 0, 0o700)


def unreachable_for(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory above ``path`` that user ``uid`` (group ``gid``) cannot traverse, or None."""
    for directory in reversed(path.parents):
        info = directory.stat()
        bit = stat.S_IXUSR if info.st_uid == uid else stat.S_IXGRP if info.st_gid == gid else stat.S_IXOTH
        if not info.st_mode & bit:
            return directory
    return None


def check_private(layout: StateLayout) -> None:
    """Refuse a state directory that users other than root (or us) can write.

    :raise Refused: When it (or ``vms/``, ``disks/``) is group- or world-writable or owned by another user.
    """
    for directory in (layout.root, layout.vms, layout.disks):
        try:
            info = directory.lstat()
        except FileNotFoundError:
            continue
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022 or stat.S_ISLNK(info.st_mode):
            raise Refused(f"{directory} can be written by other users (owner uid {info.st_uid}, mode "
                          f"{stat.S_IMODE(info.st_mode):o}): make it root's, 0700, and try again")


def _open_log(path: Path) -> int:
    """A launched program's stderr for this start (truncated), root's 0600: the fd the program inherits."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _log_tail(path: Path, lines: int) -> str:
    """The last lines a program wrote to its stderr log, joined with '; ' ("" when there is none)."""
    try:
        text = _read_no_follow(path).decode(errors="replace")
    except OSError:
        return ""
    return "; ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


def open_qemu_log(paths: VMPaths) -> int:
    """QEMU's stderr for this start (truncated), root's 0600: the fd QEMU inherits."""
    return _open_log(paths.qemu_log)


def qemu_log_tail(paths: VMPaths, lines: int = 5) -> str:
    """The last lines QEMU wrote to stderr (its own words on why it did not start)."""
    return _log_tail(paths.qemu_log, lines)


def _copy_in_kernel(src: int, dst: int) -> None:
    """Copy all of ``src`` to ``dst`` with ``copy_file_range`` (no trip through user space: a kernel and
    initrd are ~15 MiB, copied once per VM start); plain reads and writes where the kernel cannot."""
    try:
        while os.copy_file_range(src, dst, 1 << 24):
            pass
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        while chunk := os.read(src, 1 << 20):
            os.write(dst, chunk)


def install_boot_copy(source: str, dest: Path, uid: int, gid: int) -> None:
    """Copy a kernel or initrd to ``dest`` (in QEMU's run directory), readable by QEMU's user alone.
    Like ``write_atomic``, the temporary name carries our pid, so the copy a killed run left behind (VMs
    start side by side: a crash can land inside another VM's copy) is removed by the next one."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            _copy_in_kernel(src.fileno(), out.fileno())
            os.fchown(out.fileno(), uid, gid)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _drop_dead_writers_temps(dest)


# -- the TPM: swtpm.json, swtpm.log, tpm/NAME/ -----------------------------------------------------------


def read_tpm_launch(paths: VMPaths) -> TpmLaunchRecord | None:
    try:
        return TpmLaunchRecord.model_validate_json(paths.tpm_launch.read_text())
    except (FileNotFoundError, ValidationError, json.JSONDecodeError):
        return None


def write_tpm_launch(paths: VMPaths, argv: list[str], uid: int, binary: str) -> int:
    """The swtpm about to start, with the boot clock now; that clock reading (as ``write_launch``)."""
    now = boot_ticks()
    write_atomic(paths.tpm_launch, _dump(TpmLaunchRecord(argv=argv, uid=uid, binary=binary, not_before=now)))
    return now


def record_tpm_launched(paths: VMPaths, pid: int, start_time: int) -> None:
    launch = read_tpm_launch(paths)
    if launch is None:
        raise CorruptRecord(f"{paths.tpm_launch} vanished while its swtpm started")
    write_atomic(paths.tpm_launch, _dump(launch.model_copy(update={"pid": pid, "start_time": start_time})))


def prepare_tpm_state(layout: StateLayout, paths: VMPaths, uid: int, gid: int) -> None:
    """``tpm/`` root:gid 0710 (traverse only) and the VM's ``tpm/NAME/``, QEMU's user's 0700 (swtpm writes it)."""
    make_private_dirs(paths.tpm_state)
    _own(layout.tpm, 0, gid, 0o710)
    _own(paths.tpm_state, uid, gid, 0o700)


def _tpm_setup_record(paths: VMPaths) -> Path:
    # Beside the state, in root's tpm/ (0710): QEMU's user, who owns the state itself, cannot forge it.
    return paths.tpm_state.with_name(f"{paths.tpm_state.name}.setup.json")


def read_tpm_setup(paths: VMPaths) -> dict[str, Any] | None:
    """The TPM state's manufacture record (``{"state": "begun" | "done", ...}``), None when there is none."""
    try:
        value = json.loads(_read_no_follow(_tpm_setup_record(paths), 1 << 16))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_tpm_setup(paths: VMPaths, record: dict[str, Any]) -> None:
    write_atomic(_tpm_setup_record(paths), json.dumps(record, sort_keys=True))


def tpm_state_has_data(paths: VMPaths) -> bool:
    """Whether swtpm has written a TPM state (its permanent-state file) in ``tpm/NAME/``."""
    return any(entry.name.startswith("tpm2-") for entry in paths.tpm_state.iterdir()) \
        if paths.tpm_state.is_dir() else False


def clear_tpm_state(paths: VMPaths) -> int:
    """Empty a half-made TPM state (a manufacture that did not finish); how many files went."""
    removed = 0
    for entry in list(paths.tpm_state.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed += 1
    return removed


def prepare_tpm_ca(layout: StateLayout, uid: int, gid: int, localca: str) -> Path:
    """The installation's local CA for EK and platform certificates (``tpm/.localca/``, QEMU's user's 0700:
    swtpm_setup runs as that user and its swtpm_localca keeps the CA key and serial there) with root's
    configuration files for swtpm_setup and swtpm_localca in it. The path of swtpm_setup's configuration."""
    ca = layout.tpm / ".localca"
    make_private_dirs(ca)
    _own(layout.tpm, 0, gid, 0o710)
    _own(ca, uid, gid, 0o700)
    configs = {
        "swtpm_setup.conf": f"create_certs_tool = {localca}\ncreate_certs_tool_config = {ca}/swtpm-localca.conf\n"
                            f"create_certs_tool_options = {ca}/swtpm-localca.options\nactive_pcr_banks = sha256\n",
        "swtpm-localca.conf": f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n"
                              f"certserial = {ca}/certserial\n",
        "swtpm-localca.options": "--platform-manufacturer Infinization\n--platform-version 2.1\n"
                                 "--platform-model QEMU\n",
    }
    for name, text in configs.items():
        path = ca / name
        try:
            current = _read_no_follow(path).decode()
        except OSError:
            current = None
        if current != text:
            write_atomic(path, text)
            os.chmod(path, 0o644)  # root's; QEMU's user reads them through its own 0700 folder
    return ca / "swtpm_setup.conf"


def open_tpm_setup_log(paths: VMPaths) -> int:
    """swtpm_setup's output for this manufacture (truncated), root's 0600."""
    return _open_log(paths.dir / "swtpm-setup.log")


def tpm_setup_log(paths: VMPaths) -> str:
    try:
        return _read_no_follow(paths.dir / "swtpm-setup.log", 1 << 20).decode(errors="replace")
    except OSError:
        return ""


def tpm_state_exists(paths: VMPaths) -> bool:
    return paths.tpm_state.is_dir()


def delete_tpm_state(paths: VMPaths) -> bool:
    """Remove the VM's TPM state; False when there was none."""
    if not paths.tpm_state.is_dir() or paths.tpm_state.is_symlink():
        return False
    shutil.rmtree(paths.tpm_state)
    _tpm_setup_record(paths).unlink(missing_ok=True)
    return True


def open_swtpm_log(paths: VMPaths) -> int:
    """swtpm's stderr for this start (truncated), root's 0600."""
    return _open_log(paths.tpm_log)


def swtpm_log_tail(paths: VMPaths, lines: int = 5) -> str:
    return _log_tail(paths.tpm_log, lines)


# -- a UEFI VM's variable store --------------------------------------------------------------------------


def efi_vars_exists(paths: VMPaths) -> bool:
    return paths.efi_vars.exists() or paths.efi_vars.is_symlink()


def _efi_vars_origin_file(paths: VMPaths) -> Path:
    return paths.efi_vars.with_name(paths.efi_vars.name + ".origin.json")


def efi_vars_origin(paths: VMPaths) -> bool | None:
    """Whether the VM's variable store was copied from a Secure Boot (Microsoft-keys) template; None when
    unknown (a store made before the origin was written, or an unreadable origin)."""
    try:
        value = json.loads(_read_no_follow(_efi_vars_origin_file(paths), 4096)).get("secureBoot")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def install_efi_vars(template: str, paths: VMPaths, uid: int, gid: int, secure_boot: bool | None = None) -> bool:
    """Copy OVMF's VARS ``template`` to the VM's store, QEMU's user's 0600, unless it exists (never
    replaced here: it holds the guest's boot entries and keys). Built under a temporary name and linked into
    place, so a crash leaves no half copy; temporary files of an earlier crash are removed. The template's
    kind (``secure_boot``) goes to ``efivars.fd.origin.json`` *before* the store appears, so a store always
    has its own origin beside it. True if copied."""
    dest = paths.efi_vars
    make_private_dirs(dest.parent)
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    if efi_vars_exists(paths):
        return False
    if secure_boot is not None:
        write_atomic(_efi_vars_origin_file(paths), json.dumps({"template": template, "secureBoot": secure_boot}))
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(template, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            os.fchown(out.fileno(), uid, gid)
            os.fchmod(out.fileno(), 0o600)
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, dest)  # fails if it appeared meanwhile: the existing one is kept
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def reset_efi_vars(template: str, paths: VMPaths, uid: int, gid: int, secure_boot: bool, stamp: str) -> str:
    """Replace the VM's variable store by a fresh copy of ``template`` (Secure Boot turned on or off): the
    old store is renamed to ``efivars.fd.STAMP.bak`` beside it first (kept: it holds the guest's boot
    entries and any keys it enrolled). Crash-safe: after the rename the store is simply missing, and the
    copy (here, or the next plan's create-efi-vars) makes it from the template. What was done."""
    if efi_vars_exists(paths) and efi_vars_origin(paths) is secure_boot:
        return "already copied from a template of this kind (kept as it is)"
    backup = None
    if efi_vars_exists(paths):
        backup = paths.efi_vars.with_name(f"{paths.efi_vars.name}.{stamp}.bak")
        for n in range(1, 100):  # two resets within one second keep both backups
            if not backup.exists():
                break
            backup = paths.efi_vars.with_name(f"{paths.efi_vars.name}.{stamp}-{n}.bak")
        os.rename(paths.efi_vars, backup)
    install_efi_vars(template, paths, uid, gid, secure_boot)
    return f"copied {template}" + (f"; the old store is kept as {backup}" if backup else "")


def efi_vars_backups(paths: VMPaths) -> list[Path]:
    """The dated backups ``reset_efi_vars`` kept, oldest first."""
    return sorted(paths.efi_vars.parent.glob(f"{paths.efi_vars.name}.*.bak"))


def open_efi_vars(paths: VMPaths) -> int:
    """The VM's variable store, read-write, for QEMU's pflash1 (never through a link).

    :raise Refused: When it is missing (the create-efi-vars step runs before a start) or not a file.
    """
    try:
        fd = os.open(paths.efi_vars, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Refused(f"{paths.efi_vars} (the VM's UEFI variables) is missing: re-run apply, which creates it "
                      "from OVMF's template") from None
    except OSError as exc:
        raise Refused(f"cannot open {paths.efi_vars}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(f"{paths.efi_vars} is not a regular file: remove it by hand")
    return fd


def delete_efi_vars(paths: VMPaths) -> bool:
    """Delete the VM's variable store (and its disk folder once empty); True if it existed."""
    try:
        paths.efi_vars.unlink()
    except FileNotFoundError:
        return False
    # Its origin and the dated backups of Secure Boot toggles go with it (the VM and its disks are gone).
    for extra in (_efi_vars_origin_file(paths), *efi_vars_backups(paths)):
        extra.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        paths.efi_vars.parent.rmdir()  # only if empty
    return True
