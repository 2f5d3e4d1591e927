"""Bounded reading of one manifest file: what a hostile or careless commit can put in a manifest directory
must never hang, exhaust memory or crash the reader.

Called by ``spec.loader.load_directory`` (CLI and sync daemon alike). The rules, each a located error
for that file only (``ManifestUnreadable``), never an exception that stops the other files:

- symlinks are resolved first; a target outside the manifest directory is refused (a manifest cannot
  pull in ``/dev/zero``, ``/proc/...`` or another tenant's files);
- only regular files are read: the file is opened with ``O_NONBLOCK`` (a FIFO opens at once instead of
  waiting for a writer) and checked with ``fstat`` on the open descriptor (no race with a rename);
- at most ``MAX_BYTES`` are read (a file growing while read is refused too);
- the text must be UTF-8; a bad byte is reported at its line and column.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_BYTES = 1024 * 1024  # 1 MiB a file: far above any real manifest, far below a memory problem

_KINDS = {
    stat.S_ISFIFO: "a FIFO",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
    stat.S_ISDIR: "a directory",
}


class UnsafeFile(Exception):
    """``read_regular`` refused the file, or could not read it; the message says why, without the path."""


def read_regular(path: str | Path, limit: int, *, private: bool = False, owners: tuple[int, ...] = (),
                 what: str = "file") -> bytes:
    """At most ``limit`` bytes of the regular file ``path`` (not followed if it is a symlink), opened without
    blocking and checked on the open descriptor: a FIFO, a device, a file growing past ``limit``, and with
    ``private`` a file that group or others may use, or with ``owners`` a file nobody of them owns, is refused.
    The one reader of files a manifest or an operator names (manifests, display passwords, database URLs).

    :raise UnsafeFile: With the reason, in a few words.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise UnsafeFile(f"cannot read: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{_kind(info.st_mode)}, not a regular file: refused")
        if owners and info.st_uid not in owners:
            raise UnsafeFile(f"owned by uid {info.st_uid}: it must be root's")
        if private and info.st_mode & 0o077:
            raise UnsafeFile(f"mode {stat.S_IMODE(info.st_mode):04o}: group or others may use it (chmod 0600 it)")
        if info.st_size > limit:
            raise UnsafeFile(f"{info.st_size} bytes: over the {limit}-byte limit of a {what}")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(65536, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UnsafeFile(f"over the {limit}-byte limit of a {what} (it grew while read)")
    except OSError as exc:
        raise UnsafeFile(f"cannot read: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return b"".join(chunks)


class ManifestUnreadable(Exception):
    """One file cannot be read as a manifest; ``line``/``col`` locate the problem when it is in the text."""

    def __init__(self, message: str, line: int = 1, col: int = 1) -> None:
        super().__init__(message)
        self.message, self.line, self.col = message, line, col


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")


def _resolve_inside(path: Path, root: Path) -> Path:
    try:
        real = path.resolve(strict=True)
        real_root = root.resolve(strict=True)
    except FileNotFoundError as exc:
        raise ManifestUnreadable(f"cannot read: a dangling symlink ({exc.filename} does not exist)") from exc
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ManifestUnreadable(f"cannot read: {exc}") from exc
    if not real.is_relative_to(real_root):
        raise ManifestUnreadable(f"a symlink out of the manifest directory (to {real}) is refused")
    return real


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        raise ManifestUnreadable(f"not UTF-8: byte {data[exc.start]:#04x} ({exc.reason})", line, col) from exc


def read_manifest(path: Path, root: Path, limit: int = MAX_BYTES) -> str:
    """The text of manifest ``path`` under directory ``root``, read within the rules above.

    :raise ManifestUnreadable: When any rule refuses it, or the file cannot be read.
    """
    real = _resolve_inside(path, root)
    try:
        return _decode(read_regular(real, limit, what="manifest file"))
    except UnsafeFile as exc:
        raise ManifestUnreadable(str(exc)) from exc
