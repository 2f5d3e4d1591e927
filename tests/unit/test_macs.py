"""Default MACs: 40 bits of a hash under 5a, collisions resolved deterministically, assigned ones kept."""

from __future__ import annotations

import itertools
import random

from reconciler.spec.loader import load_text
from reconciler.spec.macs import legacy_mac, resolve
from reconciler.spec.models import VirtualMachine, default_mac

# Two real collisions of the 40-bit hash (found by a birthday search over vm-N/nat).
CLASH = ("vm-233575", "vm-909201")


def vm(name: str, *nics: str, mac: str | None = None) -> VirtualMachine:
    entries = ", ".join(f"{{name: {nic}, type: user" + (f", mac: '{mac}'" if mac else "") + "}" for nic in nics)
    text = (f"apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n"
            f"spec: {{networks: [{entries}]}}\n")
    objects, errors = load_text(text, "f.yaml")
    assert not errors, errors
    obj = objects[0][0]
    assert isinstance(obj, VirtualMachine)
    return obj


def macs_of(vms: dict[str, VirtualMachine]) -> dict[tuple[str, str], str]:
    return {(name, nic.name): str(nic.mac) for name, v in vms.items() for nic in v.spec.networks}


def test_the_hash_keeps_40_bits_under_a_locally_administered_unicast_prefix() -> None:
    mac = default_mac("web", "nat")
    first = int(mac[:2], 16)
    assert first & 0b10 and not first & 0b01, "locally administered, unicast"
    assert mac[3:] == ":".join(f"{b:02x}" for b in __import__("hashlib").sha256(b"web/nat").digest()[:5])


def test_10000_vms_get_distinct_macs_where_24_bits_collided() -> None:
    names = [f"vm-{i}" for i in range(10_000)]
    legacy = [legacy_mac(name, "nat") for name in names]
    assert len(set(legacy)) < len(legacy), "the old 24-bit scheme collides at this size (the issue's 4)"
    base = vm("vm-0", "nat")  # one loaded manifest, renamed: the names are what the addresses derive from
    desired = {name: base.model_copy(update={"metadata": base.metadata.model_copy(update={"name": name})})
               for name in names}
    resolved, _ = resolve(desired, {})
    macs = macs_of(resolved)
    assert len(set(macs.values())) == 10_000
    assert all(mac == default_mac(name, nic) for (name, nic), mac in macs.items()), "no collision: no bump"


def test_a_real_collision_is_resolved_the_same_way_whatever_the_order() -> None:
    a, b = CLASH
    assert default_mac(a, "nat") == default_mac(b, "nat")
    forward, _ = resolve({a: vm(a, "nat"), b: vm(b, "nat")}, {})
    backward, _ = resolve({b: vm(b, "nat"), a: vm(a, "nat")}, {})
    assert macs_of(forward) == macs_of(backward)
    assert macs_of(forward)[(a, "nat")] == default_mac(a, "nat")  # the first by name keeps the first try
    assert macs_of(forward)[(b, "nat")] == default_mac(b, "nat", 1)


def test_an_assigned_mac_stays_when_a_vm_that_would_win_arrives_later() -> None:
    a, b = CLASH
    first, _ = resolve({b: vm(b, "nat")}, {})  # b alone: it gets the hash's address, and records it
    assert macs_of(first)[(b, "nat")] == default_mac(b, "nat")
    later, _ = resolve({a: vm(a, "nat"), b: vm(b, "nat")}, {b: first[b]})
    assert macs_of(later)[(b, "nat")] == default_mac(b, "nat"), "b keeps its address"
    assert macs_of(later)[(a, "nat")] == default_mac(a, "nat", 1), "a, new, is the one that moves"


def test_vms_recorded_without_a_mac_keep_the_address_they_were_started_with() -> None:
    old = vm("web", "nat")  # a record written before this scheme: no mac, started with the 52:54:00 one
    desired, recorded = resolve({"web": vm("web", "nat", "lan")}, {"web": old})
    assert macs_of(recorded) == {("web", "nat"): legacy_mac("web", "nat")}
    assert macs_of(desired) == {("web", "nat"): legacy_mac("web", "nat"), ("web", "lan"): default_mac("web", "lan")}


def test_explicit_macs_are_never_taken_by_derived_ones() -> None:
    explicit = default_mac("web", "nat")
    desired, _ = resolve({"web": vm("web", "nat"), "pinned": vm("pinned", "nat", mac=explicit)}, {})
    assert macs_of(desired)[("pinned", "nat")] == explicit
    assert macs_of(desired)[("web", "nat")] == default_mac("web", "nat", 1)


def test_resolution_is_a_function_of_the_names_only() -> None:
    names = [f"n{i}" for i in range(50)]
    results = set()
    for seed in range(5):
        shuffled = names[:]
        random.Random(seed).shuffle(shuffled)
        resolved, _ = resolve({name: vm(name, "a", "b") for name in shuffled}, {})
        results.add(tuple(sorted(macs_of(resolved).items())))
    assert len(results) == 1
    assert len(set(itertools.chain.from_iterable(dict(r).values() for r in results))) == 100
