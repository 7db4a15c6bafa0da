"""Replacing a file whole or not at all: certificates, keys and the tokens file.

A crash or a full disk must never leave half a key or half a tokens file where a daemon will
read it. The new content goes to a temporary file beside the target (same file system), is
fsynced, and is renamed over the target; on any failure the temporary file is removed and
the target is untouched. The temporary file has its final mode (and owner) before any byte
lands, so a secret is never readable by anyone it should not be, even for a moment.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomically(
    path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Replace ``path`` with ``data``, with permission bits ``mode`` and, if given, the
    (uid, gid) ``owner``."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as stream:
            # os.open's mode is filtered by the umask: set it exactly while still empty.
            os.fchmod(stream.fileno(), mode)
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(stream.fileno(), *owner)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
