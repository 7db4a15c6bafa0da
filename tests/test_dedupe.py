"""Frames sent twice are recorded once: within one recorder, and across a receiver killed with
SIGKILL and started again (a real writer process, killed mid-stream).

Every check counts the packets of all of a sender's segments by capture time, read back with
PyAV both from the packets' stamps and from pts + the segment's AVD_START_US tag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

from avd.media.base import StreamKind
from avd.media.recorded_index import RecordedIndex, recent_segments, recorded_stamps
from avd.media.recorder import FrameDone, Recorder
from avd.media.retention import RetentionPolicy
from avd.media.segment import SegmentWriter, part_path
from tests.test_backfill import (
    all_stored,
    audio_at,
    chunks_between,
    offer_av,
    stored,
    video_at,
)
from tests.test_recorder import (
    AUDIO,
    REPO,
    VIDEO,
    info,
    jpeg,
    pcm,
    received,
    segments,
    wait_until,
)

NO_RETENTION = RetentionPolicy()


def recorded_times(record_dir: Path) -> tuple[Counter[int], Counter[int]]:
    """How many times each capture time is recorded, video and audio, across all segments."""
    packets = all_stored(segments(record_dir))
    video = [p for p in packets if p.kind == "video"]
    assert all(abs(p.at_us - p.capture_us) < 1000 for p in video), "pts agrees with the stamp"
    return (
        Counter(p.capture_us for p in video),
        Counter(p.capture_us for p in packets if p.kind == "audio"),
    )


def exactly_once(counts: Counter[int], expected: list[int]) -> None:
    assert sorted(counts) == expected, "every frame is recorded"
    repeated = {t: n for t, n in counts.items() if n > 1}
    assert not repeated, f"recorded more than once: {repeated}"


def test_frames_offered_twice_are_written_once(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.2)
    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.stream_started(info(StreamKind.AUDIO))
    audio = chunks_between(video_at(0), video_at(100))
    offer_av(recorder, range(100), audio, late=False)
    offer_av(recorder, range(100), audio, late=True)  # a sender that never got the acks
    offer_av(recorder, range(90, 100), range(0), late=False)  # or sent them again live
    recorder.close()

    video_times, audio_times = recorded_times(tmp_path)
    exactly_once(video_times, [video_at(i) for i in range(100)])
    exactly_once(audio_times, [audio_at(i) for i in audio])
    stats = recorder.stats()["cam1"]
    assert stats.duplicates == 100 + len(audio) + 10
    assert (stats.video_frames, stats.audio_chunks, stats.given_up) == (100, len(audio), 0)


def test_a_frame_given_up_is_recorded_when_sent_again(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.05)
    video = info(StreamKind.VIDEO)
    recorder.stream_started(video)
    recorder.frame(video, received(0, video_at(0), jpeg(0)))
    recorder.frame(video, received(2, video_at(2), jpeg(2)))
    wait_until(lambda: recorder.stats()["cam1"].video_frames == 2)
    recorder.frame(video, received(1, video_at(1), jpeg(1)))  # behind the segment: given up
    wait_until(lambda: recorder.stats()["cam1"].out_of_order == 1)
    recorder.frame(video, received(1, video_at(1), jpeg(1), late=True))  # the spool re-sends it
    recorder.close()
    video_times, _ = recorded_times(tmp_path)
    exactly_once(video_times, [video_at(i) for i in range(3)])
    assert recorder.stats()["cam1"].duplicates == 0


def write_segment(path: Path, sender: str, frames: range) -> None:
    writer = SegmentWriter(
        path, sender_id=sender, start_us=video_at(frames[0]), video=VIDEO, audio=AUDIO
    )
    for i in frames:
        assert writer.write_video(video_at(i), jpeg(i % 50), seq=i)
        assert writer.write_audio(video_at(i) + 1000, pcm(i), seq=i)
    writer.close()


def test_the_index_reads_recent_segments_of_its_sender_only(tmp_path: Path) -> None:
    day = tmp_path / "cam1" / "2026-11-24"
    day.mkdir(parents=True)
    write_segment(day / "20261124T000000Z.mkv", "cam1", range(10))
    write_segment(day / "20261124T000100Z.mkv", "cam1", range(10, 20))
    write_segment(day / "20261124T000200Z.mkv", "cam2", range(20, 30))  # not cam1's
    old = time.time() - 600
    os.utime(day / "20261124T000000Z.mkv", (old, old))  # written before the window
    leftover = part_path(day / "20261124T000300Z.mkv")  # a writer killed before publishing it
    leftover.write_bytes(b"\x1a\x45\xdf\xa3")

    index = RecordedIndex(120.0)
    load = index.load(tmp_path / "cam1", "cam1")
    assert (load.files, load.frames) == (2, 20)
    assert [index.seen(StreamKind.VIDEO, video_at(i)) for i in (5, 10, 19, 25)] == [
        False,
        True,
        True,
        False,
    ]
    assert index.seen(StreamKind.AUDIO, video_at(12) + 1000)
    assert not index.seen(StreamKind.AUDIO, video_at(12))
    assert len(recent_segments(tmp_path / "cam1", time.time() - 120)) == 2
    assert not leftover.exists(), "what a killed writer left unpublished is removed"


def test_a_segment_cut_short_is_indexed_up_to_the_cut(tmp_path: Path) -> None:
    path = tmp_path / "seg.mkv"
    write_segment(path, "cam1", range(40))
    full = recorded_stamps(path, "cam1")
    assert len(full) == 80
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)
    cut = recorded_stamps(path, "cam1")
    assert 20 < len(cut) < 80
    assert cut == full[: len(cut)]


def test_the_index_forgets_by_age_and_by_count() -> None:
    index = RecordedIndex(120.0, max_per_kind=3)
    now = time.time()
    for t in range(5):  # one a second: the cap forgets the oldest seconds
        index.claim(StreamKind.VIDEO, t, now - 5 + t)
    assert [index.seen(StreamKind.VIDEO, t) for t in range(5)] == [False, False, True, True, True]
    for t in range(5, 10):  # a burst within the current second is never cut
        index.claim(StreamKind.VIDEO, t)
    assert all(index.seen(StreamKind.VIDEO, t) for t in range(5, 10))
    index.claim(StreamKind.AUDIO, 7, time.time() - 200)
    index.claim(StreamKind.AUDIO, 8)
    assert not index.seen(StreamKind.AUDIO, 7)
    index.release(StreamKind.AUDIO, 8)
    assert not index.seen(StreamKind.AUDIO, 8)


CRASHING_RECEIVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from avd.media.base import StreamKind
    from avd.media.recorder import Recorder
    from avd.media.retention import RetentionPolicy
    from tests.test_backfill import chunks_between, offer_av, video_at
    from tests.test_recorder import info

    def on_done(batch):
        print("\\n".join(f"done {kind.label} {seq}" for _, kind, seq in batch), flush=True)

    recorder = Recorder(
        Path(sys.argv[1]), retention=RetentionPolicy(), interleave_grace=0.2, on_done=on_done
    )
    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.stream_started(info(StreamKind.AUDIO))
    offer_av(recorder, range(100), chunks_between(video_at(0), video_at(100)), late=False)
    print("fed", flush=True)
    time.sleep(60)
    """
)


def crash_after(record_dir: Path, video_done: int) -> set[tuple[str, int]]:
    """Run a receiver's recorder in a process; SIGKILL it once ``video_done`` frames are
    reported done. Returns the (kind, seq) it reported."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RECEIVER, str(record_dir), str(REPO)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    done: set[tuple[str, int]] = set()
    try:
        for line in proc.stdout:
            if line.startswith("done "):
                kind, seq = line.split()[1:]
                done.add((kind, int(seq)))
            if sum(kind == "video" for kind, _ in done) >= video_done:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    return done


def test_after_a_kill_9_frames_sent_again_are_recorded_exactly_once(tmp_path: Path) -> None:
    acked = crash_after(tmp_path, video_done=70)
    assert sum(kind == "video" for kind, _ in acked) >= 70, "the writer died before writing"
    crashed = all_stored(segments(tmp_path))
    on_disk = {(p.kind, p.seq) for p in crashed}
    assert acked <= on_disk, "only frames in the file are reported done"
    assert len({p.seq for p in crashed if p.kind == "video"}) < 100, "killed mid-stream"

    # The restarted receiver gets live frames 100..149 at once, and behind them the sender's
    # unacknowledged frames from 50 (some recorded before the crash, some lost with it).
    done: list[FrameDone] = []
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.2, on_done=done.extend)
    recorder.stream_started(info(StreamKind.VIDEO, session=2))
    recorder.stream_started(info(StreamKind.AUDIO, session=2))
    for start in range(0, 50, 10):
        live_video = range(100 + start, 110 + start)
        offer_av(
            recorder,
            live_video,
            chunks_between(video_at(live_video[0]), video_at(live_video[-1] + 1)),
            late=False,
        )
        late_video = range(50 + start, 60 + start)
        offer_av(
            recorder,
            late_video,
            chunks_between(video_at(late_video[0]), video_at(late_video[-1] + 1)),
            late=True,
        )
    recorder.close()

    video_times, audio_times = recorded_times(tmp_path)
    exactly_once(video_times, [video_at(i) for i in range(150)])
    exactly_once(audio_times, [audio_at(i) for i in chunks_between(video_at(0), video_at(150))])
    stats = recorder.stats()["cam1"]
    assert stats.duplicates >= 20, "what the crashed process had recorded was not written again"
    assert stats.given_up == 0
    offered = 100 + len(chunks_between(video_at(50), video_at(150)))
    assert len(done) == offered, "every frame offered is reported done"


def test_segments_say_whose_they_are_and_where_pts_0_is(tmp_path: Path) -> None:
    sender, path = "cam1", tmp_path / "s.mkv"
    write_segment(path, sender, range(5, 8))
    tags, packets = stored(path)
    assert (tags["AVD_SENDER"], int(tags["AVD_START_US"])) == (sender, video_at(5))
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "format_tags",
            "-of",
            "default=nw=1",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert f"TAG:AVD_SENDER={sender}" in probe.stdout
    assert f"TAG:AVD_START_US={video_at(5)}" in probe.stdout
    assert [p.seq for p in packets if p.kind == "video"] == [5, 6, 7]
