"""Each command imports only what it uses (issue 13: start-up), checked on ``sys.modules``, not on a clock.

Every case runs the real CLI (``reconciler.cli.main``) in a fresh interpreter, which then lists the modules
it imported. ``--version`` must not load the layers or their libraries at all; ``validate`` reads manifests
only (no state directory, planner, observers, QMP, asyncio, netlink, live display or sync daemon); ``plan``
and ``status`` must not load what only ``apply``, ``plan --json`` or the sync daemon use. The timings are
in ``bench`` (``python -m bench --only startup``) and docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs `main(argv)` and writes the exit code and every imported module to the file named by argv[0].
_PROBE = """
import json, sys
from reconciler.cli import main
out, argv = sys.argv[1], sys.argv[2:]
try:
    code = main(argv)
except SystemExit as exc:
    code = exc.code
built = [name for module in ("reconciler.plan.steps", "reconciler.plan.actions") if module in sys.modules
         for name, value in vars(sys.modules[module]).items()
         if isinstance(value, type) and value.__dict__.get("__pydantic_complete__")]
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules), "built": sorted(built)}, f)
"""

# What no command but `sync` and `apply` needs (the executor, netlink, the daemon's logging and watchers).
_ONLY_APPLY_OR_SYNC = ("reconciler.apply.executor", "reconciler.runtime.daemon", "pyroute2", "structlog",
                       "asyncinotify", "prometheus_client", "pycdlib")


def _run(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "modules.json"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "INFINIZATION_STATE_DIR": str(tmp_path / "state"),
           "INFINIZATION_CONFIG": str(tmp_path / "config.yaml"), "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(out), *argv], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(out.read_text())
    assert found["code"] in (0, None), done.stderr
    return found


def _imported(tmp_path: Path, *argv: str) -> set[str]:
    return set(_run(tmp_path, *argv)["modules"])


def _loaded(modules: set[str], *prefixes: str) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "vm.yaml").write_text(_VM)
    (tmp_path / "config.yaml").write_text(f"storageRoots: [{tmp_path}]\n")
    return directory


_VM = """\
apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {name: imports}
spec:
  runStrategy: Halted
  memory: {size: 256Mi}
  disks:
    - {name: root, size: 64Mi}
"""


def test_version_imports_argparse_and_nothing_of_the_layers(tmp_path: Path) -> None:
    modules = _imported(tmp_path, "--version")

    assert "reconciler.cli.parser" in modules  # the probe ran the real entry point
    ours = _loaded(modules, "reconciler")
    assert ours == ["reconciler", "reconciler.cli", "reconciler.cli.parser", "reconciler.errors"], ours
    assert _loaded(modules, "pydantic", "pydantic_core", "rich", "yaml", "asyncio", "qemu") == []


def test_validate_imports_the_spec_layer_only(tmp_path: Path, manifests: Path) -> None:
    modules = _imported(tmp_path, "validate", str(manifests))

    assert "reconciler.spec.models" in modules  # it did validate
    assert _loaded(modules, "reconciler.state", "reconciler.plan", "reconciler.observe", "reconciler.apply",
                   "reconciler.adapters", "reconciler.qemu", "reconciler.runtime", "reconciler.hostnet") == []
    assert _loaded(modules, "asyncio", "qemu", "rich.live", "sqlite3", *_ONLY_APPLY_OR_SYNC) == []


def test_plan_without_json_builds_no_published_document(tmp_path: Path, manifests: Path) -> None:
    modules = _imported(tmp_path, "plan", str(manifests))

    assert "reconciler.plan.planner" in modules
    assert _loaded(modules, "reconciler.plan.document", "reconciler.apply", "reconciler.cli.recording",
                   "reconciler.runtime.store", *_ONLY_APPLY_OR_SYNC) == []


def test_plan_builds_the_schemas_of_the_step_kinds_it_uses_only(tmp_path: Path, manifests: Path) -> None:
    found = _run(tmp_path, "plan", str(manifests))

    # The plan creates the VM: its record and disk steps are built, not the 42 kinds, nor Change's schema
    # (which holds them all): the planner's changes are not validated again (Change.planned).
    assert "WriteRecord" in found["built"]
    assert "Change" not in found["built"] and "Plan" not in found["built"], found["built"]
    assert len(found["built"]) < 10, found["built"]


def test_status_reads_the_store_without_the_daemons_logging(tmp_path: Path, manifests: Path) -> None:
    modules = _imported(tmp_path, "status", str(manifests))

    assert "reconciler.runtime.store" in modules  # it read the daemon's conditions
    assert _loaded(modules, "reconciler.plan.document", "reconciler.apply", "pygments",
                   *_ONLY_APPLY_OR_SYNC) == []


def test_the_sync_daemon_imports_no_interactive_display_nor_all_of_pyroute2() -> None:
    """The daemon keeps every module it imports for as long as it runs (issue 13: its memory): its entry
    (the parser, the ``sync`` handler, the daemon, its listeners and the netlink client it uses) loads no
    live display, no recording of interactive runs, and of pyroute2 only rtnetlink (``adapters.rtnl``)."""
    probe = """
import json, sys
from reconciler.cli.parser import build_parser, handler
args = build_parser().parse_args(["sync", "."])
handler(args.func)
import reconciler.runtime.listeners
from reconciler.adapters import rtnl
rtnl.iproute()
print(json.dumps(sorted(sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout))
    assert "reconciler.runtime.daemon" in modules and "pyroute2.iproute.linux" in modules
    assert _loaded(modules, "reconciler.cli.commands", "reconciler.cli.progress", "reconciler.cli.recording",
                   "rich.live", "pyroute2.ndb", "pyroute2.ipdb", "pyroute2.nftables", "pyroute2.ipvs") == []
