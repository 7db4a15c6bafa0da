"""avd.atomicfile: the target is replaced whole or left as it was, with no temporary left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from avd.atomicfile import write_all_atomically, write_atomically


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


def test_a_set_is_written_all_or_none_and_the_error_names_the_file(tmp_path: Path) -> None:
    first, second = tmp_path / "ca.key", tmp_path / "ca.crt"
    first.write_bytes(b"old key")
    missing = tmp_path / "gone" / "receiver.key"  # its folder does not exist: staging fails
    files = [(first, b"new key", 0o600), (second, b"new cert", 0o644), (missing, b"k", 0o600)]
    with pytest.raises(OSError) as failure:
        write_all_atomically(files)
    assert failure.value.filename is not None
    assert "receiver.key" in str(failure.value.filename)
    assert first.read_bytes() == b"old key", "nothing replaced before every file was staged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key"], "no temporary left"
    write_all_atomically(files[:2])
    assert (first.read_bytes(), second.read_bytes()) == (b"new key", b"new cert")
    assert stat.S_IMODE(second.stat().st_mode) == 0o644
