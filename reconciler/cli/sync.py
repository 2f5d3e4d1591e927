"""``infinization sync``: parse the daemon's options and hand over to ``runtime.daemon.run_daemon``.

Its own module, not one of ``cli.commands``' handlers, so the long-running daemon imports none of what
only the interactive commands use (``cli.progress``'s live display, ``cli.recording``, rich tables): the
daemon keeps every module it imports for as long as it runs (issue 13: its memory;
``tests/unit/test_cli_imports.py``). Dispatched by ``cli.parser``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reconciler.cli.common import CliError, config_of, layout_of
from reconciler.runtime import dsn
from reconciler.runtime.daemon import Options, run_daemon
from reconciler.state import files


def cmd_sync(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    files.check_private(layout)  # a state directory others can write would let them steer a root daemon
    options = Options(host=args.host, dry_run=args.dry_run, allow_restart=args.allow_restart,
                      prune_other_sources=args.prune_other_sources,
                      debounce_ms=args.debounce_ms, resync_seconds=args.resync_interval, config=config_of(args))
    directory = Path(args.directory)
    if not directory.is_dir():
        raise CliError(f"{directory} is not a directory")
    metrics_address = None if args.metrics_address == "none" else args.metrics_address
    if metrics_address is not None:
        from reconciler.runtime.metrics import parse_address  # prometheus_client: only sync needs it

        parse_address(metrics_address)  # a malformed address fails now, before any lock is taken
    database = dsn.choose(args.database, args.database_file)  # before anything starts: one clear error
    return run_daemon(directory, layout, options, database, metrics_address,
                      retention_days=args.event_retention_days)
