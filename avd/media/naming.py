"""Where a sender's segments live and what they are called.

``record_dir/<sender>/YYYY-MM-DD/<start>Z.mkv``, the start in UTC (to the second, then to the
millisecond and a counter if taken); backfill segments (late frames) always carry the
millisecond and a ``-backfill`` suffix, so they never compete with live ones for a name. A
segment is written as ``.<name>.part`` until its first cluster is in it.
"""

from __future__ import annotations

import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAME = re.compile(r"(\d{8}T\d{6})(?:\.(\d{3}))?Z(?:-backfill)?(?:-\d+)?\.mkv")
BACKFILL_SUFFIX = "-backfill"
PART_SUFFIX = ".part"


def prepare_record_dir(record_dir: Path) -> None:
    """Create ``record_dir`` if it is missing and prove that a file can be made in it; an
    OSError says why not (a file in the way, no permission, a read-only file system).

    The receiver calls it before it listens: a folder it could never record to is a bad
    setting, said at once, not a pause logged only when the first sender connects.
    """
    record_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=record_dir, prefix=".avd-write-test-"):
        pass


def check_path_component(name: str) -> str:
    """``name`` if it is safe as one folder name (a sender id), else ValueError naming it."""
    if not _SAFE_COMPONENT.fullmatch(name):
        raise ValueError(f"sender id {name!r} is not usable as a folder name")
    return name


def segment_path(
    record_dir: Path, sender_id: str, start: datetime, *, backfill: bool = False
) -> Path:
    """A fresh ``record_dir/<sender>/YYYY-MM-DD/<start>.mkv``; ms, then a counter, if taken.

    A backfill segment (late frames) is ``<start with ms>Z-backfill.mkv``: a name no live
    segment can take, so the two never compete for a name.
    """
    start = start.astimezone(UTC)
    day = record_dir / check_path_component(sender_id) / start.strftime("%Y-%m-%d")
    seconds = start.strftime("%Y%m%dT%H%M%S")
    with_ms = f"{seconds}.{start.microsecond // 1000:03d}"
    if backfill:
        with_ms += f"Z{BACKFILL_SUFFIX}"
        candidates = [f"{with_ms}.mkv"] + [f"{with_ms}-{n}.mkv" for n in range(2, 1000)]
    else:
        candidates = [f"{seconds}Z.mkv", f"{with_ms}Z.mkv"]
        candidates += [f"{with_ms}Z-{n}.mkv" for n in range(2, 1000)]
    for name in candidates:
        if not (day / name).exists():
            return day / name
    raise FileExistsError(f"no free segment name in {day} for {with_ms}")


def part_path(path: Path) -> Path:
    """Where the segment ``path`` is written until its first cluster is in it."""
    return path.with_name(f".{path.name}{PART_SUFFIX}")


def parse_segment_start(name: str) -> datetime | None:
    """The UTC start time in a segment's file name, or None if it is not one of ours."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    start = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return start.replace(microsecond=int(match.group(2) or 0) * 1000)
