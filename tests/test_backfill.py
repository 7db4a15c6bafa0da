"""Late frames (a sender's spool, after an outage) recorded at their original capture times.

The recorder is driven through its MediaSink interface as the receiver's event loop would;
the files are opened again with PyAV, and every packet is mapped back to the sender's clock
twice: from its stamp (the BlockAdditional the recorder writes) and from its pts plus the
segment's AVD_START_US tag, which must agree.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import av

from avd.media.base import StreamKind
from avd.media.recorder import Recorder
from avd.media.retention import RetentionPolicy
from avd.media.segment import parse_segment_start
from tests.test_recorder import (
    BASE_US,
    CHUNK_US,
    info,
    jpeg,
    pcm,
    received,
    segments,
    wait_until,
)

NO_RETENTION = RetentionPolicy()
FRAME_US = 50_000
STAMP = struct.Struct(">Q4sQQ")


@dataclass(frozen=True)
class Stored:
    """One packet of a segment, mapped back to the sender's capture clock."""

    kind: str
    pts_ms: int
    at_us: int  # AVD_START_US + pts: where the packet sits on the capture clock
    capture_us: int  # from the packet's stamp
    seq: int
    data: bytes


def stored(path: Path) -> tuple[dict[str, str], list[Stored]]:
    """The segment's tags and its packets in file order."""
    found: list[Stored] = []
    with av.open(str(path)) as container:
        tags = dict(container.metadata)
        start_us = int(tags["AVD_START_US"])
        for packet in container.demux():
            if not packet.size:
                continue
            raw = bytes(packet.get_sidedata("matroska_block_additional"))
            add_id, magic, capture_us, seq = STAMP.unpack(raw)
            assert (add_id, magic) == (1, b"AVD1")
            pts = packet.pts or 0
            kind = packet.stream.type
            found.append(Stored(kind, pts, start_us + pts * 1000, capture_us, seq, bytes(packet)))
    return tags, found


def all_stored(paths: Iterable[Path]) -> list[Stored]:
    return [packet for path in paths for packet in stored(path)[1]]


def video_at(i: int) -> int:
    return BASE_US + i * FRAME_US


def audio_at(i: int) -> int:
    return BASE_US + i * CHUNK_US


def offer_av(
    recorder: Recorder,
    video: Sequence[int],
    audio: Sequence[int],
    *,
    late: bool,
    audio_lag_us: int = 0,
) -> None:
    """Video frames and audio chunks, each stream in capture order, the two interleaved as
    two connections deliver them: the audio ``audio_lag_us`` of capture time behind."""
    events = [(video_at(i), StreamKind.VIDEO, i) for i in video]
    events += [(audio_at(i) + audio_lag_us, StreamKind.AUDIO, i) for i in audio]
    for _, kind, i in sorted(events):
        if kind is StreamKind.VIDEO:
            recorder.frame(info(kind), received(i, video_at(i), jpeg(i % 50), late))
        else:
            recorder.frame(info(kind), received(i, audio_at(i), pcm(i), late))


def chunks_between(start_us: int, end_us: int) -> range:
    """The audio chunks captured in [start_us, end_us)."""
    return range(-(-(start_us - BASE_US) // CHUNK_US), -(-(end_us - BASE_US) // CHUNK_US))


def test_late_frames_before_the_live_segment_go_to_a_backfill_segment(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.3)
    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.stream_started(info(StreamKind.AUDIO))
    live_video, live_audio = range(200, 400), chunks_between(video_at(200), video_at(400))
    late_video, late_audio = range(200), chunks_between(BASE_US, video_at(200))
    offer_av(recorder, live_video, live_audio, late=False, audio_lag_us=120_000)
    offer_av(recorder, late_video, late_audio, late=True, audio_lag_us=1_500_000)
    recorder.stream_ended(info(StreamKind.VIDEO))
    recorder.stream_ended(info(StreamKind.AUDIO))
    recorder.close()

    files = segments(tmp_path)
    assert len(files) == 2
    (backfill,) = [p for p in files if p.name.endswith("Z-backfill.mkv")]
    (live,) = [p for p in files if p != backfill]
    for path, video, audio in ((live, live_video, live_audio), (backfill, late_video, late_audio)):
        tags, packets = stored(path)
        assert tags["AVD_SENDER"] == "cam1"
        assert (tags.get("AVD_BACKFILL") == "1") == (path == backfill)
        got_video = [p for p in packets if p.kind == "video"]
        got_audio = [p for p in packets if p.kind == "audio"]
        assert [p.capture_us for p in got_video] == [video_at(i) for i in video]
        assert [p.data for p in got_video] == [jpeg(i % 50) for i in video]
        assert [p.capture_us for p in got_audio] == [audio_at(i) for i in audio]
        assert [p.data for p in got_audio] == [pcm(i) for i in audio]
        assert [p.pts_ms for p in packets] == sorted(p.pts_ms for p in packets), "capture order"
        # Both tracks sit at their capture times on one clock: aligned with each other.
        assert all(abs(p.at_us - p.capture_us) < 1000 for p in got_video)
        assert all(abs(p.at_us - p.capture_us) < 2000 for p in got_audio)
    live_start, backfill_start = (parse_segment_start(p.name) for p in (live, backfill))
    assert live_start is not None
    assert backfill_start is not None
    assert abs((live_start - backfill_start).total_seconds() - 10.0) < 1.0, "named by capture"
    assert backfill_start.date().isoformat() == backfill.parent.name
    stats = recorder.stats()["cam1"]
    assert stats.late_recorded == len(late_video) + len(late_audio)
    assert (stats.backfill_segments, stats.segments_opened) == (1, 2)
    assert stats.given_up == stats.duplicates == 0


def test_backfill_rolls_and_closes_when_the_spool_is_done(tmp_path: Path) -> None:
    recorder = Recorder(
        tmp_path,
        segment_seconds=2.0,
        retention=NO_RETENTION,
        interleave_grace=0.2,
        backfill_idle_s=0.5,
    )
    recorder.stream_started(info(StreamKind.VIDEO))
    offer_av(recorder, range(100, 110), range(0), late=False)
    offer_av(recorder, range(100), range(0), late=True)  # 5 s of spool: three segments
    wait_until(lambda: recorder.stats()["cam1"].late_recorded == 100)
    wait_until(lambda: recorder.backfill_segment("cam1") is None)  # idle: closed
    assert recorder.current_segment("cam1") is not None, "the live segment stays open"
    offer_av(recorder, range(110, 120), range(0), late=False)
    recorder.close()

    backfill = [p for p in segments(tmp_path) if "backfill" in p.name]
    assert len(backfill) == 3
    firsts = [stored(p)[1][0].capture_us for p in backfill]
    assert firsts == [video_at(0), video_at(40), video_at(80)], "rolled every 2 s of capture"
    assert [p.capture_us for p in all_stored(backfill)] == [video_at(i) for i in range(100)]
    assert recorder.stats()["cam1"].backfill_segments == 3


def test_spool_of_two_outages_makes_two_backfill_segments(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.2)
    recorder.stream_started(info(StreamKind.VIDEO))
    offer_av(recorder, range(1000, 1010), range(0), late=False)
    offer_av(recorder, [*range(20), *range(600, 620)], range(0), late=True)
    recorder.close()
    backfill = [p for p in segments(tmp_path) if "backfill" in p.name]
    assert [len(stored(p)[1]) for p in backfill] == [20, 20]


def test_retention_deletes_backfill_segments_by_their_capture_time(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.2)
    recorder.stream_started(info(StreamKind.VIDEO))
    offer_av(recorder, range(1000, 1020), range(0), late=False)
    offer_av(recorder, range(20), range(0), late=True)
    recorder.close()
    files = segments(tmp_path)
    assert len(files) == 2
    sizes = sum(p.stat().st_size for p in files)
    live = next(p for p in files if "backfill" not in p.name)

    pruning = Recorder(
        tmp_path, retention=RetentionPolicy(max_total_bytes=sizes - 1), retention_seconds=0.05
    )
    wait_until(lambda: segments(tmp_path) == [live])  # the older one, by its name, goes first
    pruning.close()


def test_a_spool_lagging_far_behind_the_other_is_recorded_without_a_storm_of_segments(
    tmp_path: Path,
) -> None:
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.1, backfill_idle_s=0.3)
    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.stream_started(info(StreamKind.AUDIO))
    offer_av(recorder, range(200, 220), chunks_between(video_at(200), video_at(220)), late=False)
    late_audio = chunks_between(BASE_US, video_at(100))
    offer_av(recorder, range(100), late_audio[:20], late=True)
    wait_until(lambda: recorder.stats()["cam1"].late_recorded >= 100)  # video went out alone
    offer_av(recorder, range(0), late_audio[20:], late=True)
    recorder.close()

    backfill = [p for p in segments(tmp_path) if "backfill" in p.name]
    assert 1 <= len(backfill) <= 2
    packets = all_stored(backfill)
    assert sorted(p.capture_us for p in packets if p.kind == "video") == [
        video_at(i) for i in range(100)
    ]
    assert sorted(p.capture_us for p in packets if p.kind == "audio") == [
        audio_at(i) for i in late_audio
    ]
    for path in backfill:
        for kind in ("video", "audio"):
            times = [p.pts_ms for p in stored(path)[1] if p.kind == kind]
            assert times == sorted(set(times)), f"{kind} of {path.name} in order"
    assert recorder.stats()["cam1"].given_up == 0
