"""Helpers for end-to-end tests: run the real CLI, write manifests, read what the guest reports.

The guest (scripts/build-guest.sh) prints ``INFZ-REPORT seq=N disks=... nics=... mem_kb=... cpus=...`` on
its serial console whenever what it sees changes; ``Guest.wait_report`` polls the serial log with a deadline
until a report satisfies a predicate, so tests assert on what the guest itself sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.hostnet.nftables import firewall_table
from reconciler.runtime.store import VMStatus, open_readonly

ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("INFZ_GUEST_DIR", "/var/cache/infinization/guest"))
# The real-OS guest (Debian 12 with systemd and qemu-guest-agent) of scripts/build-rootfs.sh.
ROOTFS_DIR = Path(os.environ.get("INFZ_ROOTFS_DIR", "/var/cache/infinization/rootfs"))
ROOTFS_FILES = ("rootfs.qcow2", "vmlinuz", "initrd.img")
REPORT_RE = re.compile(r"INFZ-REPORT seq=(\d+) disks=(\S*) nics=(\S*) mem_kb=(\d+) cpus=(\d+)(?: cds=(\S*))?"
                       r"(?: ping=(\S*))?(?: ips=(\S*))?"
                       r"(?: efi=(\d) sb=(\S+) tpm=(\d) rng=(\S+) cidata=(\S+))?(?: ro=(\S*) uuid=(\S+))?"
                       r"(?: ports=(\S*))?(?: pci=(\S*))?(?: boot=(\S+))?(?: ekcert=(\S+))?")


@dataclass(frozen=True)
class Report:
    seq: int
    disks: dict[str, int]
    nics: dict[str, tuple[str, str]]
    mem_kb: int
    cpus: int
    cds: dict[str, str]
    ping: dict[str, str] = field(default_factory=dict)  # target -> "ok" | "fail" (only with infz.ping=)
    ips: dict[str, list[str]] = field(default_factory=dict)  # iface -> ["10.77.0.2/24", ...] (IPv4, no lo)
    efi: bool = False  # the guest booted through UEFI
    secure_boot: bool | None = None  # UEFI's SecureBoot variable; None: not UEFI or not readable
    tpm: bool = False  # /sys/class/tpm/tpm0 exists
    rng: str | None = None  # the hardware RNG in use (virtio_rng.0...), None: none
    cidata: tuple[str, str] | None = None  # a NoCloud seed's (instance-id, sha256 of user-data)
    read_only: tuple[str, ...] = ()  # block devices whose /sys/block/X/ro is 1
    uuid: str | None = None  # /sys/class/dmi/id/product_uuid (the SMBIOS system UUID)
    ports: tuple[str, ...] = ()  # names of the virtio-serial ports (/sys/class/virtio-ports/*/name)
    pci: tuple[str, ...] = ()  # display, audio and USB controllers on PCI: "class:vendor:device"
    boot: str | None = None  # the kernel command line's infz.boot= (a boot loader's "cd" / "disk" marker)
    ek_cert: bool | None = None  # the TPM's RSA EK certificate NV index exists (None: no TPM, or not reported)


def parse_report(line: str) -> Report | None:
    match = REPORT_RE.search(line)
    if not match:
        return None
    (seq, disks, nics, mem, cpus, cds, ping, ips, efi, sb, tpm, rng, cidata, ro, uuid, ports, pci, boot,
     ekcert) = match.groups()
    disk_map = {n: int(s) for n, s in (item.split(":") for item in disks.split(",") if item)}
    nic_map = {}
    for item in filter(None, nics.split(",")):
        ifname, rest = item.split("@", 1)
        mac, state = rest.rsplit(":", 1)
        nic_map[ifname] = (mac, state)
    cd_map = dict(item.split(":", 1) for item in (cds or "").split(",") if item)
    ping_map = dict(item.rsplit(":", 1) for item in (ping or "").split(",") if item)
    ip_map: dict[str, list[str]] = {}
    for item in filter(None, (ips or "").split(",")):
        ifname, addr = item.split(":", 1)
        ip_map.setdefault(ifname, []).append(addr)
    seed = tuple(cidata.rsplit(":", 1)) if cidata and cidata != "-" else None
    return Report(int(seq), disk_map, nic_map, int(mem), int(cpus), cd_map, ping_map, ip_map,
                  efi=efi == "1", secure_boot=None if sb in (None, "-") else sb == "1", tpm=tpm == "1",
                  rng=None if rng in (None, "-") else rng, cidata=seed,  # type: ignore[arg-type]
                  read_only=tuple(filter(None, (ro or "").split(","))), uuid=None if uuid in (None, "-") else uuid,
                  ports=tuple(filter(None, (ports or "").split(","))), pci=tuple(filter(None, (pci or "").split(","))),
                  boot=None if boot in (None, "-") else boot, ek_cert=None if ekcert in (None, "-") else ekcert == "1")


def vm_manifest(name: str, *, disks: str = "", run_strategy: str = "Always", extra: str = "",
                mac: str | None = None, cores: int = 1, memory: str = "256Mi") -> str:
    nic_mac = f", mac: \"{mac}\"" if mac else ""
    return f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  runStrategy: {run_strategy}
  machine: {{type: q35, accel: tcg}}
  cpu: {{cores: {cores}}}
  memory: {{size: {memory}}}
  terminationGracePeriodSeconds: 15
  boot:
    kernel: {GUEST_DIR}/vmlinuz
    initrd: {GUEST_DIR}/initrd.img
    cmdline: "console=ttyS0 panic=-1"
  disks:
{disks or "    - {name: root, size: 64Mi}"}
  networks:
    - {{name: nat, type: user{nic_mac}}}
{extra}"""


class Host:
    """One isolated reconciler installation: a state dir and a manifest dir under a short /tmp path."""

    def __init__(self, base: Path, netns: str | None = None) -> None:
        self.base = base
        # Like /var/lib under a real state directory: QEMU's unprivileged user must be able to traverse the
        # folders above the state directory to reach its own run directory (mkdtemp makes this one 0700).
        base.chmod(0o711)
        self.netns = netns
        self.state = base / "st"
        self.manifests = base / "m"
        self.manifests.mkdir(parents=True, exist_ok=True)
        # This host's policy: images, ISOs and kernels may come from its temp dir and the test guest's dir
        # (the temp dir holds the state dir too, which the policy still refuses).
        self.config = base / "config.yaml"
        self.config.write_text(f"storageRoots: [{base}, {GUEST_DIR}]\nportForwardRange: 10000-20000\n")

    @property
    def table(self) -> str:
        """The name of this installation's nftables tables (one per state directory)."""
        return firewall_table(str(self.state.resolve()))

    def delete_firewall(self) -> None:
        """Delete this installation's nftables tables, if any are left (the state directory goes too)."""
        for family in ("bridge", "ip", "inet"):
            subprocess.run([*self._prefix(), "nft", "delete", "table", family, self.table], capture_output=True,
                           check=False)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, INFINIZATION_STATE_DIR=str(self.state), INFINIZATION_CONFIG=str(self.config),
                   NO_COLOR="1", COLUMNS="200")
        env.update(extra)
        return env

    def _prefix(self) -> list[str]:
        """Run inside this host's network namespace, when it has one."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def cli(self, *args: str, check: bool = False, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self._prefix(), sys.executable, "-m", "reconciler", *args], capture_output=True,
                              text=True, env=env or self.env(), timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"infinization {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def start_sync(self, *extra: str, log_name: str = "sync.log") -> subprocess.Popen[bytes]:
        """Start `infinization sync` on this host's manifests in the background (stop it with stop_sync)."""
        with open(self.base / log_name, "ab") as log:  # the child keeps its own copy of the fd
            return subprocess.Popen([*self._prefix(), sys.executable, "-m", "reconciler", "sync", str(self.manifests),
                                     "--metrics-address", "none", "--resync-interval", "5", *extra],
                                    env=self.env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    @staticmethod
    def stop_sync(process: subprocess.Popen[bytes]) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=30)

    def stored_status(self, vm: str) -> VMStatus | None:
        """The VM's row in the status store, read as `infinization status` does (None: no store or no row)."""
        store = open_readonly(self.state / "infinization.db")
        if store is None:
            return None
        try:
            return store.statuses().get(vm)
        finally:
            store.close()

    def events(self, vm: str | None = None) -> list[dict[str, object]]:
        args = ["events", "--json", "--limit", "500"] + ([vm] if vm else [])
        done = self.cli(*args)
        return json.loads(done.stdout)["events"] if done.returncode == 0 else []

    def wait_for(self, predicate: Callable[[], object], what: str, timeout: float = 60) -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def apply(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("apply", str(self.manifests), "--yes", *extra, check=check)

    def plan_exit(self) -> int:
        return self.cli("plan", str(self.manifests), "--detailed-exitcode").returncode

    def write(self, filename: str, text: str) -> Path:
        path = self.manifests / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def pidfile(self, vm: str) -> Path:
        return self.state / "vms" / vm / "run" / "qemu.pid"

    def disk(self, vm: str, disk: str) -> Path:
        return self.state / "disks" / vm / f"{disk}.qcow2"

    def running_pid(self, vm: str) -> int | None:
        """The VM's QEMU once it is fully started: the pidfile's PID, alive, and the only one for this VM
        (while a launch is under way, a short-lived process can have the same command line)."""
        try:
            pid = int(self.pidfile(vm).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if self.qemu_pids(vm) == [pid] else None

    def qemu_pids(self, vm: str) -> list[int]:
        """Every live process whose cmdline names this VM's pidfile (whatever any pidfile says)."""
        needle = str(self.pidfile(vm)).encode()
        return live_processes(lambda cmdline: needle in cmdline.split(b"\0"))

    def guest(self, vm: str) -> Guest:
        return Guest(self.state / "vms" / vm / "run" / "serial.log")

    def kill_all(self) -> None:
        """Test clean-up: SIGKILL every process started for this host (QEMU, dnsmasq, a sync daemon):
        whatever names this host's folder on its command line."""
        for pid in self.leftover_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def leftover_processes(self) -> list[int]:
        """Live (not zombie) processes that still name this host's folder."""
        needle = str(self.base).encode()
        return live_processes(lambda cmdline: needle in cmdline)


def live_processes(match: Callable[[bytes], bool]) -> list[int]:
    """PIDs of live (not zombie) processes, other than this one, whose raw /proc cmdline ``match``es."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if match(cmdline) and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


class Guest:
    def __init__(self, serial: Path) -> None:
        self.serial = serial

    def _lines(self) -> list[str]:
        """Complete lines only: a line the guest is still writing (no newline yet) is left for the next read
        (a report cut after ``ips=eth`` once failed to parse)."""
        try:
            text = self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return text[:text.rfind("\n") + 1].splitlines()

    def boots(self) -> int:
        """How many times the guest has booted (the serial log is appended across restarts)."""
        return sum(1 for line in self._lines() if "INFZ-BOOTED" in line)

    def reports(self, boot: int | None = None) -> list[Report]:
        """Report lines, only from the ``boot``-th boot (1-based) when given."""
        seen, found = 0, []
        for line in self._lines():
            if "INFZ-BOOTED" in line:
                seen += 1
            elif (report := parse_report(line)) is not None and (boot is None or seen == boot):
                found.append(report)
        return found

    def wait_report(self, predicate: Callable[[Report], bool], timeout: float = 60, after_seq: int = -1,
                    what: str = "", boot: int | None = None) -> Report:
        """The newest report that satisfies ``predicate`` (polling the serial log until ``timeout``);
        with ``boot``, only reports of that boot count."""
        deadline = time.monotonic() + timeout
        while True:
            reports = self.reports(boot)
            # A restart appends a new boot whose seq starts again at 1: only the last boot counts.
            latest = reports[-1] if reports else None
            if latest is not None and latest.seq > after_seq and predicate(latest):
                return latest
            if time.monotonic() > deadline:
                raise AssertionError(f"guest never reported {what or 'the expected state'}; last: {latest}")
            time.sleep(0.1)


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def in_netns(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=check)
