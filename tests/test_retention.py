"""avd.media.retention: the pure plan (examples and hypothesis properties), then real runs.

Real runs delete real files: a folder over ``max_total_bytes``, a real 2 MiB tmpfs under
``min_free_bytes`` (skipped, saying why, where mounting is not permitted), and a Recorder
whose own retention keeps its recordings under a size while it records.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from avd.clock import monotonic_us
from avd.media.base import AudioFormat, ReceivedFrame, StreamInfo, StreamKind
from avd.media.recorder import Recorder
from avd.media.retention import (
    Deletion,
    RetentionPolicy,
    SegmentFile,
    enforce,
    free_bytes,
    plan_deletions,
    scan_segments,
)
from avd.media.segment import ClosedSegment

DAY = 86_400.0
NOW = 1_800_000_000.0


def seg(name: str, size: int, age_days: float) -> SegmentFile:
    start = NOW - age_days * DAY
    return SegmentFile(Path(name), size, start, start + 60)


def oldest(segment: SegmentFile) -> tuple[float, str]:
    return segment.start, str(segment.path)


def paths(plan: list[Deletion]) -> list[str]:
    return [str(d.segment.path) for d in plan]


# --- examples --------------------------------------------------------------------------------


def test_nothing_to_do_without_limits() -> None:
    segments = [seg("a", 10**9, 400), seg("b", 10**9, 1)]
    assert plan_deletions(RetentionPolicy(), segments, now=NOW, free_bytes=0) == []


def test_age_deletes_what_ended_before_the_cutoff() -> None:
    segments = [seg("new", 1, 1), seg("old", 1, 10), seg("edge", 1, 3.0)]
    plan = plan_deletions(RetentionPolicy(max_age_days=3), segments, now=NOW, free_bytes=None)
    # "edge" started 3 days ago but was written until a minute later: kept.
    assert paths(plan) == ["old"]
    assert plan[0].reason == "older than 3 days"


def test_total_size_deletes_oldest_first_until_it_fits() -> None:
    segments = [seg("d", 100, 1), seg("a", 100, 4), seg("c", 100, 2), seg("b", 100, 3)]
    plan = plan_deletions(RetentionPolicy(max_total_bytes=250), segments, now=NOW, free_bytes=None)
    assert paths(plan) == ["a", "b"]
    assert {d.reason for d in plan} == {"recordings over 250 bytes"}


def test_free_space_deletes_oldest_first_until_enough_is_free() -> None:
    segments = [seg("a", 100, 3), seg("b", 100, 2), seg("c", 100, 1)]
    plan = plan_deletions(RetentionPolicy(min_free_bytes=300), segments, now=NOW, free_bytes=150)
    assert paths(plan) == ["a", "b"]
    assert plan[0].reason == "free space under 300 bytes"


def test_segments_in_use_count_but_are_never_deleted() -> None:
    segments = [seg("writing", 500, 9), seg("a", 100, 2), seg("b", 100, 1)]
    plan = plan_deletions(
        RetentionPolicy(max_age_days=1, max_total_bytes=100),
        segments,
        now=NOW,
        free_bytes=None,
        in_use={Path("writing")},
    )
    assert paths(plan) == ["a", "b"], "the target cannot be met: everything else goes"


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_total_bytes"):
        RetentionPolicy(max_total_bytes=-1)


# --- properties ------------------------------------------------------------------------------

segment_lists = st.lists(
    st.builds(
        lambda size, start, length: (size, start, length),
        st.integers(0, 10_000),
        st.floats(NOW - 30 * DAY, NOW, allow_nan=False),
        st.floats(0, DAY, allow_nan=False),
    ),
    max_size=30,
).map(lambda rows: [SegmentFile(Path(f"s{i}"), s, t, t + n) for i, (s, t, n) in enumerate(rows)])
policies = st.builds(
    RetentionPolicy,
    st.none() | st.floats(0, 40),
    st.none() | st.integers(0, 200_000),
    st.none() | st.integers(0, 200_000),
)


@given(segment_lists, policies, st.none() | st.integers(0, 100_000), st.data())
def test_plan_properties(
    segments: list[SegmentFile], policy: RetentionPolicy, free: int | None, data: st.DataObject
) -> None:
    in_use = set(data.draw(st.lists(st.sampled_from([s.path for s in segments] or [Path("x")]))))
    plan = plan_deletions(policy, segments, now=NOW, free_bytes=free, in_use=in_use)
    deleted = [d.segment for d in plan]

    assert len(set(deleted)) == len(deleted)
    assert all(s in segments for s in deleted)
    assert not any(s.path in in_use for s in deleted), "never an open segment"
    assert deleted == sorted(deleted, key=oldest), "oldest first"

    candidates = sorted((s for s in segments if s.path not in in_use), key=oldest)
    if policy.max_age_days is not None:
        cutoff = NOW - policy.max_age_days * DAY
        assert {s for s in candidates if s.mtime < cutoff} <= set(deleted)
    by_space = [d.segment for d in plan if not d.reason.startswith("older")]
    assert all(policy.max_age_days is None or s.mtime >= cutoff for s in by_space)
    if by_space:
        youngest = oldest(by_space[-1])
        skipped = [s for s in candidates if oldest(s) < youngest and s not in deleted]
        assert skipped == [], "space is made by deleting the oldest first"

    freed = sum(s.size for s in deleted)
    total_after = sum(s.size for s in segments) - freed
    free_after = None if free is None else free + freed
    everything_gone = set(candidates) <= set(deleted)
    if policy.max_total_bytes is not None and not everything_gone:
        assert total_after <= policy.max_total_bytes
    if policy.min_free_bytes is not None and free_after is not None and not everything_gone:
        assert free_after >= policy.min_free_bytes
    if by_space:  # and not one segment more than needed
        last = by_space[-1].size
        over = policy.max_total_bytes is not None and total_after + last > policy.max_total_bytes
        under = (
            policy.min_free_bytes is not None
            and free_after is not None
            and free_after - last < policy.min_free_bytes
        )
        assert over or under


# --- real files ------------------------------------------------------------------------------


def make_segment(root: Path, start: datetime, size: int, sender: str = "cam1") -> Path:
    path = root / sender / start.strftime("%Y-%m-%d") / start.strftime("%Y%m%dT%H%M%SZ.mkv")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    ts = start.timestamp() + 60
    os.utime(path, (ts, ts))
    return path


def test_enforce_deletes_oldest_over_the_total_and_tidies_day_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="avd.media.retention")
    t0 = datetime(2026, 11, 20, 23, 59, tzinfo=UTC)
    files = [make_segment(tmp_path, t0 + timedelta(minutes=i), 10_000) for i in range(4)]
    other = make_segment(tmp_path, t0 + timedelta(seconds=30), 10_000, sender="cam2")
    (tmp_path / "cam1" / "latest.jpg").write_bytes(b"jpeg")
    assert len(scan_segments(tmp_path)) == 5

    plan = enforce(
        RetentionPolicy(max_total_bytes=25_000),
        tmp_path,
        now=t0.timestamp() + 3600,
        in_use={files[0]},
    )
    assert [d.segment.path for d in plan] == [other, files[1], files[2]]
    assert [p.exists() for p in files] == [True, False, False, True]
    assert not other.parent.exists(), "an emptied day folder is removed"
    assert (tmp_path / "cam1" / "latest.jpg").exists()
    logged = [r.getMessage() for r in caplog.records]
    assert f"deleted recording {files[1]} (recordings over 25000 bytes)" in logged


def test_enforce_frees_space_on_a_real_file_system(small_fs: Path) -> None:
    t0 = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)
    size = 300 * 1024
    files = [make_segment(small_fs, t0 + timedelta(minutes=i), size) for i in range(5)]
    before = free_bytes(small_fs)
    assert before is not None
    assert before < 600 * 1024
    wanted = 1200 * 1024
    enforce(RetentionPolicy(min_free_bytes=wanted), small_fs, now=t0.timestamp(), in_use=())
    after = free_bytes(small_fs)
    assert after is not None
    assert after >= wanted
    assert after - size < wanted, "no more deleted than needed"
    kept = [p.exists() for p in files]
    assert kept == sorted(kept), "the oldest went first"
    assert kept.count(False) >= 1


def test_recorder_keeps_its_recordings_under_the_limit(tmp_path: Path) -> None:
    closed: list[ClosedSegment] = []
    limit = 500_000
    recorder = Recorder(
        tmp_path,
        segment_seconds=1.0,
        retention=RetentionPolicy(max_total_bytes=limit),
        interleave_grace=0.05,
        on_segment_closed=closed.append,
    )
    audio = StreamInfo("cam1", StreamKind.AUDIO, AudioFormat(44100, 2, 2, 4410), "peer", 1)
    recorder.stream_started(audio)
    rng = np.random.default_rng(0)
    for i in range(80):  # 8 s of noisy stereo audio, 1.4 MB: several times over the limit
        chunk = rng.integers(-20000, 20000, 8820, dtype=np.int16).tobytes()
        recorder.frame(audio, ReceivedFrame(i, 10**9 + i * 100_000, monotonic_us(), None, chunk))
    recorder.close()

    kept = sorted(p for p in (tmp_path / "cam1").glob("*/*.mkv"))
    names = [c.path for c in closed]
    assert len(names) == 8
    assert kept == names[-len(kept) :], "the newest are kept, the oldest deleted"
    assert len(kept) < len(names)
    assert sum(p.stat().st_size for p in kept[:-1]) <= limit
