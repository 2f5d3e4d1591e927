"""``infinization console NAME``: where a VM's display is (``vnc://HOST:PORT``, ``spice://HOST:PORT``), and a
viewer opened on it when one is installed and stdout is a terminal. ``display_url`` also fills the
``display`` column of ``status --json``. The URL never carries the password (the viewer asks for it).

Called by ``cli.parser`` (``cmd_console``, the `console` command) and ``cli.status``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shutil
import sys

from reconciler.cli.common import CliError, View, config_of, layout_of, read_view
from reconciler.spec.models import VirtualMachineSpec
from reconciler.state import files

VIEWERS = ("remote-viewer", "virt-viewer")  # virt-viewer's remote-viewer opens both vnc:// and spice://


def _url(spec: VirtualMachineSpec, port: int | None) -> str | None:
    display = spec.display
    if not display.enabled or port is None:
        return None
    host = display.listen
    if ipaddress.ip_address(host).version == 6:
        host = f"[{host}]"
    return f"{display.type}://{host}:{port}"


def display_url(view: View, name: str, spec: VirtualMachineSpec | None) -> str | None:
    """The running QEMU's display (as it was started), else the desired one on its recorded port."""
    vm = view.observed.vm(name)
    launched = vm.process.launched if vm.process else None
    if launched is not None and isinstance(launched.display.port, int):
        return _url(launched, launched.display.port)
    if spec is None:
        return None
    port = spec.display.port if isinstance(spec.display.port, int) else view.observed.display_ports.get(name)
    return _url(spec, port)


def cmd_console(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    directory = args.directory or files.read_source(layout)
    if directory is None:
        raise CliError("no manifest directory given and none applied yet: --manifests DIR")
    view = asyncio.run(read_view(directory, layout, allow_restart=False, host=args.host, tolerate_errors=True,
                                 config=config_of(args)))
    loaded = view.manifests.vms.get(args.name)
    spec = loaded.vm.spec if loaded else view.records[args.name].vm.spec if args.name in view.records else None
    if spec is None:
        raise CliError(f"no VirtualMachine {args.name!r} in {directory}")
    url = display_url(view, args.name, spec)
    if url is None:
        raise CliError(f"VM {args.name} has no display (spec.display.type: none)")
    print(url, flush=True)
    viewer = next((found for name in VIEWERS if (found := shutil.which(name))), None)
    if viewer and sys.stdout.isatty() and not args.print_only:
        os.execv(viewer, [viewer, url])
    return 0
