"""A thread pool for the blocking work of many VMs at once (qemu-img, fsync, QEMU launches, netlink).

Used by the observers and the executor in place of ``asyncio.to_thread``: the event loop's default pool
has ``cpu_count + 4`` threads (6 on a 2-core host), so 32 VMs created side by side queued behind each
other's ``qemu-img create``, boot-file copies and fsyncs, work that mostly waits on the kernel or a child
process, not on our CPU. This pool is shared by every event loop of the process (the CLI's several
``asyncio.run`` calls, the sync daemon's loop) and its threads are made on demand.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

WORKERS = 64  # at most this many blocking calls at once (the scheduler starts at most 64 VMs at once)

_P = ParamSpec("_P")
_R = TypeVar("_R")
_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="infinization")


async def run(func: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """``func(*args, **kwargs)`` in a worker thread (context variables carried over, as ``to_thread`` does)."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
    return await loop.run_in_executor(_pool, call)
