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


def test_secure_boot_toggle_replaces_the_store_and_keeps_the_old_one_dated(tmp_path: Path) -> None:
    plain, secure = tmp_path / "OVMF_VARS_4M.fd", tmp_path / "OVMF_VARS_4M.ms.fd"
    plain.write_bytes(b"no keys")
    secure.write_bytes(b"microsoft keys")
    paths = StateLayout(tmp_path / "st").vm("desk")
    uid, gid = os.getuid(), os.getgid()
    assert files.install_efi_vars(str(plain), paths, uid, gid, secure_boot=False)
    assert files.efi_vars_origin(paths) is False
    paths.efi_vars.write_bytes(b"guest boot entries")

    done = files.reset_efi_vars(str(secure), paths, uid, gid, True, "20261130T220000Z")
    backup = paths.efi_vars.with_name("efivars.fd.20261130T220000Z.bak")
    assert str(backup) in done and backup.read_bytes() == b"guest boot entries"
    assert paths.efi_vars.read_bytes() == b"microsoft keys" and files.efi_vars_origin(paths) is True
    assert paths.efi_vars.stat().st_mode & 0o777 == 0o600
    # Applied again (a crash after the step, a re-run): the new store is kept.
    paths.efi_vars.write_bytes(b"enrolled by the guest")
    assert "kept" in files.reset_efi_vars(str(secure), paths, uid, gid, True, "20261130T220001Z")
    assert paths.efi_vars.read_bytes() == b"enrolled by the guest" and files.efi_vars_backups(paths) == [backup]

    # A crash right after the rename: the store is missing, and the next copy makes it from the template.
    os.rename(paths.efi_vars, paths.efi_vars.with_name("efivars.fd.20261130T220002Z.bak"))
    assert files.reset_efi_vars(str(plain), paths, uid, gid, False, "20261130T220003Z") == f"copied {plain}"
    assert paths.efi_vars.read_bytes() == b"no keys" and files.efi_vars_origin(paths) is False

    assert files.delete_efi_vars(paths) and not paths.efi_vars.parent.exists()  # backups and origin go too
