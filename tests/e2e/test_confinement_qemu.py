"""QEMU is confined: an unprivileged user, no capabilities, NoNewPrivs, seccomp; its files are private; a
process is adopted as a VM's QEMU only when proven (issue 9). Each fact is read from /proc, the file
system, a socket or the guest's serial console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from reconciler.runtime.store import Store
from tests.e2e.harness import Host, vm_manifest, wait_gone
from tests.e2e.test_live_changes import live_vm, make_iso

MiB = 1024**2
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_qemu_runs_unprivileged_and_filtered_and_still_hotplugs(host: Host) -> None:
    guest = host.guest("live")
    host.write("live.yaml", live_vm())
    host.apply()
    (pid,) = host.qemu_pids("live")
    status = proc_status(pid)
    assert set(status["Uid"].split()) != {"0"} and "0" not in status["Uid"].split(), status["Uid"]
    assert "0" not in status["Gid"].split() and "0" not in status["Groups"].split(), (status["Gid"], status["Groups"])
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
    assert status["Seccomp"] == "2", "QEMU's -sandbox filter is on"
    assert status["NoNewPrivs"] == "1"
    assert os.readlink(f"/proc/{pid}/exe") == "/usr/bin/qemu-system-x86_64"
    guest.wait_report(lambda r: "vda" in r.disks and "eth0" in r.nics, what="boot")

    # A disk and a NIC added live, then the disk grown live: the guest sees each, with the same QEMU.
    disk, nic = "    - {name: data, size: 32Mi}", '    - {name: second, mac: "52:54:00:be:00:02"}'
    host.write("live.yaml", live_vm(disks=disk, nics=nic))
    assert "hot-plug" in host.apply().stdout
    guest.wait_report(lambda r: r.disks.get("vdb") == 32 * MiB and ("52:54:00:be:00:02", "up") in r.nics.values(),
                      what="the hot-added disk and NIC")
    host.write("live.yaml", live_vm(disks="    - {name: data, size: 48Mi}", nics=nic))
    host.apply()
    guest.wait_report(lambda r: r.disks.get("vdb") == 48 * MiB, what="vdb grown live to 48Mi")
    assert host.qemu_pids("live") == [pid]
    assert host.plan_exit() == 0
    # QEMU's files: disks 0600 and QEMU's, its run directory 0700 and QEMU's.
    for image in (host.disk("live", "root"), host.disk("live", "data")):
        info = image.stat()
        assert (info.st_uid, info.st_mode & 0o777) == (int(status["Uid"].split()[0]), 0o600), image

    stopped = host.cli("stop", "live", check=True).stdout
    assert "guest powered off" in stopped, stopped
    assert wait_gone(pid)


NOBODY_PROBE = """
import json, socket, sys
found = {}
for path in sys.argv[1:-1]:
    try:
        open(path, "rb").read(1)
        found[path] = "read"
    except OSError as exc:
        found[path] = type(exc).__name__
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[-1])
    found[sys.argv[-1]] = "connected"
except OSError as exc:
    found[sys.argv[-1]] = type(exc).__name__
print(json.dumps(found))
"""


def test_other_users_cannot_read_disks_store_log_or_reach_the_monitor(host: Host) -> None:
    host.write("vm.yaml", vm_manifest("priv"))
    host.apply()
    host.guest("priv").wait_report(lambda r: "vda" in r.disks, what="boot")
    store = Store(host.state / "infinization.db")  # as the sync daemon opens it
    store.event("priv", "test", "ok", "a row, so the WAL exists")
    store.close()
    database = host.state / "infinization.db"
    secrets = [host.disk("priv", "root"), database, host.guest("priv").serial, host.state / "vms/priv/launch.json"]
    secrets += [p for p in (Path(f"{database}-wal"), Path(f"{database}-shm")) if p.exists()]
    qmp = host.state / "vms/priv/run/qmp.sock"
    for path in [*secrets, qmp]:
        assert path.exists(), path  # so a failure below is about permissions, not a missing file
        assert path.stat().st_mode & 0o077 == 0 or path.is_socket(), f"{path}: {oct(path.stat().st_mode)}"
    done = subprocess.run([*NOBODY, sys.executable, "-c", NOBODY_PROBE, *map(str, secrets), str(qmp)],
                          capture_output=True, text=True, check=True)
    found = json.loads(done.stdout)
    assert found == {str(path): "PermissionError" for path in [*secrets, qmp]}, found
    # The check itself can pass: root reads them all.
    assert all(path.read_bytes() is not None for path in secrets)


def test_a_recycled_pid_with_a_forged_argv_is_not_adopted(host: Host, tmp_path: Path) -> None:
    host.write("vm.yaml", vm_manifest("pidvm"))
    host.apply()
    guest = host.guest("pidvm")
    guest.wait_report(lambda r: "vda" in r.disks, what="boot")
    (real,) = host.qemu_pids("pidvm")
    os.kill(real, signal.SIGKILL)
    assert wait_gone(real)
    # Another user's process that looks like the VM's QEMU: named qemu-system-*, its argv naming the
    # VM's pidfile, and the pidfile naming it (as after a PID recycled by fork-until-it-comes-back).
    fake_bin = host.base / "bin"
    fake_bin.mkdir(mode=0o755)
    (fake_bin / "qemu-system-x86_64").symlink_to(sys.executable)
    pidfile = host.pidfile("pidvm")
    forged = subprocess.Popen([*NOBODY, str(fake_bin / "qemu-system-x86_64"), "-c", "import time; time.sleep(300)",
                               "-pidfile", str(pidfile)])
    try:
        pidfile.write_text(f"{forged.pid}\n")
        assert host.qemu_pids("pidvm") == [forged.pid]

        status = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]
        assert status["pid"] is None and status["phase"] != "Running", status
        assert f"pid {forged.pid}" in status["unverified"] and "not adopted" in status["unverified"], status
        text = host.cli("status", check=True).stdout
        assert "unverified" in text, text

        out = host.apply().stdout  # the VM is started again: a new QEMU, verified; the forged one untouched
        assert "start QEMU" in out, out
        new = int(pidfile.read_text())
        assert new != forged.pid and forged.poll() is None, "the forged process was neither adopted nor signalled"
        assert proc_status(new)["Seccomp"] == "2"
        assert os.readlink(f"/proc/{new}/exe") == "/usr/bin/qemu-system-x86_64"
        after = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]
        assert (after["pid"], after["phase"], after["unverified"]) == (new, "Running", None), after
        guest.wait_report(lambda r: "vda" in r.disks, boot=2, what="the guest booting again")
    finally:
        forged.kill()
        forged.wait()


def test_a_missing_qemu_user_refuses_the_start_in_one_line(host: Host) -> None:
    config = host.base / "config.yaml"
    config.write_text("qemuUser: infz-no-such-user\n")
    host.write("vm.yaml", vm_manifest("nouser"))
    done = host.cli("apply", str(host.manifests), "--yes", env=host.env(INFINIZATION_CONFIG=str(config)))
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert "QEMU's user 'infz-no-such-user' does not exist: run scripts/setup.sh" in said, said
    assert "Traceback" not in said
    assert host.qemu_pids("nouser") == []


def test_linked_clones_and_media_root_alone_can_read_reach_the_guest_as_fds(host: Host) -> None:
    """A backing image and an ISO readable by root alone: QEMU's user could not open them by path, so the
    guest seeing them proves they were handed over (at start and hot-plugged)."""
    base, iso = host.base / "base.qcow2", host.base / "media.iso"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "40M"], check=True)
    make_iso(iso, "INFZ_FD")
    for path in (base, iso):
        path.chmod(0o600)
    clone = f"    - {{name: clone, image: {base}}}"
    guest = host.guest("live")
    host.write("live.yaml", live_vm(disks=clone, cd=f", image: {iso}"))
    host.apply()
    (pid,) = host.qemu_pids("live")
    guest.wait_report(lambda r: r.disks.get("vdb") == 40 * MiB and r.cds.get("sr0") == "INFZ_FD",
                      what="the linked clone and the CD")
    assert not [arg for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if str(base).encode() in arg
                and b"opaque=" not in arg], "QEMU is never given the backing image's path to open"
    # Hot-plugged: a second clone of the same base, and the medium ejected and inserted again.
    host.write("live.yaml", live_vm(disks=f"{clone}\n    - {{name: clone2, image: {base}}}"))
    host.apply()
    guest.wait_report(lambda r: r.disks.get("vdc") == 40 * MiB and r.cds.get("sr0") == "-", what="clone2, no CD")
    host.write("live.yaml", live_vm(disks=f"{clone}\n    - {{name: clone2, image: {base}}}", cd=f", image: {iso}"))
    host.apply()
    guest.wait_report(lambda r: r.cds.get("sr0") == "INFZ_FD", what="the CD inserted live")
    assert host.qemu_pids("live") == [pid] and host.plan_exit() == 0


def test_a_start_error_is_reported_with_qemus_own_words(host: Host) -> None:
    manifest = vm_manifest("bad").replace("cpu: {cores: 1}", "cpu: {cores: 1, model: infz-no-such-cpu}")
    assert "infz-no-such-cpu" in manifest
    host.write("vm.yaml", manifest)
    done = host.apply(check=False)
    assert done.returncode != 0
    line = next(line for line in done.stdout.splitlines() if "bad: start QEMU" in line)
    # QEMU's message, from its stderr log, synchronously in the step's result
    assert "QEMU refused to start:" in line and "infz-no-such-cpu" in line, line
    assert host.qemu_pids("bad") == []

