"""Property tests (hypothesis): whatever a manifest holds, the loader, the planner and the argv builder
never crash; valid manifests give argv in which every QEMU option value is validated.

Generated: manifests near the model (valid ones and ones with huge numbers, odd unicode, the injection
characters ``,`` ``=`` and newline, wrong types), raw edits of their YAML text (inserted junk, cut text),
and deep nesting. The properties:

- ``load_text`` never raises: every problem is a located ``ManifestError`` (the file's, nobody else's);
- the planner, on every valid VM, raises nothing but an ``InfinizationError`` (a refusal is data);
- ``build_argv`` on every valid VM raises nothing but ``UnsafeValue``, and what it returns has no control
  character anywhere, valid JSON for every ``-device``/``-blockdev``/``-object``, and ``key=value`` parts
  without a stray ``,`` or ``=`` in every other option string (no value became an option).

How many examples: ``INFZ_FUZZ_EXAMPLES`` (default 200 each, a few seconds; the nightly-style run sets
e.g. 5000, and ``INFZ_FUZZ_DB=DIR`` to keep failing examples). A failure prints the example and
hypothesis' ``@reproduce_failure`` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from reconciler.errors import InfinizationError, UnsafeValue
from reconciler.plan.observed import ObservedState
from reconciler.plan.planner import plan
from reconciler.qemu.argv import build_argv
from reconciler.spec import loader
from reconciler.spec.host import HostConfig
from reconciler.spec.loader import MAX_DEPTH, load_text
from reconciler.spec.models import VirtualMachine
from reconciler.state.layout import StateLayout

EXAMPLES = int(os.environ.get("INFZ_FUZZ_EXAMPLES", "200"))
# INFZ_FUZZ_DB=DIR keeps failing examples across runs (a nightly job's cache); print_blob prints the
# @reproduce_failure line of a failure so it can be replayed from the log alone.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                database=DirectoryBasedExampleDatabase(os.environ["INFZ_FUZZ_DB"]) if os.environ.get("INFZ_FUZZ_DB")
                else None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CASES = Path(__file__).parent / "plan_cases"
OBSERVED = ObservedState.model_validate(yaml.safe_load((CASES / "create_new_vm" / "observed.yaml").read_text()))
HOST = HostConfig.model_validate(yaml.safe_load((CASES / "host.yaml").read_text()))
LAYOUT = StateLayout(Path("/st"))

INJECTION = st.sampled_from([",", "=", "\n", ",id=x", "a,b=c", "\x00", "\x1b[31m", "../..", "\u202e", "'", '"',
                             "${x}", "$(id)", ";rm", "é", "日本", "\ud7ff", "\U0001f600", " ", ""])
ODD_TEXT = st.one_of(st.text(max_size=30), INJECTION, st.lists(INJECTION, max_size=4).map("".join))
NAME = st.one_of(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), ODD_TEXT)
BIG = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, 2**31, 2**63 - 1, 2**63,
                                                                                   10**15, 10**15 + 1]))
UNIT = st.sampled_from(["", "K", "Ki", "M", "Mi", "MiB", "G", "Gi", "T", "Ti", "P", "Pi", "B", "X"])
SIZE = st.one_of(BIG, st.tuples(st.integers(0, 10**6), UNIT).map(lambda t: f"{t[0]}{t[1]}"), ODD_TEXT,
                 st.floats(allow_nan=True))
PATH = st.one_of(st.sampled_from(["/srv/guest/vmlinuz", "/srv/guest/initrd.img", "/srv/images/base.qcow2",
                                  "/etc/shadow", "/st/disks/x", "relative", "/srv/guest/../../etc"]),
                 ODD_TEXT.map(lambda t: "/srv/guest/" + t))
ANY_SCALAR = st.one_of(st.none(), st.booleans(), BIG, ODD_TEXT, st.floats())


def _optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


DISK = st.fixed_dictionaries({"name": NAME}, optional={
    "size": SIZE, "image": PATH, "iops": BIG, "bps": SIZE, "deletePolicy": st.sampled_from(["Retain", "Delete", "x"]),
    "bus": st.sampled_from(["virtio", "scsi", "sata", "ide"]), "readOnly": st.booleans(),
    "cache": st.sampled_from(["none", "writeback", "unsafe", "bogus"]),
    "imageFormat": st.sampled_from(["qcow2", "raw"]),
})
NIC = st.fixed_dictionaries({"name": NAME}, optional={
    "type": st.sampled_from(["user", "bridge", "tap"]), "mac": st.one_of(ODD_TEXT, st.from_regex(
        r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", fullmatch=True)), "bridge": NAME, "queues": BIG,
    "portForwards": st.lists(st.fixed_dictionaries({"host": BIG, "guest": BIG}, optional={
        "protocol": st.sampled_from(["tcp", "udp", "sctp"]), "hostAddress": ODD_TEXT}), max_size=2),
    "ips": st.lists(ODD_TEXT, max_size=2), "link": st.sampled_from(["up", "down", "sideways"]),
})
SPEC = _optional(
    runStrategy=st.sampled_from(["Always", "Halted", "Manual", "RerunOnFailure", "Sometimes"]),
    machine=_optional(type=st.sampled_from(["q35", "pc", "virt"]),
                      accel=st.sampled_from(["tcg", "kvm", ["kvm", "tcg"]])),
    cpu=_optional(sockets=BIG, cores=BIG, threads=BIG, maxCpus=BIG, model=ODD_TEXT),
    memory=_optional(size=SIZE, maxSize=SIZE, slots=BIG, balloon=st.booleans()),
    boot=_optional(kernel=PATH, initrd=PATH, cmdline=ODD_TEXT),
    disks=st.lists(DISK, max_size=4),
    networks=st.lists(NIC, max_size=3),
    cdroms=st.lists(st.fixed_dictionaries({"name": NAME}, optional={"image": PATH, "bootOnce": st.booleans()}),
                    max_size=2),
    hotplugSlots=BIG, terminationGracePeriodSeconds=BIG,
    channels=st.lists(st.fixed_dictionaries({"name": ODD_TEXT}), max_size=2),
)
MANIFEST = st.fixed_dictionaries({
    "apiVersion": st.sampled_from(["infinization.io/v1alpha1", "v1"]),
    "kind": st.sampled_from(["VirtualMachine", "VirtualMachine", "Network", "Pod"]),
    "metadata": st.fixed_dictionaries({"name": NAME}, optional={"labels": st.dictionaries(ODD_TEXT, ANY_SCALAR,
                                                                                        max_size=3)}),
    "spec": SPEC,
})


@st.composite
def documents(draw: st.DrawFn) -> str:
    """YAML text: a generated manifest, sometimes nested deep somewhere, sometimes edited as raw text."""
    doc = draw(MANIFEST)
    if draw(st.booleans()):
        depth = draw(st.integers(1, 3 * MAX_DEPTH))
        value: Any = draw(ANY_SCALAR)
        for _ in range(depth):
            value = [value] if draw(st.booleans()) else {"k": value}
        doc["spec"][draw(st.sampled_from(["memory", "cpu", "boot", "disks", "extra"]))] = value
    text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), width=10**6)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 20))
        junk = draw(st.one_of(ODD_TEXT, st.sampled_from(
            ["[" * 200, "{" * 200, "&a [*a]", "- ", ": ", "\t", "!!python/object:os.system", "*x"])))
        text = text[:at] + junk + text[at + cut:]
    return text


def _vms(text: str) -> list[VirtualMachine]:
    objects, errors = load_text(text, "fuzz.yaml")
    for error in errors:
        assert error.file == "fuzz.yaml" and error.line >= 1 and error.col >= 1 and error.message
    return [obj for obj, _ in objects if isinstance(obj, VirtualMachine)]


KV_PART = re.compile(r"^[a-z0-9-]+=[^,=]*$")
KV_FLAGS = {"-machine", "-accel", "-smp", "-m", "-netdev", "-chardev", "-add-fd", "-name", "-action", "-global",
            "-mon", "-serial", "-sandbox", "-run-with", "-runas", "-uuid"}
JSON_FLAGS = {"-device", "-blockdev", "-object"}


def _check_argv(argv: list[str]) -> None:
    for index, arg in enumerate(argv):
        assert not re.search(r"[\x00-\x1f\x7f]", arg), f"control character in {arg!r}"
        flag = argv[index - 1] if index else ""
        if flag in JSON_FLAGS:
            assert isinstance(json.loads(arg), dict)
        elif flag in KV_FLAGS:
            head, *parts = arg.split(",")
            assert "=" not in head or KV_PART.match(head), f"{flag} {arg!r}"
            assert all(KV_PART.match(part) for part in parts), f"{flag} {arg!r}: a value became an option"


@FUZZ
@given(documents())
def test_the_loader_never_crashes(text: str) -> None:
    _vms(text)


@FUZZ
@given(documents())
def test_the_planner_and_the_argv_builder_never_crash_on_what_the_loader_accepts(text: str) -> None:
    for vm in _vms(text):
        with contextlib.suppress(InfinizationError):  # a refusal is data; anything else is a crash
            plan({vm.name: vm}, OBSERVED, {}, manifest_dir="/m", host=HOST)
        try:
            argv = build_argv(vm.name, vm.spec, LAYOUT.vm(vm.name))
        except UnsafeValue:
            continue
        _check_argv(argv)


# JSON text (YAML 1.2 reads it as it is): PyYAML's emitter follows YAML 1.1 and leaves strings such as "0e0"
# unquoted, which the YAML 1.2 loader rightly reads as numbers.
VALID_VM = st.builds(
    lambda name, cores, mem, disks, cmdline: json.dumps({
        "apiVersion": "infinization.io/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": name},
        "spec": {"cpu": {"cores": cores}, "memory": {"size": mem},
                 "boot": {"kernel": "/srv/guest/vmlinuz", "cmdline": cmdline},
                 "disks": [{"name": f"d{i}", "size": size} for i, size in enumerate(disks)],
                 "networks": [{"name": "nat", "type": "user"}]}}),
    st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), st.integers(1, 64),
    st.sampled_from(["16Mi", "512Mi", "1Gi", "64Gi"]), st.lists(st.sampled_from(["1Gi", "2Pi", "512"]), max_size=5),
    st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=40))


@FUZZ
@given(VALID_VM)
def test_valid_manifests_plan_and_build_argv(text: str) -> None:
    """A valid VM is planned (a refusal only for the host's RAM) and its argv passes every check."""
    vms = _vms(text)
    assert len(vms) == 1, load_text(text, "fuzz.yaml")[1]
    vm = vms[0]
    result = plan({vm.name: vm}, OBSERVED.model_copy(update={"host_memory": 2**40}), {}, manifest_dir="/m", host=HOST)
    change = result.change(vm.name)
    assert change is not None and not change.refusals and change.steps
    _check_argv(build_argv(vm.name, vm.spec, LAYOUT.vm(vm.name)))


def _tree(node: yaml.Node | None) -> Any:
    """A composed node as what the loader uses of it (tag, value, mark), to compare two loaders."""
    if node is None:
        return None
    mark = (node.start_mark.line, node.start_mark.column)
    if isinstance(node, yaml.MappingNode):
        return (node.tag, mark, [(_tree(key), _tree(value)) for key, value in node.value])
    if isinstance(node, yaml.SequenceNode):
        return (node.tag, mark, [_tree(item) for item in node.value])
    return (node.tag, mark, node.value)


@pytest.mark.skipif(loader._FAST is None, reason="PyYAML without libyaml: only the pure loader exists")
@FUZZ
@given(st.one_of(documents(), VALID_VM))
def test_libyaml_reads_a_manifest_as_the_pure_loader_does(text: str) -> None:
    """Where both read a text, libyaml's composition is the pure-Python loader's (tags, values and marks), so
    that which one PyYAML was built with never changes a manifest's meaning or its errors' locations. Each
    refuses texts the other reads: libyaml JSON's surrogate-pair escapes (the loader then falls back to the
    pure one, ``_documents``), PyYAML a tab inside a plain scalar (valid YAML 1.2, which libyaml reads): a
    host without libyaml refuses such a file, with a located error, and never reads it otherwise."""
    assert loader._FAST is not None
    try:
        fast = [_tree(node) for node in loader._compose(loader._FAST, text)]
        pure = [_tree(node) for node in loader._compose(loader._StrictLoader, text)]
    except yaml.YAMLError:
        return
    assert fast == pure


def test_a_text_libyaml_refuses_is_read_by_the_pure_loader() -> None:
    """JSON's surrogate-pair escape: libyaml refuses it, PyYAML reads it; the manifest still loads."""
    text = ('{"apiVersion": "infinization.io/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "a"}, '
            '"spec": {"memory": {"size": "16Mi"}, "boot": {"kernel": "/srv/guest/vmlinuz", '
            '"cmdline": "x\\ud800\\udc00"}}}')
    objects, errors = load_text(text, "f.yaml")
    assert not errors and len(objects) == 1
