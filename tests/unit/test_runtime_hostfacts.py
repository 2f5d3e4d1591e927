"""The daemon's host facts: kept only while both event sources follow the host, read again after any event,
during-read event, key change, age or resync. The reads themselves are replaced by a counter (what is under
test is only when they happen); the real reads are covered by the e2e chaos tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from reconciler.plan.observed import ObservedHostNetwork
from reconciler.runtime import hostfacts
from reconciler.runtime.hostfacts import CachedHostFacts


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    done: list[int] = []

    async def fake(names: set[str], state_dir: Path) -> ObservedHostNetwork:
        done.append(1)
        return ObservedHostNetwork(table=f"t{len(done)}")

    monkeypatch.setattr(hostfacts, "observe_links_and_firewall", fake)
    return done


def look(facts: CachedHostFacts, links: frozenset[str] = frozenset({"br0"})) -> str:
    return asyncio.run(facts.network(set(links), {}, Path("/tmp"), None)).table


def test_nothing_is_kept_until_both_watchers_listen(reads: list[int]) -> None:
    facts = CachedHostFacts(max_age=60)
    look(facts)
    look(facts)
    facts.watcher_up("netlink")
    look(facts)
    look(facts)
    assert len(reads) == 4
    facts.watcher_up("nft")
    assert look(facts) == "t5" and look(facts) == "t5", "both listen: the second look reuses the first"
    facts.watcher_down("nft")
    assert look(facts) == "t6" and look(facts) == "t7"


def test_any_event_key_change_age_or_resync_reads_again(reads: list[int]) -> None:
    facts = CachedHostFacts(max_age=60)
    facts.watcher_up("netlink")
    facts.watcher_up("nft")
    assert look(facts) == "t1"
    facts.changed()
    assert look(facts) == "t2" and look(facts) == "t2"
    assert look(facts, frozenset({"br0", "tap1"})) == "t3", "other links asked for"
    facts.forget()
    assert look(facts, frozenset({"br0", "tap1"})) == "t4"
    facts.max_age = 0.0
    assert look(facts, frozenset({"br0", "tap1"})) == "t5"


def test_an_event_during_a_read_makes_the_next_look_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    facts = CachedHostFacts(max_age=60)
    facts.watcher_up("netlink")
    facts.watcher_up("nft")
    tables: list[str] = []

    async def racing(names: set[str], state_dir: Path) -> ObservedHostNetwork:
        tables.append(f"t{len(tables) + 1}")
        if len(tables) == 1:
            facts.changed()  # a netlink message lands while the first read runs
        return ObservedHostNetwork(table=tables[-1])

    monkeypatch.setattr(hostfacts, "observe_links_and_firewall", racing)
    assert look(facts) == "t1"
    assert look(facts) == "t2", "what the first read saw may predate the event"
    assert look(facts) == "t2"


def test_only_messages_about_kept_links_drop_them(reads: list[int]) -> None:
    facts = CachedHostFacts(max_age=60)
    facts.watcher_up("netlink")
    facts.watcher_up("nft")
    assert look(facts) == "t1"
    facts.links_changed({"docker0", "veth12"})
    assert look(facts) == "t1", "another program's interfaces leave what is kept alone"
    facts.links_changed({"br0"})
    assert look(facts) == "t2"
    facts.links_changed(None)
    assert look(facts) == "t3", "an interface of unknown name may be ours"


class _Message(dict):  # type: ignore[type-arg]
    """The two things touched_links reads of a pyroute2 message: its fields and its attributes."""

    def __init__(self, event: str, index: int, **attrs: str) -> None:
        super().__init__(event=event, index=index)
        self.attrs = attrs

    def get_attr(self, name: str) -> str | None:
        return self.attrs.get(name)


def test_touched_links_names_links_and_their_addresses() -> None:
    from reconciler.runtime.listeners import touched_links

    names = {1: "lo", 7: "br0"}
    assert touched_links([_Message("RTM_NEWLINK", 9, IFLA_IFNAME="inzabc")], names) == {"inzabc"}
    assert names[9] == "inzabc"
    assert touched_links([_Message("RTM_NEWADDR", 7), _Message("RTM_NEWROUTE", 7)], names) == {"br0"}
    assert touched_links([_Message("RTM_DELLINK", 9, IFLA_IFNAME="inzabc")], names) == {"inzabc"}
    assert 9 not in names
    assert touched_links([_Message("RTM_NEWADDR", 42)], names) is None, "an address on an unknown interface"
    assert touched_links([_Message("RTM_NEWNEIGH", 7)], names) == set()
