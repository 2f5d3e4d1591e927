"""The sync daemon's event sources: one QMP listener per QEMU, and the netlink watcher (files: ``runtime.filewatch``).

Each only names a key to look at (``trigger``); the reconcile loop decides what to do. Called by
``runtime.daemon``. The rules the listeners keep:

- One listener per QEMU, ever, on its second monitor (``events.sock``; ``qmp.sock`` stays free for
  short-lived clients). Even a finished listener is not replaced for the same PID: a QEMU that is exiting
  can still look alive in /proc for a moment after its pidfd fired, and a second listener would report
  the same exit again, without its SHUTDOWN.
- The process exit is watched with a pidfd (works for a daemonized QEMU, which is not our child). An exit
  without a SHUTDOWN (or panic) event is recorded as a crash in ``exit.json``, through
  ``state.files.record_exit`` (which leaves a stop by us, or a newer QEMU's file, alone); ``RerunOnFailure``
  reads it.
- A listener is stopped by closing its connection, never by cancelling it (an exit half handled would be
  lost).
- A listener holds only what it needs between events (``adapters.qmpevents``: a stream reader, not a full
  qemu.qmp client; one task): the daemon keeps one per running VM for as long as it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import structlog

from reconciler.adapters import rtnl
from reconciler.adapters.qmpevents import EventStream
from reconciler.errors import MonitorError
from reconciler.runtime.hostfacts import CachedHostFacts
from reconciler.runtime.store import Store
from reconciler.state import files
from reconciler.state.layout import StateLayout, VMPaths
from reconciler.state.models import ExitRecord

RELEVANT_EVENTS = {"SHUTDOWN", "RESET", "STOP", "RESUME", "GUEST_PANICKED", "DEVICE_DELETED", "BLOCK_IO_ERROR",
                   "POWERDOWN"}
CONNECT_TIMEOUT = 5.0
DRAIN_SECONDS = 2.0  # after the exit: how long the stream may go on giving its last events

Trigger = Callable[[str], None]
log = structlog.get_logger("infinization.sync")


class ExitTracker:
    """What one QEMU's events say about how it ended; records it in ``exit.json`` and triggers its key."""

    def __init__(self, name: str, pid: int, paths: VMPaths, store: Store, trigger: Trigger) -> None:
        self.name, self.pid, self.paths, self.store, self.trigger = name, pid, paths, store, trigger
        self.shutdown: dict[str, Any] | None = None

    def _record(self, reason: dict[str, Any]) -> None:
        try:
            files.record_exit(self.paths, self.pid, ExitRecord(**reason))
        except OSError as exc:  # a full state file system: say so, and still report and trigger the exit
            log.error("exit not recorded", vm=self.name, pid=self.pid, reason=reason.get("reason"),
                      error=exc.strerror or str(exc))

    def handle(self, event: dict[str, Any]) -> None:
        kind = str(event["event"])
        data: dict[str, Any] = dict(event.get("data", {}))
        if kind == "SHUTDOWN":
            self.shutdown = data
            self._record({"reason": data.get("reason", ""), "guest": data.get("guest")})
        elif kind == "GUEST_PANICKED":
            self._record({"reason": "guest-panicked"})
        if kind in RELEVANT_EVENTS:
            self.store.event(self.name, "qmp-event", "info", f"{kind} {json.dumps(data)}")
            self.trigger(self.name)

    def exited(self) -> None:
        """The process is gone and its last events were handled: without a SHUTDOWN it crashed."""
        if self.shutdown is None and (recorded := files.read_exit(self.paths)) is not None:
            self.shutdown = {"reason": recorded.reason}  # recorded for this run already: not a crash
        if self.shutdown is None:
            self._record({"reason": "crash"})
            self.store.event(self.name, "process-exit", "failure", f"QEMU pid {self.pid} exited without a shutdown")
        else:
            self.store.event(self.name, "process-exit", "info",
                             f"QEMU pid {self.pid} exited ({self.shutdown.get('reason')})")
        self.trigger(self.name)


class _Listener:
    """One QEMU followed: its pidfd wakes ``wake`` when it exits; ``stop()`` wakes it too and closes the
    stream. Slotted, and no task but the one that reads: a daemon holds one of these per running VM."""

    __slots__ = ("pid", "stopping", "stream", "task", "wake")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.stopping = False
        self.stream: EventStream | None = None

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.stream is not None:
            self.stream.close()  # the reader sees the end of its stream


class QMPListeners:
    """One listener per running QEMU, keyed by VM name."""

    def __init__(self, layout: StateLayout, store: Store, trigger: Trigger) -> None:
        self.layout, self.store, self.trigger = layout, store, trigger
        self._listeners: dict[str, _Listener] = {}

    def pid(self, name: str) -> int | None:
        listener = self._listeners.get(name)
        return listener.pid if listener else None

    def ensure(self, name: str, pid: int) -> None:
        """Follow QEMU ``pid`` of ``name`` (once: see the module docstring), replacing one of an older QEMU.
        A VM with no process seen is left alone by the caller: its listener ends by itself (pidfd), and
        stopping it on a momentary miss would let a second listener start for the same QEMU."""
        current = self._listeners.get(name)
        if current is not None and current.pid == pid:
            return
        self.stop(name)
        listener = self._listeners[name] = _Listener(pid)
        listener.task = asyncio.create_task(self._listen(name, listener))

    def stop(self, name: str) -> asyncio.Task[None] | None:
        """Ask a listener to close its QMP connection and end (no cancel: its exit handling must not be cut
        in half)."""
        listener = self._listeners.pop(name, None)
        if listener is None:
            return None
        listener.stop()
        return listener.task

    async def close(self) -> None:
        closing = [task for name in list(self._listeners) if (task := self.stop(name))]
        await asyncio.gather(*closing, return_exceptions=True)

    async def _listen(self, name: str, listener: _Listener) -> None:
        """Follow one QEMU: its QMP events, and its exit (pidfd: works for a daemonized QEMU too)."""
        try:
            pidfd = os.pidfd_open(listener.pid)
        except OSError:  # already gone: let a reconcile look at it
            self.trigger(name)
            return
        loop = asyncio.get_running_loop()

        def exited() -> None:
            loop.remove_reader(pidfd)  # a pidfd stays readable: once is enough
            listener.wake.set()
            if listener.stream is not None:
                _drain(loop, listener.stream)

        loop.add_reader(pidfd, exited)
        tracker = ExitTracker(name, listener.pid, self.layout.vm(name), self.store, self.trigger)
        try:
            await self._follow(listener, tracker, loop)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if listener.stream is not None:
                listener.stream.close()

    async def _follow(self, listener: _Listener, tracker: ExitTracker, loop: asyncio.AbstractEventLoop) -> None:
        try:
            stream = await EventStream.connect(tracker.paths.events, CONNECT_TIMEOUT)
        except MonitorError as exc:  # still watch the process; events of this QEMU are lost, say so
            log.warning("cannot follow QMP events", vm=tracker.name, pid=tracker.pid, error=str(exc))
        else:
            listener.stream = stream
            if listener.stopping:
                return
            if listener.wake.is_set():  # exited while we connected
                _drain(loop, stream)
            async for event in stream.events():
                tracker.handle(event)
        await listener.wake.wait()  # the process exited (pidfd), or the daemon is stopping or moved on
        if not listener.stopping:
            tracker.exited()


def _drain(loop: asyncio.AbstractEventLoop, stream: EventStream) -> None:
    """The process is gone: its socket ends after the last event it wrote (SHUTDOWN), which the reader
    handles first; but not for ever (another process holding the socket open would keep it from ending)."""
    loop.call_later(DRAIN_SECONDS, stream.close)


LINK_EVENTS = ("RTM_NEWLINK", "RTM_DELLINK")
ADDRESS_EVENTS = ("RTM_NEWADDR", "RTM_DELADDR")


def touched_links(messages: list[Any], names: dict[int, str]) -> set[str] | None:
    """The interfaces a batch of netlink messages is about (links and their addresses; routes and neighbours
    are not facts we keep), keeping ``names`` (ifindex -> name) current. None: an address on an interface
    of unknown name (treated as "anything may have changed")."""
    touched: set[str] = set()
    for message in messages:
        event = message.get("event")
        if event in LINK_EVENTS and (name := message.get_attr("IFLA_IFNAME")):
            touched.add(name)
            if event == "RTM_NEWLINK":
                names[message["index"]] = name
            else:
                names.pop(message["index"], None)
        elif event in ADDRESS_EVENTS:
            name = names.get(message["index"])
            if name is None:
                return None
            touched.add(name)
    return touched


def watch_netlink(stopping: asyncio.Event, on_links: Callable[[set[str] | None], object],
                  facts: CachedHostFacts | None = None) -> threading.Thread:
    """Each batch of netlink messages about interfaces calls ``on_links`` in the running event loop with the
    names of the interfaces concerned (``touched_links``; the daemon maps its bridges and TAPs to keys, so
    other software's interfaces coming and going wake nothing). ``facts`` (``runtime.hostfacts``) keeps host
    facts only while this watcher is subscribed. pyroute2's socket blocks: it runs in its own thread."""
    IPRoute = rtnl.iproute()  # pyroute2: its rtnetlink part only
    from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

    loop = asyncio.get_running_loop()

    def tell(callback: Callable[..., object], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon has stopped
            loop.call_soon_threadsafe(callback, *args)

    def follow(ipr: Any) -> None:
        # Links and their addresses only: routes and neighbours (frequent on a busy host) are not facts we keep.
        ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        # Subscribed first, then the names: a link made in between is in the dump or in a message.
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        if facts is not None:
            tell(facts.watcher_up, "netlink")
        while not stopping.is_set():
            try:
                messages = ipr.get()
            except Exception:  # the socket closes when the daemon stops
                return
            touched = touched_links(list(messages), names)
            if touched is None or touched:
                tell(on_links, touched)

    def run() -> None:
        try:
            with IPRoute() as ipr:
                follow(ipr)
        finally:
            if facts is not None:
                tell(facts.watcher_down, "netlink")

    thread = threading.Thread(target=run, name="netlink", daemon=True)
    thread.start()
    return thread
