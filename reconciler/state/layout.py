"""Where every file under the state directory lives (path arithmetic only; nothing is read or written here).

    STATE/lock                         the run lock (flock): apply, or a running sync daemon
    STATE/daemon.lock                  one sync daemon per state directory
    STATE/infinization.db              the status store (SQLite): VM status rows and events
    STATE/source.json                  the manifest directory last applied (``status`` uses it by default)
    STATE/vms/NAME/record.json         last-applied record: the spec we applied and the disks we created
    STATE/vms/NAME/launch.json         the spec and argv the current QEMU was started with
    STATE/vms/NAME/exit.json           how its last QEMU ended (guest-shutdown, crash, stopped by us...)
    STATE/vms/NAME/restarts.json       the sync daemon's restarts after failures (crash-loop history)
    STATE/vms/NAME/live.json           what QMP cannot report back (link state, balloon target, unplugs)
    STATE/vms/NAME/display.json        the display's port (kept across restarts) and a keyed hash of the password
                                       set on the running QEMU (never the password)
    STATE/display.key                  the host's random key for those hashes (root's 0600)
    STATE/vms/NAME/cidata-HASH.iso     the cloud-init NoCloud seed (root's 0600; QEMU gets an fd)
    STATE/vms/NAME/qemu.log            QEMU's stderr (root's; QEMU writes to the fd it inherits)
    STATE/vms/NAME/run/                QEMU's own directory (owned by its user, 0700):
    STATE/vms/NAME/run/qemu.pid          QEMU's pidfile
    STATE/vms/NAME/run/qmp.sock          QMP monitor for short-lived clients (CLI, executor)
    STATE/vms/NAME/run/events.sock       a second QMP monitor, kept free for a long-lived event listener
    STATE/vms/NAME/run/serial.log        the guest's serial console
    STATE/vms/NAME/run/kernel, initrd    QEMU's private copies of the boot files (-kernel takes no fd)
    STATE/vms/NAME/run/qga.sock          the guest agent's socket (QEMU listens; guestAgent.enabled)
    STATE/vms/NAME/run/ch-KEY.sock       a channel's socket (QEMU listens; KEY: naming.channel_key of its name)
    STATE/vms/NAME/swtpm.json          argv, user, pid and start time of the VM's swtpm (its identity)
    STATE/vms/NAME/swtpm.log           swtpm's stderr (root's)
    STATE/vms/NAME/run/swtpm.sock        swtpm's control socket (QEMU connects to it); run/swtpm.pid its pidfile
    STATE/tpm/NAME/                    the VM's TPM state (QEMU's user's, 0700): outside vms/NAME, so it outlives
                                       a forgotten VM unless all its disks had deletePolicy: Delete
    STATE/disks/NAME/DISK.qcow2        disk images: outside the VM folder, so forgetting a VM keeps them
    STATE/disks/NAME/efivars.fd        a UEFI VM's variables (copied once from OVMF's template), QEMU's user's 0600
    STATE/networks/NAME.json           a Network we created (its bridge is ours to repair and delete)
    STATE/networks/NAME.dnsmasq.pid    its DHCP server (dnsmasq), and NAME.leases, the leases it gave

Our own files are read and written only through ``reconciler.state.files`` (a test checks it); QEMU and
dnsmasq write their pidfiles, sockets, logs and leases themselves. Disk and VM names are validated by the
spec models, so every path here stays inside STATE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import UnsafeValue
from reconciler.state import paths

DEFAULT_STATE_DIR = "/var/lib/infinization"
STATE_DIR_ENV = "INFINIZATION_STATE_DIR"
UNIX_PATH_MAX = 107


def state_dir_from_env(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).absolute()


@dataclass(frozen=True)
class StateLayout:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def display_key(self) -> Path:
        """The host's key for display password hashes (a record must not leak a short password's hash)."""
        return self.root / "display.key"

    @property
    def daemon_lock(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def source(self) -> Path:
        return self.root / "source.json"

    @property
    def database(self) -> Path:
        return self.root / "infinization.db"

    @property
    def host_devices(self) -> Path:
        """hostdevs.json: host PCI/USB devices we took for VMs, and what to give back."""
        return self.root / "hostdevs.json"

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    @property
    def disks(self) -> Path:
        return self.root / "disks"

    @property
    def networks(self) -> Path:
        return self.root / "networks"

    def network_record(self, name: str) -> Path:
        return self.networks / f"{name}.json"

    def dhcp_pidfile(self, name: str) -> Path:
        return Path(paths.dhcp_pidfile(str(self.root), name))

    def dhcp_leases(self, name: str) -> Path:
        return Path(paths.dhcp_leases(str(self.root), name))

    @property
    def tpm(self) -> Path:
        return self.root / "tpm"

    def vm(self, name: str) -> VMPaths:
        return VMPaths(self.vms / name, self.disks / name, self.root)


@dataclass(frozen=True)
class VMPaths:
    dir: Path
    disk_dir: Path
    root: Path

    @property
    def record(self) -> Path:
        return self.dir / "record.json"

    @property
    def launch(self) -> Path:
        return self.dir / "launch.json"

    @property
    def exit(self) -> Path:
        return self.dir / "exit.json"

    @property
    def restarts(self) -> Path:
        """When the sync daemon restarted the VM after failures (its crash-loop history)."""
        return self.dir / "restarts.json"

    @property
    def live(self) -> Path:
        return self.dir / "live.json"

    @property
    def display(self) -> Path:
        """The display's port and the keyed hash of the password set on the running QEMU."""
        return self.dir / "display.json"

    @property
    def qemu_log(self) -> Path:
        """QEMU's stderr: root's file, QEMU only holds an fd to it (a start error is read from here)."""
        return self.dir / "qemu.log"

    @property
    def run(self) -> Path:
        """QEMU's own directory: the only place under the state directory its user may write."""
        return self.dir / "run"

    @property
    def pidfile(self) -> Path:
        return self.run / "qemu.pid"

    @property
    def qmp(self) -> Path:
        return self.run / "qmp.sock"

    @property
    def events(self) -> Path:
        return self.run / "events.sock"

    @property
    def serial(self) -> Path:
        return self.run / "serial.log"

    def boot_copy(self, what: str) -> Path:
        """QEMU's private copy of the kernel or initrd (``what``): QEMU 7.2's -kernel opens a path, not an fd."""
        return self.run / what

    @property
    def tpm_state(self) -> Path:
        """The TPM's state (swtpm's --tpmstate dir): outside the VM's folder, so forgetting the VM keeps it."""
        return Path(paths.tpm_state(str(self.root), self.dir.name))

    @property
    def tpm_launch(self) -> Path:
        return self.dir / "swtpm.json"

    @property
    def tpm_log(self) -> Path:
        return self.dir / "swtpm.log"

    @property
    def tpm_socket(self) -> Path:
        return self.run / "swtpm.sock"

    @property
    def tpm_pidfile(self) -> Path:
        return self.run / "swtpm.pid"

    @property
    def agent_socket(self) -> Path:
        """The guest agent's virtio-serial port on the host: a unix socket QEMU listens on."""
        return self.run / "qga.sock"

    def channel_socket(self, key: str) -> Path:
        """A channel's unix socket (QEMU listens on it; the host platform connects). ``key``: the channel's
        ``naming.channel_key`` (short and safe whatever the channel's name)."""
        return self.run / f"ch-{key}.sock"

    @property
    def efi_vars(self) -> Path:
        """The VM's UEFI variable store (pflash1), beside its disks: kept when the VM is forgotten."""
        return Path(paths.efi_vars(str(self.root), self.dir.name))

    def disk(self, disk_name: str) -> Path:
        return Path(paths.disk_file(str(self.root), self.dir.name, disk_name))

    def seed(self, digest: str) -> Path:
        """The cloud-init seed ISO whose content hashes to ``digest``."""
        return Path(paths.seed_file(str(self.root), self.dir.name, digest))

    def check(self) -> None:
        """Refuse paths QEMU cannot use: sockets longer than a sun_path, or option separators."""
        for path in (self.qmp, self.events, self.tpm_socket, self.agent_socket, self.channel_socket("0" * 10)):
            if len(os.fsencode(path)) > UNIX_PATH_MAX:
                raise UnsafeValue(
                    f"socket path {path} is longer than {UNIX_PATH_MAX} bytes; use a shorter --state-dir"
                )
        for path in (self.dir, self.disk_dir):
            if "," in str(path) or "=" in str(path):
                raise UnsafeValue(f"state path {path} must not contain ',' or '='")
