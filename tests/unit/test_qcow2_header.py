"""adapters.qcow2: a qcow2 header read in-process gives what ``qemu-img info`` gives, or None (qemu-img then)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from reconciler.adapters import qcow2

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def _create(path: Path, *options: str, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), size], check=True)
    return path


def _qemu_img(path: Path) -> qcow2.Qcow2Header:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                                     capture_output=True, text=True).stdout)
    return qcow2.Qcow2Header(info["virtual-size"], info.get("full-backing-filename"),
                             info.get("backing-filename-format"))


def test_plain_images_match_qemu_img(tmp_path: Path) -> None:
    base = _create(tmp_path / "base.qcow2")
    images = [
        base,
        _create(tmp_path / "clone.qcow2", "-b", str(base), "-F", "qcow2", size="128M"),
        _create(tmp_path / "v2.qcow2", "-o", "compat=0.10", size="1G"),
        _create(tmp_path / "meta.qcow2", "-o", "preallocation=metadata", size="3M"),
        _create(tmp_path / "big.qcow2", size="2P"),
    ]
    for image in images:
        assert qcow2.read_header(image) == _qemu_img(image), image


def test_what_is_not_the_plain_case_is_left_to_qemu_img(tmp_path: Path) -> None:
    base = _create(tmp_path / "base.qcow2")
    relative = tmp_path / "rel.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(relative)],
                   check=True, cwd=tmp_path)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    truncated = tmp_path / "short.qcow2"
    truncated.write_bytes(base.read_bytes()[:50])
    link = tmp_path / "link.qcow2"
    link.symlink_to(base)
    for image in (relative, raw, truncated, link, tmp_path / "missing.qcow2", tmp_path):
        assert qcow2.read_header(image) is None, image


def test_unknown_or_external_data_features_are_left_to_qemu_img(tmp_path: Path) -> None:
    header = bytearray(_create(tmp_path / "a.qcow2").read_bytes()[:4096])
    assert qcow2.parse_header(bytes(header)) is not None
    for bit in (1 << 2, 1 << 40):  # external data file; a feature this reader does not know
        changed = bytearray(header)
        struct.pack_into(">Q", changed, 72, bit)
        assert qcow2.parse_header(bytes(changed)) is None
    encrypted = bytearray(header)
    struct.pack_into(">I", encrypted, 32, 2)  # crypt_method LUKS
    assert qcow2.parse_header(bytes(encrypted)) is None
