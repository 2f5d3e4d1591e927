"""The sync daemon's copy of the manifest files' texts: after a file event only the files it names are read.

``DesiredCache`` (``runtime.cache``) keeps one ``ManifestTexts``. A full read lists the directory and reads
every manifest (as ``spec.loader.load_directory`` does); ``refresh`` reads only the paths a batch of the
file watcher (``runtime.filewatch``) names. Either way the result goes through ``spec.loader.assemble``,
which parses only texts it has not seen (``_parsed`` is remembered by file and text) and runs the
duplicate-name and cross-file checks over the whole set, so those stay exactly as a full load would find
them.

A batch is taken file by file only when every path in it is plainly a manifest file (``*.yaml``/``*.yml``,
no hidden part; hidden paths such as ``.git/...`` or an editor's ``.swp`` are skipped, as a full read skips
them, and so are other files). A directory made, moved or removed, or a path outside the directory, makes
a full read: a directory event does not name the files under it. The periodic resync always reads everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from reconciler.spec.loader import (
    ManifestError,
    ManifestSet,
    assemble,
    is_hidden,
    load_directory,
    manifest_files,
    read_file,
)

SUFFIXES = (".yaml", ".yml")


class ManifestTexts:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.texts: dict[str, str | ManifestError] | None = None  # None: read everything next time

    def forget(self) -> None:
        self.texts = None

    def read(self, changed: Iterable[str] | None = None) -> ManifestSet:
        """The manifests, reading only ``changed`` when that is enough (see the module docstring). Not
        thread-safe: the daemon runs one read at a time."""
        kept, self.texts = self.texts, None  # a read that fails half-way must not leave half-fresh texts
        texts = None if changed is None or kept is None else self._refreshed(kept, changed)
        if texts is None:
            if not self.directory.is_dir():
                return load_directory(self.directory)  # its located "not a directory" error
            texts = {str(path): read_file(path, self.directory) for path in manifest_files(self.directory)}
        self.texts = texts
        return assemble(self.directory, texts)

    def _refreshed(self, texts: dict[str, str | ManifestError],
                   changed: Iterable[str]) -> dict[str, str | ManifestError] | None:
        """``texts`` with the files in ``changed`` read again (or dropped when gone); None: read everything."""
        fresh = dict(texts)
        for name in changed:
            path = Path(name)
            try:
                relative = path.relative_to(self.directory)
            except ValueError:
                return None
            if is_hidden(relative):
                continue  # never a manifest (a full read skips it too)
            if path.suffix not in SUFFIXES:
                if path.is_dir() or any(known.startswith(f"{path}/") for known in texts):
                    return None  # a directory made, moved or removed: the files under it are not named
                continue  # some other file (a README, an editor's backup): never a manifest
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                fresh[str(path)] = read_file(path, self.directory)
            elif path.is_dir():
                return None  # a directory named *.yaml: what is under it is not named
            else:
                fresh.pop(str(path), None)
        return fresh
