"""``spec.cpu.placement``: which host CPUs a VM's threads may run on, and host CPU lists (``"0-3,6"``).

Pure: the model and the CPU-list syntax the kernel uses (``cpuset.cpus``, ``Cpus_allowed_list``,
``/sys/devices/system/cpu/online``). Used by ``spec.models`` (the manifest), the observer (which parses what
the kernel reports), the planner (``plan/placement.py``) and the executor (which writes cpuset files).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_CPU = 4095  # the kernel's NR_CPUS on common distribution kernels is at most 8192; 4096 bounds the work


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0-3,6"`` -> {0, 1, 2, 3, 6}. :raise ValueError: On anything else (ranges must go up)."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return frozenset()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"{text!r}: expected a CPU list like '2-5' or '0,2,4-7'")
        first, last = int(low), int(high) if sep else int(low)
        if first > last or last > MAX_CPU:
            raise ValueError(f"{text!r}: the range {part.strip()!r} is backwards or beyond CPU {MAX_CPU}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int] | list[int]) -> str:
    """{0, 1, 2, 3, 6} -> ``"0-3,6"`` (the canonical form: a no-op plan stays empty whatever was written)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = prev = None
    for cpu in [*ordered, None]:
        if start is not None and (cpu is None or cpu != prev + 1):  # type: ignore[operator]
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if cpu is not None and start is None:
            start = cpu
        prev = cpu
    return ",".join(parts)


def _canonical(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return value
    cpus = parse_cpu_list(value)
    if not cpus:
        raise ValueError("a CPU list cannot be empty")
    return format_cpu_list(cpus)


CpuList = Annotated[str, BeforeValidator(_canonical)]


class CpuPlacement(BaseModel):
    """Where the VM's QEMU threads run. With ``cpuSet`` the vCPU threads run on those CPUs (each on its own one
    with ``vcpuPins``); without it the ``strategy`` chooses one host CPU per vCPU, recorded so the choice stays."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpuSet: CpuList | None = Field(default=None, description="Host CPUs for the vCPU threads, e.g. '2-5'.")
    vcpuPins: dict[Annotated[int, Field(ge=0, le=1023)], Annotated[int, Field(ge=0, le=MAX_CPU)]] = Field(
        default_factory=dict, description="One host CPU per vCPU (vCPU index -> host CPU), inside cpuSet.")
    emulatorCpuSet: CpuList | None = Field(
        default=None, description="Host CPUs for QEMU's other threads (main loop, I/O). Default: the vCPUs' CPUs.")
    strategy: Literal["basic", "spread"] = Field(
        default="basic", description="Without cpuSet: basic takes free CPUs in order, NUMA node by node; spread "
        "takes free CPUs in an order seeded by the VM's name and seed.")
    seed: Annotated[int, Field(ge=0, le=2**31)] = Field(default=0, description="The spread strategy's seed.")
    shareCpus: bool = Field(default=False, description="Let the strategy choose CPUs other pinned VMs use.")

    @model_validator(mode="after")
    def _pins_fit(self) -> CpuPlacement:
        if self.vcpuPins and self.cpuSet is None:
            raise ValueError("vcpuPins needs cpuSet (the strategy pins every vCPU to a CPU of its own)")
        if self.cpuSet is not None:
            allowed = parse_cpu_list(self.cpuSet)
            outside = sorted(cpu for cpu in self.vcpuPins.values() if cpu not in allowed)
            if outside:
                raise ValueError(f"vcpuPins: host CPU(s) {format_cpu_list(outside)} are not in cpuSet {self.cpuSet}")
        return self

    @property
    def cpus(self) -> frozenset[int] | None:
        return parse_cpu_list(self.cpuSet) if self.cpuSet is not None else None
