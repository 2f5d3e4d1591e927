"""The sync daemon on real QEMU: event-driven convergence, restarts by run strategy, broken edits, restarts
of the daemon itself, warn-only mode."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from reconciler.adapters import monitor
from tests.e2e.harness import Host, vm_manifest, wait_gone

MiB = 1024**2



def _store_conditions(host: Host, vm: str) -> dict[str, str]:
    status = host.stored_status(vm)
    return status.conditions if status else {}


def _powerdown(host: Host, vm: str) -> None:
    async def press() -> None:
        async with monitor.session(host.state / "vms" / vm / "run" / "qmp.sock") as qmp:
            await qmp.execute("system_powerdown")
    asyncio.run(press())


def test_daemon_converges_on_file_changes_and_crashes(host: Host) -> None:
    daemon = host.start_sync()
    try:
        host.write("a.yaml", vm_manifest("a"))
        pid = host.wait_for(lambda: host.running_pid("a"), "the VM to start")
        first = host.guest("a").wait_report(lambda r: "vda" in r.disks, what="boot")

        # Growing the disk in the file is applied live.
        host.write("a.yaml", vm_manifest("a", disks="    - {name: root, size: 80Mi}"))
        host.guest("a").wait_report(lambda r: r.disks.get("vda") == 80 * MiB, after_seq=first.seq, what="80Mi")
        assert host.running_pid("a") == pid

        # SIGKILL: QEMU comes back (runStrategy Always), and the event log says why.
        import os
        import signal
        os.kill(int(str(pid)), signal.SIGKILL)
        new = host.wait_for(lambda: (p := host.running_pid("a")) and p != pid and p, "a new QEMU")
        assert any(e["kind"] == "process-exit" and e["result"] == "failure" for e in host.events("a"))

        # A broken edit is reported and the VM keeps running with its last good spec.
        host.write("a.yaml", vm_manifest("a", disks="    - {name: root, size: 80Mi}") + "  bogus: [\n")
        host.wait_for(lambda: any(e["kind"] == "manifest" for e in host.events("-")), "the manifest error event")
        assert host.running_pid("a") == new
        host.wait_for(lambda: "ManifestInvalid" in _store_conditions(host, "a"), "ManifestInvalid in the store")

        # While the daemon runs, a manual apply is refused at once, with the reason.
        manual = host.apply(check=False)
        assert manual.returncode == 1 and "a sync daemon runs" in manual.stderr

        # Stopping the daemon leaves the VM running; a new daemon re-attaches without restarting it.
        assert host.stop_sync(daemon) == 0
        assert host.running_pid("a") == new
        host.write("a.yaml", vm_manifest("a", disks="    - {name: root, size: 80Mi}"))
        daemon = host.start_sync(log_name="sync2.log")
        host.wait_for(lambda: any(e["kind"] == "daemon" and e["result"] == "started"
                                  for e in host.events("-")[-3:]), "the second daemon")
        host.wait_for(lambda: json.loads(host.cli("status", "--json", str(host.manifests)).stdout)["vms"][0]
                      .get("conditions", {}).get("Ready") == "", "the VM reported Ready")
        assert host.running_pid("a") == new, "a daemon restart must not restart VMs"
        starts = [e for e in host.events("a") if e["kind"] == "start"]
        assert len(starts) == 2, "started once, restarted once after the SIGKILL, never by the second daemon"
    finally:
        host.stop_sync(daemon)


def test_rerun_on_failure_restarts_crashes_not_clean_shutdowns(host: Host) -> None:
    daemon = host.start_sync()
    try:
        host.write("r.yaml", vm_manifest("r", run_strategy="RerunOnFailure"))
        pid = host.wait_for(lambda: host.running_pid("r"), "the VM to start")
        host.guest("r").wait_report(lambda r: "vda" in r.disks, what="boot")

        import os
        import signal
        os.kill(int(str(pid)), signal.SIGKILL)
        pid2 = host.wait_for(lambda: (p := host.running_pid("r")) and p != pid and p, "a restart after the crash")
        host.guest("r").wait_report(lambda r: "vda" in r.disks, what="boot again", boot=2)

        _powerdown(host, "r")  # the guest powers itself off cleanly (ACPI)
        assert wait_gone(int(str(pid2)), timeout=30)
        try:
            host.wait_for(lambda: any(e["kind"] == "process-exit" and "guest-shutdown" in str(e["message"])
                                      for e in host.events("r")), "the clean exit event")
            host.wait_for(lambda: json.loads(host.cli("status", "--json", str(host.manifests)).stdout)["vms"][0]
                          ["phase"] == "Stopped", "status Stopped", timeout=20)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; events: {host.events('r')}") from exc
        assert host.qemu_pids("r") == [], "a clean guest shutdown is not restarted"
        exits = [e for e in host.events("r") if e["kind"] == "process-exit" and f"pid {pid2} " in str(e["message"])]
        assert len(exits) == 1, f"one exit report per QEMU, got {exits}"
        exit_record = json.loads(Path(host.state / "vms/r/exit.json").read_text())
        assert exit_record["reason"] == "guest-shutdown"
    finally:
        host.stop_sync(daemon)


def test_rerun_on_failure_starts_a_vm_the_reconciler_stopped(host: Host) -> None:
    """Halted stops the VM with the power button, so the guest shuts down cleanly; yet it was our stop, not
    the guest's choice, and RerunOnFailure starts it again."""
    daemon = host.start_sync()
    try:
        host.write("h.yaml", vm_manifest("h"))
        pid = host.wait_for(lambda: host.running_pid("h"), "the VM to start")
        host.guest("h").wait_report(lambda r: "vda" in r.disks, what="boot")
        host.write("h.yaml", vm_manifest("h", run_strategy="Halted"))
        assert wait_gone(int(str(pid)), timeout=40)
        host.wait_for(lambda: any(e["kind"] == "stop" and e["result"] == "ok" for e in host.events("h")), "the stop")
        assert json.loads((host.state / "vms/h/exit.json").read_text())["reason"] == "stopped"
        host.write("h.yaml", vm_manifest("h", run_strategy="RerunOnFailure"))
        host.wait_for(lambda: host.running_pid("h"), "the VM started again")
        host.guest("h").wait_report(lambda r: "vda" in r.disks, what="boot again", boot=2)
    finally:
        host.stop_sync(daemon)


def test_a_corrupt_record_fails_its_vm_only(host: Host) -> None:
    import os
    import signal

    daemon = host.start_sync()
    try:
        host.write("a.yaml", vm_manifest("a"))
        host.write("b.yaml", vm_manifest("b"))
        pid_a = host.wait_for(lambda: host.running_pid("a"), "a to start")
        pid_b = host.wait_for(lambda: host.running_pid("b"), "b to start")
        (host.state / "vms" / "b" / "record.json").write_text("{}")
        os.kill(int(str(pid_a)), signal.SIGKILL)
        host.wait_for(lambda: (p := host.running_pid("a")) and p != pid_a, "a restarted despite b's broken record")
        host.wait_for(lambda: "record" in _store_conditions(host, "b").get("Failed", ""), "b reported Failed")
        assert host.running_pid("b") == pid_b, "a VM whose record is unreadable is left running, as it is"
    finally:
        host.stop_sync(daemon)


def test_dry_run_reports_and_changes_nothing(host: Host) -> None:
    daemon = host.start_sync("--dry-run")
    try:
        host.write("d.yaml", vm_manifest("d"))
        host.wait_for(lambda: any(e["kind"] == "would-create" for e in host.events("d")), "a would-create event")
        assert host.qemu_pids("d") == []
        assert not (host.state / "vms" / "d").exists()
        host.wait_for(lambda: "start QEMU" in _store_conditions(host, "d").get("Drifted", ""), "Drifted in the store")
        assert "Ready" not in _store_conditions(host, "d")
    finally:
        host.stop_sync(daemon)


def test_a_git_checkout_in_progress_is_not_acted_on(host: Host) -> None:
    """While git holds index.lock the tree may be half written: a VM whose manifest is moving between files
    must not be deleted, and nothing is read until git is done."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(host.manifests), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    host.write("a.yaml", vm_manifest("a"))
    git("add", "-A")
    git("commit", "-qm", "a")
    daemon = host.start_sync()
    try:
        pid = host.wait_for(lambda: host.running_pid("a"), "the VM to start")
        lock = host.manifests / ".git" / "index.lock"
        lock.touch()  # what git does for the length of a checkout
        (host.manifests / "a.yaml").unlink()  # the first batch: the VM's manifest is gone...
        host.wait_for(lambda: any(e["kind"] == "manifest" and e["result"] == "waiting" for e in host.events("-")),
                      "the daemon to wait for git")
        host.write("vms/a.yaml", vm_manifest("a"))  # ...the second batch: it is back, in another file
        host.write("n.yaml", vm_manifest("n"))
        assert host.running_pid("a") == pid and host.qemu_pids("n") == [], "nothing is acted on while git works"
        lock.unlink()
        host.wait_for(lambda: host.running_pid("n"), "the new VM once git is done")
        assert host.running_pid("a") == pid, "the moved VM was never stopped"
        assert not any(e["kind"] in ("stop", "delete-disk", "forget") for e in host.events("a"))
    finally:
        host.stop_sync(daemon)


def test_a_daemon_started_on_a_broken_or_empty_directory_deletes_nothing(host: Host) -> None:
    """The daemon has no memory of a good version when it starts: the last applied records stand in."""
    import time

    manifest = vm_manifest("w", disks="    - {name: root, size: 64Mi, deletePolicy: Delete}")
    host.write("w.yaml", manifest)
    host.apply()
    pid = host.running_pid("w")
    disk = host.state / "disks" / "w" / "root.qcow2"
    assert pid and disk.exists()

    def reconciled_since(moment: float) -> dict[str, str] | None:
        status = host.stored_status("w")
        return status.conditions if status and status.last_reconcile and status.last_reconcile > moment else None

    host.write("w.yaml", manifest + "  bogus: [\n")
    began = time.time()
    daemon = host.start_sync()
    try:
        conditions = host.wait_for(lambda: reconciled_since(began), "a reconcile of w")
        assert "ManifestInvalid" in conditions, conditions  # type: ignore[operator]
        assert host.running_pid("w") == pid and disk.exists()
    finally:
        host.stop_sync(daemon)

    (host.manifests / "w.yaml").unlink()
    began = time.time()
    daemon = host.start_sync(log_name="sync2.log")
    try:
        host.wait_for(lambda: reconciled_since(began), "a reconcile of w")
        assert any("holds no manifests" in str(e["message"]) for e in host.events("-"))
        assert host.running_pid("w") == pid and disk.exists()
        assert not any(e["kind"] in ("stop", "delete-disk") for e in host.events("w"))
    finally:
        host.stop_sync(daemon)


def test_two_hosts_share_the_manifests_and_the_database(host: Host, tmp_path: Path, postgres: str) -> None:
    """Two daemons with different --host names on one machine: each runs only its own VMs, both report
    to the same PostgreSQL."""
    import psycopg

    other = Host(Path(__import__("tempfile").mkdtemp(prefix="infz-", dir="/tmp")))
    other.manifests = host.manifests  # one git checkout, two hosts
    host.write("x.yaml", vm_manifest("x").replace("  runStrategy: Always", "  runStrategy: Always\n  host: h1"))
    host.write("y.yaml", vm_manifest("y").replace("  runStrategy: Always", "  runStrategy: Always\n  host: h2"))
    one = host.start_sync("--host", "h1", "--database", postgres)
    two = other.start_sync("--host", "h2", "--database", postgres)
    try:
        host.wait_for(lambda: host.running_pid("x"), "x on h1")
        other.wait_for(lambda: other.running_pid("y"), "y on h2")

        def rows() -> set[tuple[str, str, str]]:
            with psycopg.connect(postgres) as db:
                return {tuple(r) for r in db.execute("SELECT host, vm, phase FROM infinization_vm_status")}
        host.wait_for(lambda: {("h1", "x", "Running"), ("h2", "y", "Running")} <= rows(), "both rows in PostgreSQL")
        assert not (host.state / "vms" / "y").exists() and not (other.state / "vms" / "x").exists()
        with psycopg.connect(postgres) as db:
            kinds = {r[0] for r in db.execute("SELECT DISTINCT kind FROM infinization_events")}
        assert {"start", "create-disk"} <= kinds
    finally:
        host.stop_sync(one)
        other.stop_sync(two)
        other.kill_all()
        other.delete_firewall()
        __import__("shutil").rmtree(other.base, ignore_errors=True)


def test_crash_loop_backs_off(host: Host) -> None:
    import os
    import signal

    daemon = host.start_sync()
    try:
        host.write("c.yaml", vm_manifest("c"))
        pid = host.wait_for(lambda: host.running_pid("c"), "the VM to start")
        for _ in range(3):  # three crashes are restarted at once...
            os.kill(int(str(pid)), signal.SIGKILL)
            pid = host.wait_for(lambda old=pid: (p := host.running_pid("c")) and p != old and p, "a restart")
        os.kill(int(str(pid)), signal.SIGKILL)  # ...the fourth within two minutes waits
        host.wait_for(lambda: any(e["kind"] == "crash-loop" for e in host.events("c")), "the crash-loop event")
        assert "CrashLoopBackOff" in _store_conditions(host, "c")
        assert host.qemu_pids("c") == []
        # A daemon restarted during the backoff keeps backing off: the history is on disk, not in memory.
        host.stop_sync(daemon)
        last_restart = max(json.loads((host.state / "vms/c/restarts.json").read_text()))
        daemon = host.start_sync(log_name="sync2.log")
        host.wait_for(lambda: host.running_pid("c"), "the delayed restart", timeout=30)
        started = max(e["ts"] for e in host.events("c") if e["kind"] == "start" and e["result"] == "ok")
        assert float(str(started)) >= last_restart + 10, "the new daemon waited out the backoff (10 s after 3)"
    finally:
        host.stop_sync(daemon)


def test_an_unanswering_postgresql_never_holds_up_a_vm(host: Host) -> None:
    """The mirror server accepts TCP connections and never says a word: psycopg waits for its 5 s
    connect timeout, again and again. The daemon's own work must not wait with it."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
    url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/postgres"
    daemon = host.start_sync("--database", url)
    try:
        host.write("p.yaml", vm_manifest("p"))
        # Well inside one connect timeout: the VM is up and its status written locally meanwhile.
        host.wait_for(lambda: host.running_pid("p"), "the VM to start", timeout=4)
        host.wait_for(lambda: "Ready" in _store_conditions(host, "p"), "Ready in the local store", timeout=4)
    finally:
        host.stop_sync(daemon)
        silent.close()
