"""The PostgreSQL DSN of ``infinization sync``: where it may come from, checked once at start, and never
shown with its password.

Called by the CLI (``sync``: ``choose``), and by everything that shows text which could hold a DSN: the
daemon's log processor (``redact_log``), the status store (``redact`` on every event and condition) and
the CLI's one-line errors. The rules:

- the DSN comes from exactly one of ``--database-file FILE`` (a file only its owner can read),
  ``$INFINIZATION_DATABASE_URL`` or ``--database``; ``--database`` with a password is *refused*: a
  process's argv is readable by every user of the host (``ps``, /proc/PID/cmdline), so warning would be
  too late. A password-less ``--database`` (peer or trust authentication, ``PGPASSFILE``) is fine;
- the DSN is parsed at start (libpq's own parser, through psycopg), so a malformed one is one clear error
  instead of a "mirror write refused" on every write;
- its password (as written and as decoded) is redacted from every log line, event, status and error,
  as is any ``scheme://user:password@`` or ``password=...`` text, whatever produced it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from reconciler.errors import ConfigInvalid
from reconciler.spec.reading import UnsafeFile, read_regular

ENV = "INFINIZATION_DATABASE_URL"
MASK = "***"
MAX_FILE = 64 * 1024

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^@\s]*(?=@)", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
_secrets: set[str] = set()


def redact(text: str) -> str:
    """``text`` with every known password and any DSN-shaped password replaced by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    text = _KV_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def redact_log(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: every string value of a log line, redacted."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
        elif isinstance(value, BaseException):
            event[key] = redact(f"{type(value).__name__}: {value}")
    return event


def _remember(password: str | None) -> None:
    if password and len(password) >= 1:
        _secrets.add(password)


def parse(url: str) -> dict[str, str]:
    """The DSN's parameters (libpq's parser), or ConfigInvalid with a message that shows no password."""
    from psycopg import conninfo

    text = url.strip()
    if "://" in text and not text.lower().startswith(("postgresql://", "postgres://")):
        raise ConfigInvalid(f"the database URL {redact(text)!r} is not a postgresql:// URL")
    if "://" in text:  # remembered before parsing: libpq's errors quote the text they choke on
        _remember(urlsplit(text).password)
        _remember(unquote(urlsplit(text).password or ""))
    try:
        params = conninfo.conninfo_to_dict(text)
    except Exception as exc:  # psycopg.ProgrammingError, or ValueError from urllib on a bad port
        raise ConfigInvalid(f"invalid database URL {redact(text)!r}: {redact(str(exc))}") from exc
    _remember(str(params["password"]) if params.get("password") else None)
    for port in str(params.get("port") or "").split(","):  # libpq checks ports only when it connects
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigInvalid(f"invalid database URL {redact(text)!r}: port {port!r} is not a number 1-65535")
    return {key: str(value) for key, value in params.items() if value is not None}


def _read_file(path: Path) -> str:
    """The DSN in ``path``: its first line that is not empty or a ``#`` comment. The file must be a
    regular file that only its owner can read (it holds a password)."""
    try:
        data = read_regular(path, MAX_FILE, private=True, what="database URL file")
    except UnsafeFile as exc:
        raise ConfigInvalid(f"--database-file {path}: {exc}") from exc
    for line in data.decode("utf-8", errors="replace").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ConfigInvalid(f"--database-file {path}: holds no database URL")


def choose(url: str | None, file: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The DSN the daemon mirrors to, from the one place it was given, parsed; None: no mirror.

    :raise ConfigInvalid: When it is given in two places, has a password on the command line, or fails
        to parse (the message never shows the password).
    """
    given = [name for name, value in (("--database", url), ("--database-file", file), (f"${ENV}", environ.get(ENV)))
             if value]
    if len(given) > 1:
        raise ConfigInvalid(f"the database is given twice ({' and '.join(given)}): give one")
    if url:
        if parse(url).get("password"):
            raise ConfigInvalid(f"--database {redact(url)!r} has a password on the command line, where every "
                                f"user of this host can read it: put the URL in a file only root can read "
                                f"(--database-file) or in ${ENV}")
        return url
    chosen = _read_file(Path(file)) if file else environ.get(ENV)
    if chosen:
        parse(chosen)
    return chosen or None
