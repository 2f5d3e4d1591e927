"""Prometheus metrics of the sync daemon, served on a local address."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
RECONCILE_SECONDS = Histogram("infinization_reconcile_duration_seconds", "Duration of one reconcile",
                              ["resource"], registry=REGISTRY,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ACTIONS = Counter("infinization_actions_total", "Steps executed, by kind and result", ["kind", "result"],
                  registry=REGISTRY)
DRIFT = Counter("infinization_drift_detected_total", "Reconciles that found work to do without a manifest change",
                ["resource"], registry=REGISTRY)
VMS = Gauge("infinization_vms", "VMs by phase", ["phase"], registry=REGISTRY)
MANIFEST_ERRORS = Gauge("infinization_manifest_errors", "Errors in the manifests right now", registry=REGISTRY)


def serve(address: str) -> None:
    """Start the HTTP endpoint (``HOST:PORT``) in a background thread."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
