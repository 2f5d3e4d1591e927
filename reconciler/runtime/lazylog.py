"""A structlog logger that imports structlog when it first logs, not when its module is imported.

Used by the status store (``runtime.store``) and its PostgreSQL mirror (``runtime.pgmirror``), which
``infinization status`` and ``events`` import only to read SQLite: importing structlog also imports rich's
tracebacks and pygments (about a tenth of ``status``'s start-up), and a reader never logs. The sync daemon
configures structlog at start, long before any of these loggers is used, so nothing changes for it.
"""

from __future__ import annotations

from typing import Any


class LazyLogger:
    """``structlog.get_logger(name)``, looked up on the first call of any of its methods."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, method: str) -> Any:
        if self._logger is None:
            import structlog

            self._logger = structlog.get_logger(self._name)
        return getattr(self._logger, method)


def get_logger(name: str) -> Any:
    return LazyLogger(name)
