"""The sync daemon's database URL: one source, never a password in argv, parsed at start, redacted."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import structlog

from reconciler.errors import ConfigInvalid
from reconciler.runtime import dsn
from reconciler.runtime.store import Store, VMStatus

SECRET = "s3cr#t-Pa55"
URL = f"postgresql://infz:{SECRET}@db.example:5432/infz"


def test_a_password_on_the_command_line_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigInvalid) as caught:
        dsn.choose(URL, None, {})
    assert SECRET not in str(caught.value) and "postgresql://infz:***@db.example" in str(caught.value)
    assert "--database-file" in str(caught.value)


def test_password_less_urls_are_fine_on_the_command_line() -> None:
    url = "postgresql://postgres@/postgres?host=/run/pg&port=5432"
    assert dsn.choose(url, None, {}) == url


def test_environment_and_file(tmp_path: Path) -> None:
    assert dsn.choose(None, None, {dsn.ENV: URL}) == URL
    file = tmp_path / "db"
    file.write_text(f"# the mirror\n\n{URL}\n")
    file.chmod(0o600)
    assert dsn.choose(None, str(file), {}) == URL
    file.chmod(0o640)
    with pytest.raises(ConfigInvalid, match="group or others may use it"):
        dsn.choose(None, str(file), {})
    with pytest.raises(ConfigInvalid, match="given twice"):
        dsn.choose(None, str(file), {dsn.ENV: URL})
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigInvalid, match="not a regular file"):
        dsn.choose(None, str(tmp_path / "fifo"), {})


@pytest.mark.parametrize("bad", [
    f"postgresql://infz:{SECRET}@db.example:notaport/infz",
    f"host=db password={SECRET} dbname",
    f"mysql://infz:{SECRET}@db/infz",
])
def test_a_malformed_url_is_one_error_without_the_password(bad: str) -> None:
    with pytest.raises(ConfigInvalid) as caught:
        dsn.choose(None, None, {dsn.ENV: bad})
    assert SECRET not in str(caught.value)


def test_redaction_of_any_dsn_shaped_text() -> None:
    assert dsn.redact(f"connect {URL} failed") == "connect postgresql://infz:***@db.example:5432/infz failed"
    assert dsn.redact(f"host=db password='{SECRET}' user=x") == "host=db password=*** user=x"
    assert dsn.redact("postgresql://user@host/db") == "postgresql://user@host/db"


def test_known_passwords_are_redacted_wherever_they_appear(tmp_path: Path) -> None:
    dsn.parse(f"postgresql://infz:{SECRET.replace('#', '%23')}@db/infz")  # decoded and encoded forms
    assert dsn.redact(f"FATAL: password authentication failed ({SECRET})") == (
        "FATAL: password authentication failed (***)")
    store = Store(tmp_path / "infz.db")
    try:
        store.event("vm", "mirror", "error", f"refused: {SECRET}")
        store.set_status(VMStatus("vm", "Failed", conditions={"Failed": f"mirror says {URL}"}))
        assert SECRET not in json.dumps(store.events()) + json.dumps(store.statuses()["vm"].conditions)
    finally:
        store.close()


def test_log_lines_are_redacted() -> None:
    dsn.parse(URL)
    out = io.StringIO()
    logger = structlog.wrap_logger(structlog.PrintLogger(out), processors=[
        dsn.redact_log, structlog.processors.JSONRenderer()])
    logger.warning("postgresql mirror write refused", error=f"bad {URL}", exc=RuntimeError(SECRET))
    assert SECRET not in out.getvalue() and "***" in out.getvalue()
