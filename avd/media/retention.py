"""Which recordings to delete, and deleting them.

``plan_deletions`` is pure: given the segments on disk, the time and the free space, it
returns what to delete and why, oldest first, never a segment still being written. Three
rules apply in order: segments whose last write is older than ``max_age_days``; then the
oldest until the recordings fit ``max_total_bytes``; then the oldest until the file system
has ``min_free_bytes`` free (deleting by free space is what NVR users ask for most).
``scan_segments`` and ``apply_deletions`` are the thin I/O around it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from avd.media.segment import parse_segment_start

log = logging.getLogger(__name__)

_DAY_SECONDS = 86_400.0


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Limits on the recordings; None switches a rule off."""

    max_age_days: float | None = None
    max_total_bytes: int | None = None
    min_free_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_age_days", "max_total_bytes", "min_free_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"retention {name} must not be negative, got {value}")


@dataclass(frozen=True, slots=True)
class SegmentFile:
    path: Path
    size: int
    start: float  # epoch seconds, from the file name (its mtime if the name has none)
    mtime: float  # epoch seconds of the last write


@dataclass(frozen=True, slots=True)
class Deletion:
    segment: SegmentFile
    reason: str


def _oldest_first(segment: SegmentFile) -> tuple[float, str]:
    return segment.start, str(segment.path)


def plan_deletions(
    policy: RetentionPolicy,
    segments: Iterable[SegmentFile],
    *,
    now: float,
    free_bytes: int | None,
    in_use: Collection[Path] = (),
) -> list[Deletion]:
    """What to delete, oldest first. ``in_use`` segments count toward the total, never go."""
    ordered = sorted(segments, key=_oldest_first)
    total = sum(s.size for s in ordered)
    busy = frozenset(in_use)
    candidates = [s for s in ordered if s.path not in busy]
    cutoff, age_reason = -math.inf, ""
    if policy.max_age_days is not None:
        cutoff = now - policy.max_age_days * _DAY_SECONDS
        age_reason = f"older than {policy.max_age_days:g} days"
    plan = [Deletion(s, age_reason) for s in candidates if s.mtime < cutoff]
    left = [s for s in candidates if s.mtime >= cutoff]
    freed = sum(d.segment.size for d in plan)
    for segment in left:
        reason = _space_reason(
            policy, total - freed, None if free_bytes is None else free_bytes + freed
        )
        if reason is None:
            break
        plan.append(Deletion(segment, reason))
        freed += segment.size
    return sorted(plan, key=lambda d: _oldest_first(d.segment))


def _space_reason(policy: RetentionPolicy, total: int, free: int | None) -> str | None:
    """Why more space is needed, or None when both space rules hold."""
    if policy.max_total_bytes is not None and total > policy.max_total_bytes:
        return f"recordings over {policy.max_total_bytes} bytes"
    if policy.min_free_bytes is not None and free is not None and free < policy.min_free_bytes:
        return f"free space under {policy.min_free_bytes} bytes"
    return None


def scan_segments(record_dir: Path) -> list[SegmentFile]:
    """Every ``<sender>/<day>/*.mkv`` under ``record_dir``; files that vanish are skipped."""
    found: list[SegmentFile] = []
    for path in record_dir.glob("*/*/*.mkv"):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        start = parse_segment_start(path.name)
        found.append(
            SegmentFile(
                path, st.st_size, st.st_mtime if start is None else start.timestamp(), st.st_mtime
            )
        )
    return found


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``path``'s file system (None if unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def apply_deletions(deletions: Iterable[Deletion]) -> int:
    """Delete the planned segments, logging each with its reason; returns bytes freed."""
    freed = 0
    for deletion in deletions:
        path = deletion.segment.path
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot delete recording %s: %s", path, exc.strerror or exc)
            continue
        freed += deletion.segment.size
        log.info("deleted recording %s (%s)", path, deletion.reason)
    return freed


def remove_empty_day_folders(record_dir: Path) -> None:
    """Remove ``<sender>/<day>`` folders left empty; a folder in use is simply not empty."""
    for day in record_dir.glob("*/*/"):
        try:
            day.rmdir()
        except OSError:
            continue  # not empty (ENOTEMPTY), or not ours to remove


def enforce(
    policy: RetentionPolicy, record_dir: Path, *, now: float, in_use: Collection[Path]
) -> list[Deletion]:
    """One retention pass over ``record_dir``: scan, plan, delete, tidy folders."""
    if not record_dir.is_dir():
        return []
    plan = plan_deletions(
        policy, scan_segments(record_dir), now=now, free_bytes=free_bytes(record_dir), in_use=in_use
    )
    apply_deletions(plan)
    remove_empty_day_folders(record_dir)
    return plan
