"""Serialise runs on one state directory with flock: one apply at a time, plans alongside each other.

``apply`` takes the lock exclusively, ``plan`` and ``status`` share it. The kernel drops the lock when its
holder dies, even by SIGKILL, so a crashed apply never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from reconciler.errors import LockTimeout


class StateLock:
    def __init__(self, path: Path, exclusive: bool, wait: float = 60.0) -> None:
        self.path = path
        self.exclusive = exclusive
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise LockTimeout(
                        f"another infinization run{holder} holds {self.path}; gave up after {self.wait:g}s"
                    ) from None
                time.sleep(0.05)
        if self.exclusive:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            text = os.pread(fd, 32, 0).decode().strip()
        except OSError:
            return ""
        return f" (pid {text})" if text.isdigit() else ""

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
