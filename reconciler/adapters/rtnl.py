"""pyroute2's rtnetlink client (``IPRoute``) without the rest of pyroute2: every netlink use goes through here.

Called by ``observe.hostnet`` (links and addresses), ``apply.hostnet`` (TAPs and bridges) and
``runtime.listeners`` (the sync daemon's link watcher).

Why: ``import pyroute2`` runs its package ``__init__``, which imports every protocol family it supports
(NDB, IPDB, nl80211, IPVS, devlink, conntrack, nftables, plan9, WireGuard...): ~180 modules and ~7.7 MB of
resident memory in the sync daemon, which only ever speaks rtnetlink (``pyroute2.iproute.linux``: ~110
modules, ~3.6 MB; measured in docs/performance.md, issue 13). So the package module is created here
without running its ``__init__``, and that ``__init__`` runs the first time anything asks the package
itself for a name (``from pyroute2 import NDB`` elsewhere still works: PEP 562's module ``__getattr__``).
Importing a submodule only needs the package's ``__path__``, which the module has from the start.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyroute2.iproute.linux import IPRoute

_lock = threading.RLock()  # the netlink watcher's thread and the thread pool may both come here first


def _package_without_init() -> None:
    """Put a ``pyroute2`` package module in ``sys.modules`` whose ``__init__`` runs on first attribute use."""
    with _lock:
        if "pyroute2" in sys.modules:
            return
        spec = importlib.util.find_spec("pyroute2")
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            raise ImportError("pyroute2 is not installed")
        package = importlib.util.module_from_spec(spec)  # __path__, __spec__...: enough for submodules
        loader = spec.loader

        def finish(name: str) -> Any:
            """A submodule (``from pyroute2 import config``, as pyroute2's own modules do) is imported as
            such; any other name runs the real ``pyroute2/__init__`` in place, once, and is answered from it."""
            if not name.startswith("__"):
                try:
                    return importlib.import_module(f"pyroute2.{name}")
                except ModuleNotFoundError as exc:
                    if exc.name != f"pyroute2.{name}":
                        raise
            with _lock:
                if vars(package).pop("__getattr__", None) is not None:
                    loader.exec_module(package)
            return vars(package)[name] if name in vars(package) else object.__getattribute__(package, name)

        package.__getattr__ = finish  # type: ignore[method-assign]
        sys.modules["pyroute2"] = package


def iproute() -> type[IPRoute]:
    """pyroute2's synchronous ``IPRoute`` class (only rtnetlink imported)."""
    if "pyroute2" not in sys.modules:
        _package_without_init()
    from pyroute2.iproute.linux import IPRoute

    found: type[IPRoute] = IPRoute
    return found


def netlink_error() -> type[Exception]:
    """pyroute2's ``NetlinkError`` (its ``code`` is the errno)."""
    iproute()
    from pyroute2.netlink.exceptions import NetlinkError

    found: type[Exception] = NetlinkError
    return found
