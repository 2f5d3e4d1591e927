"""Prometheus metrics of the sync daemon, served on a local address (``sync --metrics-address``).

Each metric means what its help says, and ``promtool check metrics`` accepts the exposition (a test runs
it). The reconcile loop (``runtime.reconcile``) updates them: durations, steps by kind and result, drift
(``Change.drifted``, the plan's one definition), manifest errors, and each VM's phase and readiness as last
reported to the status store; the PostgreSQL status mirror (``runtime.pgmirror``) sets its own series,
``infinization_status_mirror_*``, when there is one. Process metrics (CPU, memory, file descriptors) and a
build-info series come with the registry. ``parse_address`` and ``serve`` turn every bad
``--metrics-address`` into one clear error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import platform
from typing import NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from reconciler import __version__
from reconciler.errors import ConfigInvalid

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
BUILD = Info("infinization_build", "The running Infinization's version", registry=REGISTRY)
BUILD.info({"version": __version__, "python": platform.python_version()})
RECONCILE_SECONDS = Histogram("infinization_reconcile_duration_seconds", "Duration of one reconcile",
                              ["resource"], registry=REGISTRY,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ACTIONS = Counter("infinization_actions_total", "Steps executed, by kind and result", ["kind", "result"],
                  registry=REGISTRY)
DRIFT = Counter("infinization_drift_detected", "Resources found changed outside the reconciler (their "
                "manifest unchanged) and repaired, counted once per reconcile that repairs them", ["resource"],
                registry=REGISTRY)
VMS = Gauge("infinization_vms", "VMs by phase, as last reported to the status store", ["phase"],
            registry=REGISTRY)
VM_READY = Gauge("infinization_vm_ready", "1 when the VM matches its manifest and its last reconcile did not fail",
                 ["vm"], registry=REGISTRY)
MANIFEST_ERRORS = Gauge("infinization_manifest_errors", "Errors in the manifests right now", registry=REGISTRY)


class MirrorMetrics(NamedTuple):
    up: Gauge
    pending: Gauge
    dropped: Counter
    last_success: Gauge


@functools.cache
def status_mirror() -> MirrorMetrics:
    """The PostgreSQL status mirror's series, registered by the first mirror (``runtime.pgmirror``): a
    daemon without ``--database`` shows none, rather than a mirror forever "down"."""
    return MirrorMetrics(
        Gauge("infinization_status_mirror_up", "1 while PostgreSQL takes the status mirror's writes, 0 while it "
              "is unreachable or refuses them (statuses are kept and sent when it answers)", registry=REGISTRY),
        Gauge("infinization_status_mirror_pending", "Writes waiting for PostgreSQL: events, and at most one "
              "status per VM", registry=REGISTRY),
        Counter("infinization_status_mirror_dropped_events", "Events not mirrored because too many were "
                "waiting (the local store keeps them)", registry=REGISTRY),
        Gauge("infinization_status_mirror_last_success_timestamp_seconds", "When PostgreSQL last took the "
              "mirror's writes (or answered its probe)", registry=REGISTRY),
    )

_PHASES = ("Running", "Stopped", "Paused", "Unknown")
_phase_of: dict[str, str] = {}
_ready_of: dict[str, bool] = {}


def vm_reported(name: str, phase: str, ready: bool) -> None:
    """The VM's row was written: keep the phase counts and its readiness in step with the store."""
    _phase_of[name] = phase
    _ready_of[name] = ready
    VM_READY.labels(name).set(1 if ready else 0)
    _count_phases()


def vm_forgotten(name: str) -> None:
    """The VM is no longer ours to report (deleted): its series go."""
    _phase_of.pop(name, None)
    _ready_of.pop(name, None)
    with contextlib.suppress(KeyError):  # a VM never reported has no series
        VM_READY.remove(name)
    _count_phases()


def summary() -> tuple[dict[str, int], int]:
    """VMs by phase, and how many are not Ready, as last reported (the service's STATUS= line)."""
    counts: dict[str, int] = {}
    for phase in _phase_of.values():
        counts[phase] = counts.get(phase, 0) + 1
    return counts, sum(1 for ready in _ready_of.values() if not ready)


def _count_phases() -> None:
    for phase in sorted(set(_PHASES) | set(_phase_of.values())):
        VMS.labels(phase).set(sum(1 for p in _phase_of.values() if p == phase))


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); anything else is a ConfigInvalid naming the form."""
    form = "expected HOST:PORT, [IPV6]:PORT or 'none'"
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigInvalid(f"--metrics-address {address!r}: {form} (a port from 1 to 65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigInvalid(f"--metrics-address {address!r}: {host!r} is not an IPv6 address") from exc
    elif ":" in host:
        raise ConfigInvalid(f"--metrics-address {address!r}: {form} (put an IPv6 address in brackets)")
    return host or "127.0.0.1", int(port)


def serve(address: str) -> None:
    """Start the HTTP endpoint in a background thread; a taken port or an address not on this host is a
    ConfigInvalid (one line), never a traceback."""
    host, port = parse_address(address)
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ConfigInvalid(f"cannot serve metrics on {address}: {why} (choose another --metrics-address, "
                            "or 'none')") from exc
