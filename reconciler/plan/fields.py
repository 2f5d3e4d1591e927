"""The one table that says, for every spec field, how a change to it reaches a VM.

The planner looks fields up here to decide between a live change, a restart and a refusal; the plan
shows the ``how`` next to each change; ``docs/fields.md`` is generated from ``TABLE`` (see
``render_markdown``) so users read the same truth. Paths use ``*`` for a disk or NIC name.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.plan.actions import Mode


@dataclass(frozen=True)
class FieldRule:
    pattern: tuple[str, ...]
    mode: Mode
    how: str
    note: str = ""


TABLE: tuple[FieldRule, ...] = (
    FieldRule(("runStrategy",), Mode.LIVE, "start or stop the VM", "Always starts it, Halted stops it gracefully."),
    FieldRule(("paused",), Mode.LIVE, "QMP stop / cont on the running QEMU",
              "Live: pausing only stops the vCPUs, so the guest keeps its memory, devices and boot, and resumes "
              "where it was. A VM started while paused gets -S (no guest code runs until resumed), so a restart "
              "comes back paused. A VM paused or resumed by hand is drift, repaired. A VM QEMU paused by itself "
              "(io-error: a disk write failed, e.g. the host's disk is full; guest-panicked; internal-error; "
              "watchdog) is never resumed: the plan refuses and says why. A stop of a paused VM resumes it "
              "first so the guest sees the power button. Halted: nothing runs to pause."),
    FieldRule(("restartPolicy",), Mode.LIVE, "recorded", "Manual: restarts wait for --allow-restart."),
    FieldRule(("terminationGracePeriodSeconds",), Mode.LIVE, "recorded", "Used by the next graceful stop."),
    FieldRule(("hotplugSlots",), Mode.RESTART, "spare PCIe root ports are created when QEMU starts"),
    FieldRule(("machine", "type"), Mode.RESTART, "machine type is fixed when QEMU starts"),
    FieldRule(("machine", "accel"), Mode.RESTART, "accelerator is chosen when QEMU starts"),
    FieldRule(("cpu",), Mode.RESTART, "vCPU topology and model are fixed when QEMU starts"),
    FieldRule(("cpu", "cores"), Mode.LIVE, "device_add vCPUs",
              "Up to cpu.maxCpus. Fewer vCPUs need a restart (QEMU 7.2 refuses vCPU unplug)."),
    FieldRule(("cpu", "maxCpus"), Mode.RESTART, "vCPU slots are declared when QEMU starts"),
    FieldRule(("cpu", "placement"), Mode.LIVE, "threads re-pinned (sched_setaffinity) and the cpuset cgroup rewritten",
              "vCPU threads (ids from query-cpus-fast) to cpuSet or vcpuPins, the others to emulatorCpuSet; QEMU in "
              "infinization.slice/vm-NAME-HASH.scope with cpuset.cpus and cpuset.mems (NUMA nodes of those CPUs). "
              "Without cpuSet a strategy (basic, spread) picks one free CPU per vCPU, recorded and kept; it never "
              "takes another pinned VM's CPUs unless shareCpus. A thread moved by hand is drift, repaired. No "
              "cpuset controller (and cpusetCgroup: required) or CPUs offline: refused at plan time."),
    FieldRule(("memory",), Mode.RESTART, "memory layout is fixed when QEMU starts"),
    FieldRule(("memory", "size"), Mode.LIVE, "pc-dimm hot-plug up; balloon down",
              "Up to memory.maxSize by DIMMs; down only with memory.balloon: true; else a restart."),
    FieldRule(("memory", "hugepages"), Mode.RESTART, "the memory backend is created when QEMU starts",
              "memory-backend-file on a private hugetlbfs (hugepagesDir, QEMU's user's), prealloc=on; DIMMs added "
              "live are backed the same way. Too few free hugepages of that size: refused at plan time."),
    FieldRule(("memory", "hugepageSize"), Mode.RESTART, "the memory backend is created when QEMU starts"),
    FieldRule(("boot",), Mode.RESTART, "kernel, initrd and cmdline are read when the VM boots"),
    FieldRule(("firmware",), Mode.RESTART, "OVMF (pflash0, pflash1) is set when QEMU starts",
              "uefi: OVMF from the host's firmwareDirs (none: refused at plan, naming the package `ovmf`); "
              "the VM's variable store is copied once from its template and kept across restarts."),
    FieldRule(("firmware", "secureBoot"), Mode.RESTART, "Secure Boot OVMF code with SMM, and a variable store "
              "from the matching template (boot entries reset), set when QEMU starts",
              "The keys live in the VM's variable store, so a toggle replaces the store from the new template "
              "(Microsoft's keys, Secure Boot enabled; or none) while QEMU is stopped: the old store is kept "
              "beside it as efivars.fd.<UTC time>.bak and the guest's boot entries are reset (the plan says "
              "so)."),
    FieldRule(("bootOrder",), Mode.RESTART, "bootindex is set on the devices when QEMU starts",
              "Default: the disks in order. Neither boot.kernel nor a disk or a CD-ROM with a medium in it: "
              "starting the VM is refused."),
    FieldRule(("disks", "*"), Mode.LIVE, "hot-plug: blockdev-add + device_add on a spare slot",
              "Removal: device_del, wait for DEVICE_DELETED, then blockdev-del; the file is kept."),
    FieldRule(("disks", "*", "size"), Mode.LIVE, "block_resize (running) or qemu-img resize (stopped)",
              "Grow only: a smaller size is refused, never applied."),
    FieldRule(("disks", "*", "image"), Mode.REFUSED, "a disk's backing image cannot change",
              "Give the disk a new name to create it from another image."),
    FieldRule(("disks", "*", "imageFormat"), Mode.REFUSED, "a disk's backing image cannot change"),
    FieldRule(("disks", "*", "deletePolicy"), Mode.LIVE, "recorded", "Read when the VM is deleted."),
    FieldRule(("disks", "*", "iops"), Mode.LIVE, "block_set_io_throttle"),
    FieldRule(("disks", "*", "bps"), Mode.LIVE, "block_set_io_throttle"),
    FieldRule(("disks", "*", "bus"), Mode.RESTART, "a disk's controller is chosen when it is plugged",
              "scsi disks hot-plug onto the virtio-scsi controller (no spare slot); q35's AHCI cannot hot-plug, "
              "so a sata disk added to or removed from a running VM is a restart."),
    FieldRule(("disks", "*", "cache"), Mode.RESTART, "the cache mode is set when the disk is plugged"),
    FieldRule(("disks", "*", "discard"), Mode.RESTART, "discard is set when the disk is plugged"),
    FieldRule(("disks", "*", "readOnly"), Mode.RESTART, "read-only is set when the disk is plugged"),
    FieldRule(("disks", "*", "preallocation"), Mode.LIVE, "recorded",
              "Used when the disk file is created (qemu-img create -o preallocation=); an existing disk keeps "
              "its allocation."),
    FieldRule(("networks", "*"), Mode.LIVE, "hot-plug: netdev_add + device_add on a spare slot",
              "Removal: device_del, wait for DEVICE_DELETED, then netdev_del."),
    FieldRule(("networks", "*", "mac"), Mode.RESTART, "a NIC's MAC is set when it is plugged"),
    FieldRule(("networks", "*", "portForwards"), Mode.RESTART, "user-mode port forwards are set when QEMU starts"),
    FieldRule(("networks", "*", "link"), Mode.LIVE, "set_link"),
    FieldRule(("networks", "*", "type"), Mode.RESTART, "a NIC's backend (user or TAP) is set when it is plugged"),
    FieldRule(("networks", "*", "queues"), Mode.RESTART, "multiqueue is set when the NIC is plugged"),
    FieldRule(("networks", "*", "network"), Mode.LIVE, "the TAP is moved to the other bridge (netlink)"),
    FieldRule(("networks", "*", "bridge"), Mode.LIVE, "the TAP is moved to the other bridge (netlink)"),
    FieldRule(("networks", "*", "firewall"), Mode.LIVE, "nftables: the ruleset is replaced atomically",
              "Rule-level diffs in the plan; rules flushed by hand come back."),
    FieldRule(("networks", "*", "ips"), Mode.LIVE, "nftables anti-spoofing rules"),
    FieldRule(("networks", "*", "ipv6"), Mode.LIVE, "nftables anti-spoofing rules",
              "With ips: IPv6 frames pass only with an IPv6 address in ips or ipv6: true."),
    FieldRule(("networks", "*", "model"), Mode.RESTART, "a NIC's device model is set when it is plugged"),
    FieldRule(("networks", "*", "restrict"), Mode.RESTART, "user-mode options are set when the NIC is plugged"),
    FieldRule(("cdroms", "*"), Mode.LIVE, "device_add scsi-cd on the virtio-scsi controller"),
    FieldRule(("cdroms", "*", "image"), Mode.LIVE, "open tray, remove medium, insert medium, close tray"),
    FieldRule(("channels", "*"), Mode.RESTART, "virtio-serial ports are created when QEMU starts",
              "Each a virtserialport named as given, on a unix socket QEMU listens on (vms/NAME/run/ch-KEY.sock, "
              "in status --json); adding or removing one restarts the VM (no virtserialport hot-plug)."),
    FieldRule(("guestAgent",), Mode.RESTART, "the agent's virtio-serial port is created when QEMU starts",
              "Port org.qemu.guest_agent.0 on vms/NAME/run/qga.sock: status asks the agent (short deadline) for "
              "the guest's IPs and OS, and a stop asks it to shut down before the ACPI power button."),
    FieldRule(("rng",), Mode.RESTART, "the virtio RNG is created when QEMU starts"),
    FieldRule(("cdroms", "*", "bootOnce"), Mode.LIVE, "recorded",
              "Read at a start: until the install from this medium ends, the VM boots from it (bootindex 1) and "
              "its first reboot ends QEMU (-action reboot=shutdown); the record says the install began."),
    FieldRule(("cdroms", "*", "ejectAfterInstall"), Mode.LIVE, "recorded",
              "When the install ends (the guest's first power-off or reboot), the record says so and the drive "
              "stays empty; the plan shows it as a finish-install step, not as drift."),
    FieldRule(("cloudInit",), Mode.LIVE, "seed ISO rebuilt; the cidata medium is changed live",
              "Takes effect on the next boot; cloud-init runs it only for a new instance-id (from the VM name "
              "and the user-data). Plans, logs and status show a hash, never the user-data."),
    FieldRule(("metadata", "labels"), Mode.LIVE, "recorded"),
    FieldRule(("display",), Mode.RESTART, "the VNC/SPICE server and its video device are set up when QEMU starts",
              "vnc: virtio-vga; spice: qxl-vga and (spice.agent) the vdagent port com.redhat.spice.0. port auto: "
              "a free port of the host's displayPortRange, kept for the VM (display.json) and never given to "
              "two VMs; a fixed port another VM or process holds is refused at plan time. Beyond loopback "
              "without a passwordFile: refused."),
    FieldRule(("display", "passwordFile"), Mode.LIVE, "set_password over QMP (a changed file: "
              "\"display password rotated\", no restart)",
              "Read by the reconciler only (under the host's secretDirs, root's, not group/world-readable), never "
              "on QEMU's command line, in plans, logs or status; the plan compares a keyed hash. Adding or "
              "removing a password is a restart (QEMU starts locked: VNC password=on, SPICE ticketing). VNC: "
              "at most 8 characters."),
    FieldRule(("display", "passwordExpiresAfter"), Mode.LIVE, "expire_password over QMP (set again with the "
              "password)"),
    FieldRule(("input",), Mode.RESTART, "the USB tablet is plugged when QEMU starts",
              "Default: on with a display (an absolute pointer, so the cursor follows the viewer's)."),
    FieldRule(("audio",), Mode.RESTART, "the sound card and its audio backend are created when QEMU starts",
              "ich9-intel-hda + hda-duplex; its sound goes through SPICE's playback channel or VNC's audio "
              "extension (-vnc audiodev=). Needs a display."),
    FieldRule(("hostDevices", "*"), Mode.LIVE,
              "taken for the VM (PCI: its IOMMU group bound to vfio-pci), then device_add: usb-host on the xHCI "
              "controller, vfio-pci on a spare root port",
              "Checked at plan time (exists, IOMMU on, every IOMMU group member bindable and in the host's "
              "pciPassthrough/usbPassthrough, held by no other VM). USB is live once the VM has its xHCI "
              "controller (started with a USB device), else a restart; PCI needs a spare slot (hotplugSlots), else "
              "a restart. Removal: device_del, wait for DEVICE_DELETED, then the group goes back to its drivers."),
    FieldRule(("hostDevices", "*", "pci"), Mode.RESTART, "a host device is chosen when it is plugged",
              "Changing the address unplugs nothing live: a restart gives the old group back and takes the new one."),
    FieldRule(("hostDevices", "*", "usb"), Mode.RESTART, "a host device is chosen when it is plugged"),
    FieldRule(("hostDevices", "*", "romFile"), Mode.RESTART, "the option ROM is loaded when the device is plugged"),
    FieldRule(("hostDevices", "*", "multifunction"), Mode.RESTART,
              "multifunction is set when the device is plugged"),
    FieldRule(("tpm",), Mode.RESTART,
              "swtpm and tpm-crb are attached when QEMU starts; turned off, the TPM state is kept",
              "Its state (tpm/NAME/) is manufactured once by swtpm_setup (EK and platform certificates from the "
              "installation's local CA, NVRAM locked), survives restarts, and is deleted only with the VM, when all "
              "its disks have deletePolicy: Delete."),
)


def rule_for(path: tuple[str, ...]) -> FieldRule:
    """The most specific rule whose pattern is a prefix of ``path`` (``*`` matches any name)."""
    best: FieldRule | None = None
    for rule in TABLE:
        if len(rule.pattern) > len(path):
            continue
        if all(want in ("*", got) for want, got in zip(rule.pattern, path, strict=False)) and (
            best is None or len(rule.pattern) > len(best.pattern)
        ):
            best = rule
    if best is None:
        # A field nobody classified is treated as needing a restart: never silently ignored.
        return FieldRule(path, Mode.RESTART, "not live-updatable")
    return best


def render_markdown() -> str:
    lines = [
        "| field | change | how | note |",
        "|---|---|---|---|",
    ]
    for rule in TABLE:
        path = ".".join("<name>" if part == "*" else part for part in rule.pattern)
        lines.append(f"| `{path}` | {rule.mode.value} | {rule.how} | {rule.note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - regenerates docs/fields.md's table
    print(render_markdown(), end="")
