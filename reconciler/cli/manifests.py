"""``infinization validate`` and ``infinization schema``: the manifests alone, without touching the host.

Called by ``cli.parser`` (handlers); ``load_manifests`` by ``cli.common`` too. Kept apart from
``cli.commands`` and ``cli.common`` so that these commands import only the spec layer: no state directory,
planner, executor, observers, netlink or sync daemon (``tests/unit/test_cli_imports.py`` holds it).
"""

from __future__ import annotations

import argparse
import json

from rich.markup import escape

from reconciler.cli.console import err, out
from reconciler.errors import ManifestInvalid
from reconciler.spec.loader import ManifestSet, load_directory


def load_manifests(directory: str) -> ManifestSet:
    """The manifests, or every error printed and CliError: nothing acts on a directory that fails."""
    manifests = load_directory(directory)
    if manifests.errors:
        for error in manifests.errors:
            err.print(f"[red]error:[/] {escape(str(error))}")
        count = len(manifests.errors)
        raise ManifestInvalid(f"{count} error{'s' if count > 1 else ''} in the manifests; nothing was changed")
    return manifests


def cmd_validate(args: argparse.Namespace) -> int:
    manifests = load_manifests(args.directory)
    out.print(f"{len(manifests.vms)} VirtualMachine(s) in {len(manifests.files)} file(s): valid.")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    if args.what == "plan":
        from reconciler.plan.document import plan_document_schema

        print(json.dumps(plan_document_schema(), indent=2))
        return 0
    if args.what == "apply":
        from reconciler.plan.apply_document import apply_document_schema

        print(json.dumps(apply_document_schema(), indent=2))
        return 0
    from reconciler.spec.schema import manifest_schema

    print(json.dumps(manifest_schema(), indent=2))
    return 0
