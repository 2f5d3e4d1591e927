"""Every example (and the bundled manifests/) loads cleanly and plans a create on an empty host."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.plan.actions import Action
from reconciler.plan.observed import ObservedImage, ObservedPath, ObservedState
from reconciler.plan.planner import plan
from reconciler.plan.policy import manifest_paths
from reconciler.spec.host import HostConfig
from reconciler.spec.loader import load_directory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir())
DIRS = [*(p for p in EXAMPLES if any(p.glob("*.yaml"))), ROOT / "manifests"]


@pytest.mark.parametrize("directory", DIRS, ids=lambda p: p.name)
def test_example_is_valid_and_plans_a_create(directory: Path) -> None:
    manifests = load_directory(directory)
    assert manifests.errors == []
    assert manifests.vms, f"{directory} holds no VirtualMachine"
    desired = {name: loaded.vm for name, loaded in manifests.vms.items()}
    images = {
        disk.image: ObservedImage(path=disk.image, exists=True, virtual_size=1024**3, format="qcow2")
        for vm in desired.values() for disk in vm.spec.disks if disk.image
    }
    # The host as the defaults describe it: the storage roots exist and every path the examples name is a
    # regular file in them (the host policy judges these facts).
    facts = {path: ObservedPath(path=path, resolved=path, kind="file")
             for vm in desired.values() for _, path in manifest_paths(vm.spec)}
    facts |= {root: ObservedPath(path=root, resolved=root, kind="directory") for root in HostConfig().storageRoots}
    networks = {name: loaded.network for name, loaded in manifests.networks.items()}
    result = plan(desired, ObservedState(state_dir="/st", images=images, paths=facts), {}, networks=networks)
    assert not result.refused
    assert {c.name: c.action for c in result.changes if c.resource == "VirtualMachine"} == dict.fromkeys(
        desired, Action.CREATE)
    assert {c.name: c.action for c in result.changes if c.resource == "Network"} == dict.fromkeys(
        networks, Action.CREATE)


def test_examples_are_numbered_and_listed() -> None:
    index = (ROOT / "examples" / "README.md").read_text()
    for directory in EXAMPLES:
        assert directory.name[:3].rstrip("-").isdigit()
        assert f"| {directory.name} |" in index
