"""avd.atomicfile: the target is replaced whole or left as it was, with no temporary left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from avd.atomicfile import write_atomically


def test_replaces_with_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        write_atomically(target, b"new", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]


def test_gives_the_owner_asked_for(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    target = tmp_path / "tokens"
    write_atomically(target, b"x", mode=0o640, owner=(4242, 4343))
    assert (target.stat().st_uid, target.stat().st_gid) == (4242, 4343)


def test_a_failed_replace_leaves_the_target_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "in-use"
    target.mkdir()  # a directory: the final rename fails after everything was written
    (target / "inside").write_text("kept")
    with pytest.raises(OSError):
        write_atomically(target, b"new", mode=0o600)
    assert (target / "inside").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["in-use"]
