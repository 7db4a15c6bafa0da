"""avd.media.recorder through its MediaSink interface, on real files and real file systems.

The sink methods are called directly, as the receiver's event loop would; every check opens
the resulting Matroska files again with PyAV. The full-disk test mounts a real 2 MiB tmpfs
(skipped, saying why, where mounting is not permitted); the crash test kills a real writer
process with SIGKILL.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from avd.clock import monotonic_us
from avd.logs import LogEvent
from avd.media import recorder as recorder_module
from avd.media import recorder_process
from avd.media.base import (
    AudioFormat,
    ReceivedFrame,
    SinkEvent,
    StreamInfo,
    StreamKind,
    VideoFormat,
)
from avd.media.done import RecorderStats
from avd.media.recorder import FrameDone, Recorder
from avd.media.retention import RetentionPolicy
from avd.media.segment import ClosedSegment

REPO = Path(__file__).resolve().parent.parent
VIDEO = VideoFormat(width=640, height=480, fps=20, quality=70)
AUDIO = AudioFormat(rate=44100, channels=1, sample_width=2, chunk=1024)
CHUNK_US = 1024 * 1_000_000 // 44100
BASE_US = 9_000_000_000
NAME = re.compile(r"\d{8}T\d{6}(\.\d{3})?Z(-\d+)?\.mkv")
NO_RETENTION = RetentionPolicy()


def counted(recorder: Recorder, sender_id: str = "cam1") -> RecorderStats:
    """A sender's counters, zero until the writer thread has seen its first stream (waiting
    on ``stats()["cam1"]`` would raise KeyError if the writer is a moment late)."""
    return recorder.stats().get(sender_id, RecorderStats())


def jpeg(n: int, noise: bool = False) -> bytes:
    rng = np.random.default_rng(n)
    top = 255 if noise else 60
    image = rng.integers(0, top, (480, 640, 3), dtype=np.uint8)
    cv2.putText(image, f"{n}", (40, 240), cv2.FONT_HERSHEY_SIMPLEX, 4, (255, 255, 255), 6)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    return bytes(encoded.tobytes())


def pcm(n: int) -> bytes:
    samples = np.zeros(1024, np.int16)
    samples[:2] = (n & 0x7FFF, n >> 15)
    return samples.tobytes()


def info(kind: StreamKind, sender: str = "cam1", session: int = 1) -> StreamInfo:
    fmt = VIDEO if kind is StreamKind.VIDEO else AUDIO
    return StreamInfo(sender, kind, fmt, "127.0.0.1:5000", session)


def received(seq: int, capture_us: int, data: bytes, late: bool = False) -> ReceivedFrame:
    return ReceivedFrame(seq, capture_us, monotonic_us(), None, data, late)


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def segments(record_dir: Path, sender: str = "cam1") -> list[Path]:
    return sorted((record_dir / sender).glob("*/*.mkv"))


def demux(path: Path) -> list[tuple[str, int, bytes]]:
    """(stream type, pts in ms, payload) of every packet, in file order."""
    with av.open(str(path)) as container:
        return [(p.stream.type, p.pts or 0, bytes(p)) for p in container.demux() if p.size]


def feed_av(
    recorder: Recorder, seconds: float, *, audio_lag_us: int = 120_000
) -> tuple[list[bytes], list[bytes]]:
    """Video at 20 fps and audio chunks, the audio arriving ``audio_lag_us`` behind (two
    connections are never in step); returns what was sent."""
    frames = [jpeg(i) for i in range(round(seconds * 20))]
    chunks = [pcm(i) for i in range(int(seconds * 1_000_000 / CHUNK_US))]
    events = [(i * 50_000, StreamKind.VIDEO, i) for i in range(len(frames))]
    events += [(i * CHUNK_US + audio_lag_us, StreamKind.AUDIO, i) for i in range(len(chunks))]
    for arrival, kind, i in sorted(events):
        if kind is StreamKind.VIDEO:
            recorder.frame(info(kind), received(i, BASE_US + i * 50_000, frames[i]))
        else:
            recorder.frame(info(kind), received(i, BASE_US + i * CHUNK_US, chunks[i]))
        del arrival
    return frames, chunks


@pytest.fixture
def closed_segments() -> list[ClosedSegment]:
    return []


def test_segments_roll_and_every_frame_lands_in_exactly_one(
    tmp_path: Path, closed_segments: list[ClosedSegment]
) -> None:
    recorder = Recorder(
        tmp_path,
        segment_seconds=1.0,
        retention=NO_RETENTION,
        on_segment_closed=closed_segments.append,
    )
    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.stream_started(info(StreamKind.AUDIO))
    frames, chunks = feed_av(recorder, 4.5)
    recorder.stream_ended(info(StreamKind.VIDEO))
    recorder.stream_ended(info(StreamKind.AUDIO))
    recorder.close()

    files = segments(tmp_path)
    assert len(files) == 5
    assert [c.path for c in closed_segments] == files
    for path in files:
        assert NAME.fullmatch(path.name), path.name
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.parent.name)
    stored = [demux(path) for path in files]
    video = [data for packets in stored for kind, _, data in packets if kind == "video"]
    audio = [data for packets in stored for kind, _, data in packets if kind == "audio"]
    assert video == frames, "every frame in exactly one segment, in order"
    assert audio == chunks
    for packets in stored[1:]:
        first_video = next(pts for kind, pts, _ in packets if kind == "video")
        assert first_video == 0, "each rolled segment starts on a video frame"
    for packets in stored:
        pts = [pts for _, pts, _ in packets]
        assert pts == sorted(pts), "video and audio interleaved in capture order"
        video_seconds = sum(kind == "video" for kind, _, _ in packets) / 20
        audio_seconds = sum(kind == "audio" for kind, _, _ in packets) * 1024 / 44100
        assert abs(video_seconds - audio_seconds) < 0.1, "tracks of a segment agree"
    stats = recorder.stats()["cam1"]
    assert (stats.video_frames, stats.audio_chunks) == (len(frames), len(chunks))
    assert stats.segments_opened == 5
    assert stats.dropped == stats.not_recorded == stats.out_of_order == 0
    assert stats.bytes == sum(map(len, frames)) + sum(map(len, chunks))


def test_a_stream_starting_mid_segment_opens_a_segment_that_includes_it(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.2)
    recorder.stream_started(info(StreamKind.VIDEO))
    for i in range(30):  # 1.5 s of video alone: more than the grace, so video-only opens
        recorder.frame(info(StreamKind.VIDEO), received(i, BASE_US + i * 50_000, jpeg(i)))
    wait_until(lambda: counted(recorder).video_frames == 30)
    first = recorder.current_segment("cam1")
    recorder.stream_started(info(StreamKind.AUDIO))
    for i in range(30, 40):
        capture = BASE_US + i * 50_000
        recorder.frame(info(StreamKind.AUDIO), received(i, capture, pcm(i)))
        recorder.frame(info(StreamKind.VIDEO), received(i, capture + 1, jpeg(i)))
    recorder.close()

    files = segments(tmp_path)
    assert files[0] == first
    assert len(files) == 2
    with av.open(str(files[0])) as one, av.open(str(files[1])) as two:
        assert [s.type for s in one.streams] == ["video"]
        assert sorted(s.type for s in two.streams) == ["audio", "video"]
    assert sum(kind == "video" for kind, _, _ in demux(files[1])) == 10


def test_late_frames_join_the_live_segment_only_after_everything_in_it(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.1)
    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.frame(info(StreamKind.VIDEO), received(0, BASE_US, jpeg(0)))
    wait_until(lambda: recorder.current_segment("cam1") is not None)
    recorder.frame(info(StreamKind.VIDEO), received(1, BASE_US - 2_000_000, jpeg(1), late=True))
    recorder.frame(info(StreamKind.VIDEO), received(2, BASE_US + 100_000, jpeg(2), late=True))
    recorder.frame(info(StreamKind.VIDEO), received(3, BASE_US + 150_000, jpeg(3)))
    recorder.frame(info(StreamKind.VIDEO), received(4, BASE_US + 120_000, jpeg(4), late=True))
    recorder.close()

    stats = recorder.stats()["cam1"]
    assert (stats.video_frames, stats.late_recorded, stats.late_dropped) == (5, 3, 0)
    live, backfill = sorted(segments(tmp_path), key=lambda p: "backfill" in p.name)
    assert [data for _, _, data in demux(live)] == [jpeg(0), jpeg(2), jpeg(3)]
    assert backfill.name.endswith("Z-backfill.mkv")
    assert [data for _, _, data in demux(backfill)] == [jpeg(1), jpeg(4)]


@pytest.mark.parametrize("via", ["frame", "feed"])
@pytest.mark.parametrize("bound", ["frames", "bytes"])
def test_a_full_queue_drops_counts_and_logs_without_blocking(
    tmp_path: Path, bound: str, via: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Frame by frame, or a read's worth at once through ``feed``: the bound is the same."""
    caplog.set_level(logging.WARNING, "avd.media.recorder")
    release = threading.Event()

    def hold_writer(_: ClosedSegment) -> None:
        release.wait(30)

    three = sum(len(jpeg(i)) for i in range(1, 4))  # frames 1 to 3 fit, 4 does not
    recorder = Recorder(
        tmp_path,
        retention=NO_RETENTION,
        queue_frames=3 if bound == "frames" else 1000,
        queue_bytes=three if bound == "bytes" else None,
        interleave_grace=0.05,
        on_segment_closed=hold_writer,
    )
    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.frame(info(StreamKind.VIDEO), received(0, BASE_US, jpeg(0)))
    recorder.stream_ended(info(StreamKind.VIDEO))  # closing the segment stalls the writer
    wait_until(
        lambda: counted(recorder).segments_opened == 1 and recorder.current_segment("cam1") is None
    )
    second = info(StreamKind.VIDEO, session=2)
    frames = [received(i, BASE_US + i * 50_000, jpeg(i)) for i in range(1, 11)]
    if via == "frame":
        recorder.stream_started(second)
        for frame in frames:
            recorder.frame(second, frame)
    else:
        events = [SinkEvent("frame", second, frame) for frame in frames]
        recorder.feed([SinkEvent("start", second), *events, SinkEvent("end", second)])
    assert recorder.stats()["cam1"].dropped == 7
    (said,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert said.startswith("recorder: the writer is behind, its queue is full (")
    assert ("MiB, AVD_RECORD_BUFFER_MB)" in said) is (bound == "bytes"), said
    assert "(the first from cam1); is the disk slow" in said
    release.set()
    recorder.close()
    (summary,) = [r.getMessage() for r in caplog.records if "caught up" in r.getMessage()]
    assert summary.startswith("recorder: caught up; frames left out of the recordings: 7 over ")
    assert summary.endswith(" s (cam1 7)")
    assert recorder.stats()["cam1"].video_frames == 4
    kept = [data for path in segments(tmp_path) for _, _, data in demux(path)]
    assert sorted(kept) == sorted(jpeg(i) for i in range(4)), "the first three were kept"


def test_on_done_reports_every_frame_once_from_the_writer_thread_in_batches(
    tmp_path: Path,
) -> None:
    calls: list[tuple[str, list[FrameDone]]] = []
    release = threading.Event()

    def on_done(batch: Sequence[FrameDone]) -> None:
        calls.append((threading.current_thread().name, list(batch)))

    def hold_first_close(_: ClosedSegment) -> None:
        release.wait(30)

    recorder = Recorder(
        tmp_path,
        retention=NO_RETENTION,
        queue_frames=100,
        interleave_grace=0.1,
        on_done=on_done,
        on_segment_closed=hold_first_close,
    )
    offered: Counter[tuple[StreamKind, int]] = Counter()

    def offer(kind: StreamKind, frame: ReceivedFrame, session: int = 1) -> None:
        recorder.frame(info(kind, session=session), frame)
        offered[kind, frame.seq] += 1

    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.stream_started(info(StreamKind.AUDIO))
    for i in range(40):  # written
        offer(StreamKind.VIDEO, received(i, BASE_US + i * 50_000, jpeg(i)))
        offer(StreamKind.AUDIO, received(i, BASE_US + i * 50_000, pcm(i)))
    for i in range(10, 20):  # duplicates
        offer(StreamKind.VIDEO, received(i, BASE_US + i * 50_000, jpeg(i), late=True))
    wait_until(lambda: counted(recorder).video_frames == 40)
    offer(StreamKind.VIDEO, received(40, BASE_US + 25_000, jpeg(40)))  # out of order
    recorder.stream_ended(info(StreamKind.VIDEO))
    recorder.stream_ended(info(StreamKind.AUDIO))  # the close blocks the writer
    wait_until(lambda: recorder.current_segment("cam1") is None)
    recorder.stream_started(info(StreamKind.VIDEO, session=2))
    for i in range(41, 241):  # half of them find the queue full
        offer(StreamKind.VIDEO, received(i, BASE_US + i * 50_000, jpeg(i % 40)), session=2)
    release.set()
    recorder.close()

    reported = Counter((kind, seq) for _, batch in calls for _, kind, seq in batch)
    assert reported == offered, "each frame offered is reported exactly once"
    assert {name for name, _ in calls} == {"avd-recorder"}
    assert {sender for _, batch in calls for sender, _, _ in batch} == {"cam1"}
    assert len(calls) <= sum(offered.values()) / 5, "in batches"
    stats = recorder.stats()["cam1"]
    assert (stats.duplicates, stats.out_of_order, stats.dropped) == (10, 1, 100)
    written = stats.video_frames + stats.audio_chunks
    assert written + stats.duplicates + stats.given_up == sum(offered.values())


def test_a_frame_is_reported_done_only_once_its_packet_is_in_the_file(tmp_path: Path) -> None:
    checked: list[int] = []

    def on_done(batch: Sequence[FrameDone]) -> None:
        in_files = {(kind, seq) for path in segments(tmp_path) for kind, seq in stamps(path)}
        missing = [(kind.label, seq) for _, kind, seq in batch if (kind.label, seq) not in in_files]
        assert not missing, f"reported done before it was in the file: {missing}"
        checked.append(len(batch))

    errors: list[str] = []
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.1, on_done=on_done)
    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.stream_started(info(StreamKind.AUDIO))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("avd.media.recorder.log.exception", lambda msg, *a: errors.append(msg % a))
        started = time.monotonic()
        for i in range(40):  # 2 s of A/V in real time: reports come while segments grow
            capture = BASE_US + i * 50_000
            recorder.frame(info(StreamKind.VIDEO), received(i, capture, jpeg(i)))
            for j in (2 * i, 2 * i + 1):
                recorder.frame(info(StreamKind.AUDIO), received(j, BASE_US + j * CHUNK_US, pcm(j)))
            time.sleep(max(0.0, started + (i + 1) * 0.05 - time.monotonic()))
        before_close = sum(checked)
        recorder.close()
    assert errors == []
    assert 0 < before_close < 120, "frames were reported while the segment was open"
    assert sum(checked) == 120


def test_a_segment_deleted_while_written_is_followed_by_a_new_one_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone empties the recordings folder: without a check the rest of the 60 s segment
    would go into a file no one can open, acknowledged as recorded."""
    reported: Counter[tuple[StreamKind, int]] = Counter()
    recorder = Recorder(
        tmp_path,
        retention=NO_RETENTION,
        interleave_grace=0.1,
        on_done=lambda batch: reported.update((kind, seq) for _, kind, seq in batch),
    )
    recorder.stream_started(info(StreamKind.VIDEO))
    sent = 0

    def send(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            recorder.frame(
                info(StreamKind.VIDEO), received(sent, BASE_US + sent * 50_000, jpeg(sent))
            )
            sent += 1
            time.sleep(0.05)

    send(20)
    wait_until(lambda: len(reported) >= 15)  # the newest frames' cluster may still be open
    [first] = segments(tmp_path)
    first.unlink()
    kept_before = len(reported)
    while sent < 200 and segments(tmp_path) == []:
        send(1)
    send(5)
    recorder.stream_ended(info(StreamKind.VIDEO))
    recorder.close()
    [second] = segments(tmp_path)
    assert second != first
    in_second = [seq for kind, seq in stamps(second) if kind == "video"]
    assert in_second == list(range(sent - len(in_second), sent)), "every frame since"
    assert len(in_second) >= 5
    assert reported == Counter((StreamKind.VIDEO, seq) for seq in range(sent)), "each once"
    stats = recorder.stats()["cam1"]
    assert stats.video_frames + stats.not_recorded == sent
    in_first = stats.video_frames - len(in_second)  # counted as recorded before the deletion
    assert kept_before <= in_first <= 20
    assert stats.not_recorded >= 1, "what went into the deleted file after it is not recorded"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"segment {first} was deleted while being written" in w for w in warnings)


def stamps(path: Path) -> list[tuple[str, int]]:
    """(stream type, seq) of every packet's stamp in a segment (one being written too)."""
    found: list[tuple[str, int]] = []
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.size:
                raw = bytes(packet.get_sidedata("matroska_block_additional"))
                found.append((packet.stream.type, int.from_bytes(raw[-8:], "big")))
    return found


def test_unusable_sender_id_is_not_recorded(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec", retention=NO_RETENTION, interleave_grace=0.05)
    bad = info(StreamKind.VIDEO, sender="../escape")
    recorder.stream_started(bad)
    recorder.frame(bad, received(0, BASE_US, jpeg(0)))
    recorder.close()
    assert recorder.stats()["../escape"].not_recorded == 1
    assert list(tmp_path.rglob("*")) == []


def test_an_unrecordable_format_is_refused_with_one_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="avd.media")
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.05)
    audio = StreamInfo("cam1", StreamKind.AUDIO, AudioFormat(44100, 1, 4, 1024), "peer", 1)
    recorder.stream_started(audio)
    for i in range(5):
        recorder.frame(audio, received(i, BASE_US + i * 23_220, bytes(4096)))
    recorder.close()
    assert recorder.stats()["cam1"].not_recorded == 5
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("not recording cam1: ")
    assert "16-bit" in errors[0]
    assert segments(tmp_path) == []


def test_latest_jpeg_follows_the_video_at_most_once_a_second(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, retention=NO_RETENTION)
    latest = tmp_path / "cam1" / "latest.jpg"
    versions: set[tuple[int, int]] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                st = latest.stat()
                versions.add((st.st_ino, st.st_mtime_ns))  # each os.replace: a new file
            except FileNotFoundError:
                pass
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    recorder.stream_started(info(StreamKind.VIDEO))
    started = time.monotonic()
    for i in range(50):  # 2.5 s at 20 fps, paced in real time
        recorder.frame(info(StreamKind.VIDEO), received(i, BASE_US + i * 50_000, jpeg(i)))
        time.sleep(max(0.0, started + (i + 1) * 0.05 - time.monotonic()))
    elapsed = time.monotonic() - started
    recorder.close()
    stop.set()
    watcher.join()

    image = cv2.imdecode(np.frombuffer(latest.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    assert image.shape == (480, 640, 3)
    assert 2 <= len(versions) <= int(elapsed) + 2
    assert sorted(p.name for p in latest.parent.iterdir() if p.is_file()) == ["latest.jpg"]


CRASH_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tests.test_recorder import AUDIO, BASE_US, CHUNK_US, info, jpeg, pcm, received
    from avd.media.base import StreamKind
    from avd.media.recorder import FrameDone, Recorder
    from avd.media.retention import RetentionPolicy

    recorder = Recorder(Path(sys.argv[1]), retention=RetentionPolicy())
    recorder.stream_started(info(StreamKind.VIDEO))
    recorder.stream_started(info(StreamKind.AUDIO))
    start, chunk = time.monotonic(), 0
    for i in range(100_000):  # 20 fps in real time, with its audio
        capture = BASE_US + i * 50_000
        while BASE_US + chunk * CHUNK_US <= capture:
            stamp = BASE_US + chunk * CHUNK_US
            recorder.frame(info(StreamKind.AUDIO), received(chunk, stamp, pcm(chunk)))
            chunk += 1
        recorder.frame(info(StreamKind.VIDEO), received(i, capture, jpeg(i % 40)))
        print(recorder.stats()["cam1"].video_frames, flush=True)
        time.sleep(max(0.0, start + (i + 1) * 0.05 - time.monotonic()))
    """
)


def test_a_segment_killed_mid_write_keeps_all_but_the_last_second(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_WRITER, str(tmp_path), str(REPO)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    written = 0
    try:
        for line in proc.stdout:
            written = int(line)
            if written >= 50:  # 2.5 s of video recorded
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert written >= 50, "the writer process died before recording"
    (path,) = segments(tmp_path)
    packets = demux(path)
    video = [data for kind, _, data in packets if kind == "video"]
    assert len(video) >= written - VIDEO.fps, f"{written} written, {len(video)} survived"
    assert video == [jpeg(i % 40) for i in range(len(video))]
    assert any(kind == "audio" for kind, _, _ in packets)


def test_full_disk_pauses_once_and_resumes_by_itself(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="avd.media")
    filler = small_fs / "filler"
    filler.write_bytes(os.urandom(1024 * 1024))
    record_dir = small_fs / "recordings"
    recorder = Recorder(
        record_dir, retention=NO_RETENTION, retry_seconds=0.2, interleave_grace=0.05
    )
    video = info(StreamKind.VIDEO)
    recorder.stream_started(video)
    sent = 0

    def send(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            recorder.frame(
                video, received(sent, BASE_US + sent * 50_000, jpeg(sent % 7, noise=True))
            )
            sent += 1
            time.sleep(0.01)

    def handled() -> int:
        s = recorder.stats()["cam1"]
        return s.video_frames + s.not_recorded

    while not recorder.paused("cam1"):
        assert sent < 200, "a 2 MiB file system never filled up"
        send(1)
        wait_until(lambda: handled() == sent)
    send(20)  # the sink keeps accepting frames while paused
    wait_until(lambda: handled() == sent)
    paused = recorder.stats()["cam1"]
    assert paused.not_recorded >= 20
    assert recorder.current_segment("cam1") is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "recording paused" in message
    assert "No space left on device" in message
    assert "live streaming continues" in message
    assert getattr(errors[0], "avd_event", None) is LogEvent.RECORDING_PAUSED

    filler.unlink()  # room for about six frames: one at a time, so that none queue up
    deadline = time.monotonic() + 15
    while recorder.paused("cam1"):
        assert time.monotonic() < deadline, "recording did not resume"
        send(1)
        wait_until(lambda: handled() == sent)
    send(3)
    recorder.close()
    resumed = [r for r in caplog.records if "recording resumed" in r.getMessage()]
    assert len(resumed) == 1
    assert getattr(resumed[0], "avd_event", None) is LogEvent.RECORDING_RESUMED
    assert getattr(resumed[0], "avd_fields", None) == {"sender_id": "cam1"}
    assert recorder.stats()["cam1"].video_frames > paused.video_frames
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    files = segments(record_dir)
    assert len(files) >= 2
    for path in files:
        assert path.stat().st_size > 0, f"{path} is empty"
        assert any(kind == "video" for kind, _, _ in demux(path)), f"{path} holds no frame"


def test_the_writer_waits_a_second_when_no_stream_is_open(tmp_path: Path) -> None:
    """An idle receiver's recorder wakes once a second; an open stream gets its shorter ticks
    back (just longer than the receiver's batches, which carry them)."""
    tick, idle = recorder_module._TICK_SECONDS, recorder_module._IDLE_TICK_SECONDS
    assert tick > recorder_process._FLUSH_DELAY_S
    assert idle > tick  # else there would be nothing to test
    recorder = Recorder(tmp_path, retention=NO_RETENTION, interleave_grace=0.05)
    waits: list[float] = []
    next_events = recorder._next_events

    def noting_waits(wait_s: float) -> list[SinkEvent]:
        waits.append(wait_s)
        return next_events(min(wait_s, 0.05))  # the same choices, made quickly

    recorder._next_events = noting_waits  # type: ignore[method-assign]
    try:
        wait_until(lambda: waits[-3:] == [idle] * 3)  # quiet, no stream: a second at a time
        recorder.stream_started(info(StreamKind.VIDEO))
        wait_until(lambda: waits[-3:] == [tick] * 3)
        recorder.stream_ended(info(StreamKind.VIDEO))
        wait_until(lambda: waits[-3:] == [idle] * 3)
    finally:
        recorder.close()
