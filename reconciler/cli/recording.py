"""The CLI's own actions in the status store, like the sync daemon's: ``apply``, ``start`` and ``stop``.

Without it, ``infinization stop web`` left the store (and the PostgreSQL mirror a platform's backend reads)
saying Running until a daemon next reconciled. After a run, each step becomes an event and each VM the run
touched gets its row from what is observed afterwards, by the daemon's own rules (``runtime.status``). The
mirror is used when ``$INFINIZATION_DATABASE_URL`` names one, as for ``sync``. Called by ``cli.plan_apply``
and ``cli.commands``.
"""

from __future__ import annotations

import os
import time

from reconciler.apply.executor import ApplyResult
from reconciler.cli.common import View
from reconciler.runtime import status
from reconciler.runtime.store import Store
from reconciler.state.layout import StateLayout

DATABASE_ENV = "INFINIZATION_DATABASE_URL"


def record_run(layout: StateLayout, host: str | None, result: ApplyResult, before: View, after: View,
               revision: str | None = None) -> None:
    """Write the run's events and the rows of the VMs it touched, as observed ``after`` it."""
    vms = {c.name for c in before.plan.changes if c.resource == "VirtualMachine"}
    touched = {r.step.name for r in result.results} & vms
    store = Store(layout.database, host=host, database_url=os.environ.get(DATABASE_ENV) or None)
    try:
        for done in result.results:
            store.event(done.step.name, done.step.kind.value, "ok" if done.ok else "failed",
                        f"{done.step.summary}: {done.detail}", round(done.seconds * 1000, 1))
        for name in sorted(touched):
            change = after.plan.change(name)
            vm = after.observed.vm(name)
            if status.gone(name in after.manifests.vms, change, vm):
                store.forget(name)
                continue
            outcome = status.Outcome(failure=result.failed_vms.get(name), revision=revision)
            store.set_status(status.vm_status(name, change, vm, outcome, time.time()))
    finally:
        store.close()
