"""avd.media.segment: real Matroska files by stream copy, opened again with PyAV and ffprobe.

Frames are real JPEGs (cv2, 640x480, quality 70) each carrying its number, and PCM chunks
(1024 frames, 44.1 kHz mono int16) each carrying its own; every stored packet is compared
byte for byte with what was written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from avd.media.base import AudioFormat, StreamKind, VideoFormat
from avd.media.mkvblocks import ClusterScanner
from avd.media.segment import (
    SegmentWriter,
    check_path_component,
    parse_segment_start,
    part_path,
    segment_path,
)

VIDEO = VideoFormat(width=640, height=480, fps=20, quality=70)
AUDIO = AudioFormat(rate=44100, channels=1, sample_width=2, chunk=1024)
BASE_US = 7_000_000_000  # an arbitrary point on the sender's monotonic clock


def jpeg(n: int) -> bytes:
    rng = np.random.default_rng(n)
    image = rng.integers(0, 60, (480, 640, 3), dtype=np.uint8)
    cv2.putText(image, f"frame {n}", (40, 240), cv2.FONT_HERSHEY_SIMPLEX, 3, (255, 255, 255), 5)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    return bytes(encoded.tobytes())


def pcm(n: int) -> bytes:
    t = np.arange(1024) + n * 1024
    samples = (8000 * np.sin(2 * np.pi * 440 * t / 44100)).astype(np.int16)
    samples[0] = n  # makes every chunk distinct
    return samples.tobytes()


@dataclass(frozen=True)
class Stored:
    """One packet as demuxed from the file; times in the file's time base."""

    data: bytes
    pts: int
    duration: int
    keyframe: bool
    time_base: Fraction


def packets_by_type(path: Path) -> dict[str, list[Stored]]:
    found: dict[str, list[Stored]] = {"video": [], "audio": []}
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.size:
                assert packet.pts is not None
                assert packet.time_base is not None
                stored = Stored(
                    bytes(packet),
                    packet.pts,
                    packet.duration or 0,
                    packet.is_keyframe,
                    packet.time_base,
                )
                found[packet.stream.type].append(stored)
    return found


def write_av_segment(path: Path, seconds: float) -> tuple[list[bytes], list[bytes]]:
    """Video at 20 fps and audio chunks with ±3 ms capture jitter, for ``seconds``."""
    writer = SegmentWriter(path, sender_id="cam1", start_us=BASE_US, video=VIDEO, audio=AUDIO)
    frames = [jpeg(i) for i in range(round(seconds * VIDEO.fps))]
    chunks = [pcm(i) for i in range(int(seconds * AUDIO.rate / AUDIO.chunk) + 1)]
    jitter = np.random.default_rng(1).integers(-3000, 3000, len(chunks))
    events = [(BASE_US + i * 50_000, "v", i) for i in range(len(frames))]
    events += [
        (BASE_US + i * 1024 * 1_000_000 // 44100 + (int(j) if i else 0), "a", i)
        for i, j in enumerate(jitter)
    ]
    for capture_us, kind, i in sorted(events):
        if kind == "v":
            assert writer.write_video(capture_us, frames[i])
        else:
            assert writer.write_audio(capture_us, chunks[i])
    closed = writer.close()
    assert closed.kept
    assert (closed.video_frames, closed.audio_chunks) == (len(frames), len(chunks))
    assert closed.bytes == sum(map(len, frames)) + sum(map(len, chunks))
    return frames, chunks


def test_segment_holds_every_packet_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "seg.mkv"
    frames, chunks = write_av_segment(path, 3.0)

    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.width, video.height) == ("mjpeg", 640, 480)
        assert (audio.codec_context.name, audio.rate, audio.channels) == ("pcm_s16le", 44100, 1)
    stored = packets_by_type(path)
    assert [p.data for p in stored["video"]] == frames
    assert [p.data for p in stored["audio"]] == chunks
    for packets in stored.values():
        pts = [p.pts for p in packets]
        assert pts == sorted(set(pts)), "pts must be strictly increasing per stream"
        assert all(p.keyframe for p in packets)


def test_audio_and_video_durations_agree(tmp_path: Path) -> None:
    path = tmp_path / "seg.mkv"
    write_av_segment(path, 3.0)
    stored = packets_by_type(path)
    last = stored["video"][-1]
    video_seconds = float((last.pts + last.duration) * last.time_base)
    with av.open(str(path)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    audio_seconds = samples / 44100
    assert video_seconds == pytest.approx(3.0, abs=0.06)
    assert abs(audio_seconds - video_seconds) < 0.1
    # The audio's timestamps follow its sample count: gapless despite the capture jitter.
    first_audio = stored["audio"][0]
    end_audio = stored["audio"][-1].pts + stored["audio"][-1].duration - first_audio.pts
    assert end_audio / 1000 == pytest.approx(audio_seconds, abs=0.002)


def test_ffprobe_reads_the_segment_as_a_player_would(tmp_path: Path) -> None:
    path = tmp_path / "seg.mkv"
    frames, chunks = write_av_segment(path, 3.0)
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-count_packets", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.stderr == ""
    streams = {s["codec_type"]: s for s in json.loads(result.stdout)["streams"]}
    video, audio = streams["video"], streams["audio"]
    assert (video["codec_name"], video["width"], video["height"]) == ("mjpeg", 640, 480)
    assert int(video["nb_read_packets"]) == len(frames)
    assert (audio["codec_name"], audio["sample_rate"], audio["channels"]) == (
        "pcm_s16le",
        "44100",
        1,
    )
    assert int(audio["nb_read_packets"]) == len(chunks)


def test_refuses_frames_that_do_not_move_forward(tmp_path: Path) -> None:
    writer = SegmentWriter(
        tmp_path / "s.mkv", sender_id="c", start_us=BASE_US, video=VIDEO, audio=AUDIO
    )
    assert not writer.write_video(BASE_US - 1, jpeg(0)), "before the segment start"
    assert writer.write_video(BASE_US, jpeg(0))
    assert not writer.write_video(BASE_US, jpeg(1)), "same capture time"
    assert writer.write_video(BASE_US + 200, jpeg(2)), "same millisecond, later capture"
    assert writer.write_audio(BASE_US, pcm(0))
    assert not writer.write_audio(BASE_US - 30_000, pcm(1)), "overlaps the previous chunk"
    closed = writer.close()
    assert (closed.video_frames, closed.audio_chunks) == (2, 1)
    video = packets_by_type(closed.path)["video"]
    assert [p.pts for p in video] == [0, 1], "a shared millisecond is nudged, never repeated"


def test_audio_gap_is_kept_as_a_gap(tmp_path: Path) -> None:
    writer = SegmentWriter(
        tmp_path / "s.mkv", sender_id="c", start_us=BASE_US, video=None, audio=AUDIO
    )
    assert writer.write_audio(BASE_US, pcm(0))
    assert writer.write_audio(BASE_US + 1_000_000, pcm(1))  # 40-odd chunks were lost
    audio = packets_by_type(writer.close().path)["audio"]
    assert [p.pts for p in audio] == [0, 1000]


def test_segment_without_packets_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "day" / "empty.mkv"
    closed = SegmentWriter(path, sender_id="c", start_us=0, video=VIDEO, audio=None).close()
    assert not closed.kept
    assert not path.exists()


def test_unsupported_audio_is_refused_before_a_file_exists(tmp_path: Path) -> None:
    path = tmp_path / "s.mkv"
    with pytest.raises(ValueError, match="16-bit"):
        SegmentWriter(
            path, sender_id="c", start_us=0, video=None, audio=AudioFormat(8000, 9, 2, 160)
        )
    assert not path.exists()


def test_segment_path_layout_and_uniqueness(tmp_path: Path) -> None:
    start = datetime(2026, 11, 24, 3, 15, 0, 123456, tzinfo=UTC)
    first = segment_path(tmp_path, "cam1", start)
    assert first == tmp_path / "cam1" / "2026-11-24" / "20261124T031500Z.mkv"
    first.parent.mkdir(parents=True)
    first.touch()
    second = segment_path(tmp_path, "cam1", start)
    assert second.name == "20261124T031500.123Z.mkv"
    second.touch()
    third = segment_path(tmp_path, "cam1", start)
    assert third.name == "20261124T031500.123Z-2.mkv"
    for path in (first, second, third):
        parsed = parse_segment_start(path.name)
        assert parsed is not None
        assert abs((parsed - start).total_seconds()) < 1
    assert parse_segment_start("latest.jpg") is None
    assert parse_segment_start("notes.mkv") is None


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", ".hidden", "x" * 200, "cam 1"])
def test_sender_ids_that_are_not_folder_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="sender id"):
        check_path_component(bad)


def test_matroska_time_base_is_milliseconds(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path / "s.mkv", sender_id="c", start_us=0, video=VIDEO, audio=None)
    writer.write_video(0, jpeg(0))
    writer.write_video(50_000, jpeg(1))
    video = packets_by_type(writer.close().path)["video"]
    assert video[1].time_base == Fraction(1, 1000)
    assert [p.pts for p in video] == [0, 50]
    assert [p.duration for p in video] == [50, 50]


def test_backfill_segment_names_never_collide_with_live_ones(tmp_path: Path) -> None:
    start = datetime(2026, 11, 24, 3, 15, 0, 123456, tzinfo=UTC)
    live = segment_path(tmp_path, "cam1", start)
    first = segment_path(tmp_path, "cam1", start, backfill=True)
    assert first.name == "20261124T031500.123Z-backfill.mkv"
    assert first.parent == live.parent
    first.parent.mkdir(parents=True)
    first.touch()
    second = segment_path(tmp_path, "cam1", start, backfill=True)
    assert second.name == "20261124T031500.123Z-backfill-2.mkv"
    for path in (first, second):
        assert parse_segment_start(path.name) == start.replace(microsecond=123000)


def test_packets_are_reported_durable_as_they_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.mkv"
    writer = SegmentWriter(path, sender_id="c", start_us=BASE_US, video=None, audio=AUDIO)
    durable: list[int] = []
    for i in range(65):  # 1.5 s of audio alone: no video frame cuts its clusters
        assert writer.write_audio(BASE_US + i * 23_220, pcm(i), seq=100 + i)
        for kind, seq in writer.take_durable():
            assert kind is StreamKind.AUDIO
            durable.append(seq)
            on_disk = len(packets_by_type(path)["audio"])
            assert seq - 100 < on_disk, f"seq {seq} reported before it was in the file"
    assert 0 < len(durable) < 65, "an audio-only cluster is written out within a second"
    writer.close()
    durable += [seq for _, seq in writer.take_durable()]
    assert durable == list(range(100, 165)), "each once, in order, all after the close"
    assert writer.take_unwritten() == []


def test_cluster_scanner_counts_only_whole_clusters(tmp_path: Path) -> None:
    path = tmp_path / "seg.mkv"
    frames, chunks = write_av_segment(path, 1.0)
    whole = ClusterScanner(path).scan()
    assert (whole[1], whole[2]) == (len(frames), len(chunks))
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    counted = []
    for size in range(0, len(data), len(data) // 13):
        cut.write_bytes(data[:size])
        found = ClusterScanner(cut).scan()
        counted.append(found.total())
        if size > 5000:
            with av.open(str(cut)) as container:
                readable = sum(1 for p in container.demux() if p.size)
            assert found.total() <= readable
    assert counted == sorted(counted)
    assert counted[-1] > len(frames), "the scanner sees the clusters of a cut file"


KILLED_AFTER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from avd.media.segment import SegmentWriter
from tests.test_segment import AUDIO, BASE_US, VIDEO, jpeg, pcm
writer = SegmentWriter(Path(sys.argv[1]), sender_id="c", start_us=BASE_US, video=VIDEO, audio=AUDIO)
for n in range(int(sys.argv[2])):
    writer.write_video(BASE_US + n * 50_000, jpeg(n), seq=n)
    writer.write_audio(BASE_US + n * 50_000 + 1000, pcm(n), seq=n)
    writer.take_durable()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_segment_killed_at_its_first_packets_leaves_no_unplayable_file(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    published = []
    for packets in (1, 2, 3, 5):
        path = tmp_path / f"killed-{packets}.mkv"
        subprocess.run(
            [sys.executable, "-c", KILLED_AFTER, str(path), str(packets), str(repo)],
            check=False,
            timeout=60,
            cwd=repo,
        )
        if path.exists():
            published.append(packets)
            probe = subprocess.run(
                ["ffprobe", "-v", "error", str(path)], capture_output=True, check=False
            )
            assert probe.returncode == 0, f"killed after {packets}: {probe.stderr!r}"
        else:
            assert part_path(path).exists(), "the header waits under the .part name"
    assert published, "a segment takes its final name once a cluster is in it"
    assert 1 not in published, "a bare header is never under the final name"


def _threads() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


def test_open_segments_start_no_threads(tmp_path: Path) -> None:
    """FFmpeg would open each MJPEG track's (unused) encoder with a thread per core: a
    recorder of hundreds of senders ran two idle threads each on this 2-core machine."""
    before = _threads()
    writers = [
        SegmentWriter(
            tmp_path / f"{n}.mkv", sender_id="cam1", start_us=BASE_US, video=VIDEO, audio=AUDIO
        )
        for n in range(8)
    ]
    for writer in writers:
        assert writer.write_video(BASE_US, jpeg(0))  # the header is written, the encoder opened
    try:
        assert _threads() <= before  # not ==: a thread of an earlier test may end meanwhile
    finally:
        for writer in writers:
            writer.close()


def test_a_segment_deleted_while_written_reports_no_more_frames_as_durable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "seg.mkv"
    writer = SegmentWriter(path, sender_id="cam1", start_us=BASE_US, video=VIDEO, audio=None)
    durable: list[int] = []
    for i in range(20):
        assert writer.write_video(BASE_US + i * 50_000, jpeg(i), seq=i)
        durable += [seq for _, seq in writer.take_durable()]
    assert durable, "frames reach the file while it is written"
    deleted = [writer.deleted]
    path.unlink()  # a clean-up of the folder, not avd
    for i in range(20, 40):
        assert writer.write_video(BASE_US + i * 50_000, jpeg(i), seq=i)
        assert writer.take_durable() == [], "nothing in a deleted file is kept"
    deleted.append(writer.deleted)
    assert deleted == [False, True]
    closed = writer.close()
    assert not closed.kept
    assert writer.take_durable() == []
    unwritten = [seq for _, seq in writer.take_unwritten()]
    assert sorted(durable + unwritten) == list(range(40)), "each frame reported once"
