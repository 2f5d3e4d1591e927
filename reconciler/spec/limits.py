"""The limits QEMU 7.2 and qemu-img enforce, checked when a manifest is validated, so a value that passes
``validate`` never fails half-way through an apply.

Pure functions and constants, used by the spec models' validators (what holds on any host) and by the
planner (what depends on the host: its memory, through ``ObservedState.host_memory``). Each limit was
measured on this project's QEMU (Debian 7.2, TCG and the q35/pc machines; see docs/architecture.md,
"Errors"):

- vCPUs: QEMU refuses an x86 topology whose highest APIC ID is 255 or more without a KVM irqchip with
  the X2APIC API *and* an interrupt-remapping IOMMU ("current -smp configuration requires kernel irqchip
  and X2APIC API support"); we configure neither, so 255 APIC IDs is the limit on both machines (pc's
  own maximum is 255 vCPUs, q35's 288). APIC IDs are packed per topology level to a power of two, so
  ``sockets: 3, cores: 65`` (195 vCPUs) already needs APIC ID 320.
- Memory: with TCG's default CPU (40 physical address bits, AMD vendor) the highest guest-physical
  address in use must stay below the AMD HyperTransport hole at 1012 GiB, or QEMU relocates the memory
  above 4 GiB to 1 TiB and then fails ("phys-bits too low (40)"). In use: 4 GiB, the RAM above it, the
  hot-plug area (maxSize - size, plus 1 GiB a DIMM slot) and the 32 GiB 64-bit PCI hole.
- Disks: a qcow2 image with 64 KiB clusters (what we create) holds at most 2 PiB (its L1 table is
  capped at 32 MiB); every QEMU size is a signed 64-bit number.
- I/O throttling: each value at most 1e15 (``THROTTLE_VALUE_MAX``, util/throttle.c).
- PCI slots: q35's pcie.0 and pc's pci.0 each have 30 free slots (slot 0 is the host bridge; q35's 31 is
  the ICH9 LPC/SATA, pc's 1 the PIIX3). Every virtio disk and NIC takes one (on q35 through its own root
  port), as do the spare hot-plug ports, the virtio-scsi controller, and the balloon, RNG and serial
  controller when present.
- SCSI: the virtio-scsi controller addresses targets 0-255: CD-ROMs and scsi disks share them.
"""

from __future__ import annotations

GiB = 1024**3
QCOW2_MAX_SIZE = 2 * 1024**5  # 2 PiB with 64 KiB clusters
THROTTLE_VALUE_MAX = 10**15
MAX_APIC_ID = 254  # the highest APIC ID without x2APIC: IDs 0-254 (255 is the broadcast ID)
AMD_HT_START = 1012 * GiB  # 0xFD00000000: the HyperTransport hole below 1 TiB
PCI_HOLE64 = 32 * GiB
FOUR_GIB = 4 * GiB
PCI_SLOTS = 30
SCSI_TARGETS = 256


def _bits(count: int) -> int:
    """Bits for ``count`` IDs at one topology level (QEMU's apicid_bitwidth_for_count)."""
    return (count - 1).bit_length()


def highest_apic_id(sockets: int, cores: int, threads: int) -> int:
    """The APIC ID of the last vCPU of a sockets x cores x threads topology (QEMU's packing, dies = 1)."""
    thread_bits, core_bits = _bits(threads), _bits(cores)
    return ((sockets - 1) << (core_bits + thread_bits)) | ((cores - 1) << thread_bits) | (threads - 1)


def cpu_problem(sockets: int, max_cores: int, threads: int) -> str | None:
    """Why QEMU would refuse this vCPU topology (``max_cores``: cores sized for maxCpus), or None."""
    apic = highest_apic_id(sockets, max_cores, threads)
    if apic > MAX_APIC_ID:
        return (f"{sockets * max_cores * threads} vCPUs in {sockets} socket(s) x {max_cores} core(s) x {threads} "
                f"thread(s) need APIC ID {apic}; QEMU allows at most {MAX_APIC_ID} without x2APIC and an "
                "interrupt-remapping IOMMU (255 vCPUs at most, fewer when a level is not a power of two)")
    return None


def highest_memory_address(size: int, max_size: int | None, slots: int) -> int:
    """An upper bound of the highest guest-physical address QEMU lays out (see the module's docstring)."""
    above = -(-size // GiB) * GiB  # all of it counted above 4 GiB: a bound, never below QEMU's own figure
    hotplug = (max_size - size + slots * GiB) if max_size is not None and max_size > size else 0
    return FOUR_GIB + above + hotplug + PCI_HOLE64


def memory_problem(size: int, max_size: int | None, slots: int) -> str | None:
    top = highest_memory_address(size, max_size, slots)
    if top > AMD_HT_START:
        return (f"memory size {size // GiB}Gi" + (f" with maxSize {max_size // GiB}Gi and {slots} slots"
                                                      if max_size is not None and max_size > size else "")
                + f" lays guest memory out up to {top // GiB}Gi; QEMU's x86 machines allow up to "
                f"{AMD_HT_START // GiB}Gi with 40 physical address bits")
    return None


def pci_slots_used(virtio_disks: int, nics: int, hotplug_slots: int, *, balloon: bool, rng: bool,
                   serial: bool) -> int:
    """The slots of the root bus a VM's argv takes (the virtio-scsi controller is always there)."""
    return virtio_disks + nics + hotplug_slots + 1 + balloon + rng + serial
