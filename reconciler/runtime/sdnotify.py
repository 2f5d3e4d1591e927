"""systemd's service notification protocol (``sd_notify(3)``), for ``infinization sync`` under ``Type=notify``.

The protocol is one unix datagram per notification, ``KEY=VALUE`` lines, to the socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract socket when it starts with ``@``). The watchdog's period comes
from ``$WATCHDOG_USEC``, and is ours only when ``$WATCHDOG_PID`` is unset or names this process. Written
here rather than depended on: it is a few lines, and the PyPI options are unmaintained (``sdnotify``, last
release 2017, no watchdog variables) or need libsystemd's headers and a compiler (``systemd-python``).

Like ``sd_notify(unset_environment=1)``, ``from_environment`` removes the three variables from the
environment, so no child (nft, qemu-img, dnsmasq, git) can speak for the service. Without
``$NOTIFY_SOCKET`` (not run by systemd) every call does nothing. A failed send is logged once and never
fatal: the daemon's job is the VMs. Called by ``runtime.service``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import structlog

log = structlog.get_logger("infinization.sync")

VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as an address for ``sendto``: ``@name`` is the abstract socket ``\\0name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_seconds(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """The watchdog timeout this process must keep (seconds), or None: not asked, not ours, or malformed."""
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != own_pid):
        return None  # the watchdog is for another process of the service (WATCHDOG_PID)
    return int(usec) / 1_000_000


@dataclass
class Notifier:
    """Sends notifications to systemd; a no-op when ``address`` is None."""

    address: str | bytes | None = None
    watchdog: float | None = None  # the timeout (WatchdogSec=) in seconds, when this process must ping
    _failed: bool = False

    @classmethod
    def from_environment(cls) -> Notifier:
        env = {name: os.environ.pop(name, None) for name in VARIABLES}
        notify = env["NOTIFY_SOCKET"]
        address = socket_address(notify) if notify and notify not in ("@",) else None
        return cls(address, watchdog_seconds(env["WATCHDOG_USEC"], env["WATCHDOG_PID"], os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """One notification (``ready="1"`` -> ``READY=1``); True when it was sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key.upper()}={value.replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once: a vanished socket would otherwise log every ping
                log.warning("cannot notify systemd", socket=repr(self.address), error=str(exc))
                self._failed = True
            return False
        return True
