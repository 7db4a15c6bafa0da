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
from collections.abc import Sequence
from pathlib import Path


def write_atomically(
    path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Replace ``path`` with ``data``, with permission bits ``mode`` and, if given, the
    (uid, gid) ``owner``."""
    write_all_atomically([(path, data, mode)], owner=owner)


def write_all_atomically(
    files: Sequence[tuple[Path, bytes, int]], *, owner: tuple[int, int] | None = None
) -> None:
    """Replace every ``(path, data, mode)``, all or none: each new content is written and
    fsynced to its temporary file first, and only once all are there are they renamed over
    their targets, in the order given. So a full disk while writing a set of keys and
    certificates changes none of them, where writing them one by one left some new files
    beside old ones, or a CA without its certificates. An OSError names the file."""
    staged: list[tuple[Path, Path]] = []  # (temporary, target)
    try:
        for path, data, mode in files:
            staged.append((_stage(path, data, mode, owner), path))
        for temporary, path in staged:
            os.replace(temporary, path)
    except BaseException:
        for temporary, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        raise


def _stage(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> Path:
    """``data`` in a new temporary file beside ``path``, with its final mode and owner."""
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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        if isinstance(exc, OSError) and exc.filename is None:  # a write names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return temporary
