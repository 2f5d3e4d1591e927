"""Crash points for the crash-safety tests: ``INFINIZATION_CRASH_AT=MOMENT:STEP`` makes the process SIGKILL
itself there, as a power cut or an OOM kill would.

The executor checks ``before:KIND`` and ``after:KIND`` around every step; ``launched:start`` is inside a start,
after QEMU was launched and before its pid was recorded (``apply.vmprocess``), the narrowest window of a
start. Unset (every production run) nothing happens.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "INFINIZATION_CRASH_AT"


def maybe_crash(moment: str, kind: str) -> None:
    """SIGKILL this process when ``INFINIZATION_CRASH_AT`` is ``moment:kind``."""
    if os.environ.get(CRASH_ENV) == f"{moment}:{kind}":
        os.kill(os.getpid(), signal.SIGKILL)
