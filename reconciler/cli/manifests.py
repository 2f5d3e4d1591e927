"""``infinization validate`` and ``infinization schema``: the manifests alone, without touching the host.

Called by ``cli.parser`` (handlers). Kept apart from ``cli.commands`` so that these commands import only
the spec layer: no executor, observers, netlink or sync daemon.
"""

from __future__ import annotations

import argparse
import json

from reconciler.cli.common import load_manifests, out


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
