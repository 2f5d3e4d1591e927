"""Hostile and careless input, on a real host: nothing hangs, nothing half-applies, nothing is deleted by
surprise (issue 12, the input half). Each test is one case of the issue's corpus."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.e2e.harness import Host, vm_manifest

SECRET = "Hunter2-s3cret"


def _record(host: Host, vm: str) -> dict[str, object] | None:
    path = host.state / "vms" / vm / "record.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_apply_of_another_directory_keeps_the_vms_of_the_first(host: Host) -> None:
    delete = "    - {name: root, size: 64Mi, deletePolicy: Delete}"
    host.write("a.yaml", vm_manifest("a", run_strategy="Halted", disks=delete))
    host.apply()
    disk = host.disk("a", "root")
    assert disk.exists()
    other = host.base / "other"
    other.mkdir()
    (other / "b.yaml").write_text(vm_manifest("b", run_strategy="Halted"))

    done = host.cli("apply", str(other), "--yes", check=True)
    assert "VirtualMachine a is kept" in done.stdout
    assert f"applied from {host.manifests}; not pruned" in done.stdout
    assert disk.exists() and _record(host, "a") is not None, "nothing of a was touched"
    assert _record(host, "b") is not None
    assert host.cli("plan", str(other), "--detailed-exitcode").returncode == 0, "kept VMs are no pending change"
    rows = {row["name"]: row for row in json.loads(host.cli("status", "--json", str(other), check=True).stdout)["vms"]}
    assert rows["a"]["kept"].startswith(f"applied from {host.manifests}; not pruned")
    assert rows["a"]["manifest"] == f"{host.manifests}/a.yaml"

    # Another --host scope never touches VMs of this one, even when told to prune.
    scoped = host.cli("apply", str(other), "--yes", "--host", "h2", "--prune-other-sources", check=True)
    assert "VirtualMachine a" not in scoped.stdout and _record(host, "a") is not None and _record(host, "b") is not None
    assert host.disk("a", "root").exists()

    pruned = host.cli("apply", str(other), "--yes", "--prune-other-sources", check=True)
    assert "VirtualMachine a will be deleted" in pruned.stdout and f"(applied from {host.manifests})" in pruned.stdout
    assert not disk.exists() and _record(host, "a") is None


def test_the_same_directory_through_a_symlink_is_the_same_source(host: Host) -> None:
    host.write("a.yaml", vm_manifest("a", run_strategy="Halted"))
    host.write("b.yaml", vm_manifest("b", run_strategy="Halted"))
    alias = host.base / "alias"
    alias.symlink_to(host.manifests, target_is_directory=True)
    host.cli("apply", str(alias), "--yes", check=True)
    assert _record(host, "a")["source"] == f"{host.manifests.resolve()}/a.yaml"  # type: ignore[index]
    assert host.cli("plan", str(host.manifests), "--detailed-exitcode").returncode == 0
    (host.manifests / "b.yaml").unlink()
    # Through the real path, b's manifest was removed from the directory it was applied from: deleted, not
    # "kept" as another directory's VM.
    done = host.cli("apply", str(host.manifests), "--yes", check=True)
    assert "VirtualMachine b will be deleted" in done.stdout and _record(host, "b") is None, done.stdout
    assert _record(host, "a") is not None


def test_validate_is_bounded_and_every_bad_file_is_located(host: Host) -> None:
    host.write("good.yaml", vm_manifest("good"))
    (host.manifests / "zero.yaml").symlink_to("/dev/zero")
    os.mkfifo(host.manifests / "pipe")
    (host.manifests / "fifo.yaml").symlink_to(host.manifests / "pipe")
    holder = os.open(host.manifests / "pipe", os.O_RDWR)  # a writer holds it open: a plain read would block
    try:
        host.write("deep.yaml", "a: " + "[" * 600 + "]" * 600 + "\n")
        began = time.monotonic()
        done = host.cli("validate", str(host.manifests), timeout=60)
        seconds = time.monotonic() - began
    finally:
        os.close(holder)
    assert done.returncode == 1
    errors = sorted(line for line in done.stderr.splitlines() if line.startswith("error: /"))
    assert errors == [
        f"error: {host.manifests}/deep.yaml:1:35: invalid YAML: nested deeper than 32 levels",
        f"error: {host.manifests}/fifo.yaml:1:1: a FIFO, not a regular file: refused",
        f"error: {host.manifests}/zero.yaml:1:1: a symlink out of the manifest directory (to /dev/zero) is refused",
    ], done.stderr
    print(f"validate with /dev/zero, a held FIFO and 600 nested brackets: {seconds:.2f}s")


def test_values_qemu_would_refuse_are_refused_before_anything_is_created(host: Host) -> None:
    host.write("a.yaml", vm_manifest("a", disks="    - {name: root, size: 1024Pi}"))
    host.write("b.yaml", vm_manifest("b", disks="    - {name: root, size: 64Mi, iops: 2000000000000000}"))
    disks = "\n".join(f"    - {{name: d{i}, size: 1Mi}}" for i in range(256))
    host.write("c.yaml", vm_manifest("c", disks=disks))
    host.write("d.yaml", vm_manifest("d", memory="1Ti"))
    done = host.apply(check=False)
    assert done.returncode == 1
    stderr = " ".join(done.stderr.split())
    assert f"{host.manifests}/a.yaml:" in stderr and "spec.disks[0]: disk size is over 2Pi" in stderr, stderr
    assert "b.yaml" in stderr and "spec.disks[0].iops" in stderr
    assert "c.yaml" in stderr and "the devices need 263 PCI slots" in stderr
    assert "d.yaml" in stderr and "40 physical address bits" in stderr
    assert not (host.state / "vms").exists() or not any((host.state / "vms").iterdir()), "nothing half-applied"
    assert not (host.state / "disks").exists() or not any((host.state / "disks").rglob("*.qcow2"))


def test_memory_beyond_the_hosts_ram_is_refused_at_plan_time(host: Host) -> None:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    gib = -(-ram // 1024**3) + 1  # more than the host has, within QEMU's own limits
    host.write("a.yaml", vm_manifest("a", memory=f"{gib}Gi"))
    done = host.cli("plan", str(host.manifests))
    assert done.returncode == 1
    assert f"spec.memory.size: {gib}Gi is more than this host's" in done.stdout
    assert host.apply(check=False).returncode == 1
    assert _record(host, "a") is None and not host.disk("a", "root").exists()


def test_a_password_in_argv_is_refused_and_never_shown(host: Host) -> None:
    done = host.cli("sync", str(host.manifests), "--metrics-address", "none",
                    "--database", f"postgresql://infz:{SECRET}@127.0.0.1:1/infz", timeout=30)
    assert done.returncode == 1 and "has a password on the command line" in done.stderr
    assert SECRET not in done.stdout + done.stderr and "postgresql://infz:***@" in done.stderr
    bad = host.cli("sync", str(host.manifests), "--metrics-address", "none", timeout=30,
                   env=host.env(INFINIZATION_DATABASE_URL=f"postgresql://infz:{SECRET}@db:port/infz"))
    assert bad.returncode == 1 and "invalid database URL" in bad.stderr and SECRET not in bad.stderr
    secret_file = host.base / "db.url"
    secret_file.write_text(f"postgresql://infz:{SECRET}@127.0.0.1:1/infz\n")
    secret_file.chmod(0o644)
    loose = host.cli("sync", str(host.manifests), "--database-file", str(secret_file), timeout=30)
    assert loose.returncode == 1 and "chmod 0600" in loose.stderr and SECRET not in loose.stderr


def test_logs_refuses_names_outside_the_state_directory(host: Host) -> None:
    outside = host.base / "x" / "run"
    outside.mkdir(parents=True)
    (outside / "serial.log").write_text("not a VM's log\n")
    for name in ("../../x", "../x", "/etc", "a/b"):
        done = host.cli("logs", name)
        assert done.returncode == 1 and "is not a VM name" in done.stderr, (name, done.stderr)
        assert "not a VM's log" not in done.stdout


def test_logs_shows_a_guests_escape_sequences_instead_of_running_them(host: Host) -> None:
    host.write("a.yaml", vm_manifest("a"))
    host.apply()
    host.guest("a").wait_report(lambda r: "vda" in r.disks, what="boot")
    # The guest owns its console: what it writes there is appended as is (QEMU's chardev is a plain file).
    serial = host.state / "vms" / "a" / "run" / "serial.log"
    with serial.open("ab") as console:
        console.write(b"\x1b]0;owned\x07\x1b[31mred\x1b[0m\r\n")
    done = host.cli("logs", "a", "--tail", "1", check=True)
    assert done.stdout == "\\x1b]0;owned\\x07\\x1b[31mred\\x1b[0m\n"
    assert "\x1b" not in host.cli("logs", "a", check=True).stdout


def test_a_held_fifo_in_the_manifests_never_delays_a_restart(host: Host) -> None:
    daemon = host.start_sync()
    holder = None
    try:
        host.write("a.yaml", vm_manifest("a"))
        pid = host.wait_for(lambda: host.running_pid("a"), "the VM to start")
        host.guest("a").wait_report(lambda r: "vda" in r.disks, what="boot")
        os.mkfifo(host.manifests / "pipe")
        holder = os.open(host.manifests / "pipe", os.O_RDWR)  # a reader that blocked would wait forever
        (host.manifests / "fifo.yaml").symlink_to(host.manifests / "pipe")
        host.wait_for(lambda: any("fifo.yaml:1:1: a FIFO" in str(e["message"]) for e in host.events("-")),
                      "the FIFO's located error in the events")
        began = time.monotonic()
        os.kill(int(str(pid)), signal.SIGKILL)
        host.wait_for(lambda: (p := host.running_pid("a")) and p != pid, "a new QEMU", timeout=60)
        print(f"restart after SIGKILL with a held FIFO in the manifests: {time.monotonic() - began:.2f}s")
    finally:
        if holder is not None:
            os.close(holder)
        assert host.stop_sync(daemon) == 0


def test_two_vms_whose_default_macs_collide_both_run_with_distinct_ones(host: Host) -> None:
    from reconciler.spec.models import default_mac

    first, second = "vm-909201", "vm-233575"  # sha256 of "NAME/nat" shares its first 40 bits
    assert default_mac(first, "nat") == default_mac(second, "nat")
    host.write("b.yaml", vm_manifest(first))
    host.apply()
    seen = host.guest(first).wait_report(lambda r: "eth0" in r.nics, what="boot").nics["eth0"][0]
    assert seen == default_mac(first, "nat")
    # The later VM sorts first by name, yet the address already assigned stays with the VM that has it.
    host.write("a.yaml", vm_manifest(second))
    host.apply()
    other = host.guest(second).wait_report(lambda r: "eth0" in r.nics, what="boot").nics["eth0"][0]
    assert other == default_mac(second, "nat", 1) != seen
    assert host.plan_exit() == 0
    record = _record(host, first)
    assert record is not None and record["vm"]["spec"]["networks"][0]["mac"] == seen  # type: ignore[index]


def test_sync_of_another_directory_keeps_the_vms_of_the_first(host: Host) -> None:
    from tests.e2e.test_sync_daemon import _store_conditions

    other = host.base / "other"
    other.mkdir()
    (other / "a.yaml").write_text(vm_manifest("a", run_strategy="Halted",
                                              disks="    - {name: root, size: 64Mi, deletePolicy: Delete}"))
    host.cli("apply", str(other), "--yes", check=True)
    host.write("b.yaml", vm_manifest("b", run_strategy="Halted"))
    daemon = host.start_sync()
    try:
        host.wait_for(lambda: _record(host, "b"), "b's record")
        host.wait_for(lambda: "NotPruned" in _store_conditions(host, "a"), "a reported NotPruned")
        assert f"applied from {other}" in _store_conditions(host, "a")["NotPruned"]
        host.wait_for(lambda: any(e["kind"] == "daemon" for e in host.events("-")), "the daemon's start event")
        assert _record(host, "a") is not None and host.disk("a", "root").exists()
        assert not any(e["vm"] == "a" and e["kind"] in ("forget", "delete-disk") for e in host.events())
    finally:
        assert host.stop_sync(daemon) == 0


def test_the_database_password_comes_from_a_file_and_is_shown_nowhere(host: Host, postgres: str) -> None:
    import psycopg

    with_password = postgres.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")
    secret_file = host.base / "db.url"
    secret_file.write_text(f"# the status mirror\n{with_password}\n")
    secret_file.chmod(0o600)
    host.write("a.yaml", vm_manifest("a", run_strategy="Halted"))
    daemon = host.start_sync("--database-file", str(secret_file))
    try:
        def rows() -> set[tuple[str, str]]:
            with psycopg.connect(postgres) as db:
                try:
                    return {(r[0], r[1]) for r in db.execute("SELECT vm, phase FROM infinization_vm_status")}
                except psycopg.errors.UndefinedTable:  # the mirror has not connected yet
                    return set()
        host.wait_for(lambda: ("a", "Stopped") in rows(), "a's row in PostgreSQL")
        assert SECRET.encode() not in Path(f"/proc/{daemon.pid}/cmdline").read_bytes()
    finally:
        assert host.stop_sync(daemon) == 0
    shown = (host.base / "sync.log").read_text() + json.dumps(host.events()) + host.cli("status", "--json").stdout
    assert SECRET not in shown
