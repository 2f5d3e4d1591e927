"""The UEFI variable store: copied once from the template, never replaced, no temporary file left."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.state import files
from reconciler.state.layout import StateLayout


def test_the_store_is_copied_once_and_kept(tmp_path: Path) -> None:
    template = tmp_path / "OVMF_VARS_4M.fd"
    template.write_bytes(b"template")
    paths = StateLayout(tmp_path / "st").vm("desk")
    paths.efi_vars.parent.mkdir(parents=True)
    (paths.efi_vars.parent / ".efivars.fd.x1.tmp").write_bytes(b"half")  # an earlier crash's leftover
    assert files.install_efi_vars(str(template), paths, os.getuid(), os.getgid())
    first = paths.efi_vars.stat()
    assert (first.st_mode & 0o777, paths.efi_vars.read_bytes()) == (0o600, b"template")
    paths.efi_vars.write_bytes(b"guest wrote its boot entries")
    template.write_bytes(b"new template")
    assert not files.install_efi_vars(str(template), paths, os.getuid(), os.getgid())
    assert paths.efi_vars.stat().st_ino == first.st_ino
    assert paths.efi_vars.read_bytes() == b"guest wrote its boot entries"
    assert sorted(p.name for p in paths.efi_vars.parent.iterdir()) == ["efivars.fd"]
    assert files.delete_efi_vars(paths) and not paths.efi_vars.parent.exists()
