"""Display passwords: read a ``passwordFile`` under the host policy's rules, and hash it with a key.

Called by the observer (to know whether the file changed: only a keyed hash leaves this module) and by the
executor (to set the password over QMP). The file must resolve inside one of ``HostConfig.secretDirs``, be
a regular file owned by root (or by us), and give no permission to group or others; its first line is the
password. Errors name the field and the path, never the content.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from reconciler.adapters.paths import require
from reconciler.errors import Refused
from reconciler.spec.host import HostConfig
from reconciler.spec.reading import UnsafeFile, read_regular

MAX_SIZE = 4096
FIELD = "spec.display.passwordFile"


def read_password(path: str, host: HostConfig, state_dir: str) -> str:
    """The password in ``path``, checked against the host policy now (a symlink swapped since the plan is
    caught here). :raise Refused: When the policy or the file's owner or mode forbids it, or it is empty."""
    resolved = require(FIELD, path, host, state_dir, roots=host.secretDirs)
    try:
        data = read_regular(resolved, MAX_SIZE, private=True, owners=(0, os.geteuid()), what="password file")
    except UnsafeFile as exc:
        raise Refused(f"{FIELD}: {path}: {exc}") from exc
    try:
        password = data.decode().split("\n", 1)[0].rstrip("\r")
    except UnicodeDecodeError as exc:
        raise Refused(f"{FIELD}: {path} is not UTF-8 text") from exc
    if not password or any(ord(char) < 0x20 or ord(char) == 0x7F for char in password):
        raise Refused(f"{FIELD}: {path}: its first line must be a non-empty password without control characters")
    return password


def keyed_digest(key: bytes, vm_name: str, password: str, expires_after: int | None) -> str:
    """HMAC-SHA256 under the host's key of the VM, the password and its expiry: it tells a changed file
    (or expiry) without the record holding anything a short password could be guessed from offline."""
    message = f"{vm_name}\0{expires_after or ''}\0{password}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()
