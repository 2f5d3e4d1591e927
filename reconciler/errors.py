"""The one error tree of Infinization, by behaviour (what the caller should do), not by origin.

    InfinizationError            every error we raise on purpose; str() is one line that says what to do
     ├── Permanent               needs a person: retrying cannot help until something changes
     │    ├── ManifestInvalid    a manifest fails validation (the CLI lists every error before it)
     │    ├── ConfigInvalid      the host configuration file cannot be read or fails validation
     │    ├── CorruptRecord      a file in the state directory cannot be read
     │    ├── Refused            the executor's re-check refused a destructive or unsafe step
     │    └── UnsafeValue        a value would inject QEMU options (also a ValueError)
     └── Temporary               may work later: retried with backoff (``delay`` suggests how soon)
          ├── StepFailed         a step could not be carried out this time (QEMU, qemu-img, netlink...)
          ├── MonitorError       the QMP monitor is unreachable, busy or answered with an error
          └── LockTimeout        another run holds the state directory

The CLI prints any of them as one ``error:`` line and exits 1; the sync daemon retries ``Temporary`` with
exponential backoff and parks a key after a ``Permanent`` one until its manifest or its record changes.
Anything else that escapes is a bug: the CLI still prints one line (the traceback only with
``INFINIZATION_DEBUG=1``), the daemon logs the traceback and retries with backoff.
"""

from __future__ import annotations


class InfinizationError(Exception):
    """Root of every error Infinization raises on purpose."""


class Permanent(InfinizationError):
    """Needs a person: bad manifest, refused change, corrupt record. Not retried until something changes."""


class Temporary(InfinizationError):
    """May succeed later (QMP busy, a process still starting): retried with backoff.

    :param delay: seconds the caller suggests waiting before the retry; None: the retrier's own backoff.
    """

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class ManifestInvalid(Permanent):
    """One or more manifests fail validation; nothing was changed."""


class ConfigInvalid(Permanent):
    """The host configuration file cannot be read or fails validation."""


class CorruptRecord(Permanent):
    """A file in the state directory exists but cannot be read; the VM is left as it is until a person looks."""


class Refused(Permanent):
    """The executor's re-check refused a step (a disk we did not create, a VM still running...)."""


class UnsafeValue(Permanent, ValueError):
    """A value would change the meaning of a QEMU option string (``,`` ``=`` or a control character)."""


class StepFailed(Temporary):
    """A step could not be carried out; the message says why, in terms a person can act on.

    The executor stops the VM's remaining steps (they depend on this one) and goes on with other VMs.
    """


class MonitorError(Temporary):
    """The QMP monitor could not be reached or a command failed; ``str()`` says which and why."""


class LockTimeout(Temporary):
    """Another run holds the state directory for longer than we were willing to wait."""
