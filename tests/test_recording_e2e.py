"""End to end: recordings made by the real receiver daemon, opened again with PyAV and ffprobe.

Two kinds of sender feed the receiver: the real ``avd-sender`` with its test sources (what
a user runs), and ``MediaClient``, a small client built on ``avd.protocol`` over real TLS
with a real token, which sends KNOWN JPEGs and PCM chunks with known capture times, so that
every stored packet can be compared byte for byte with what was sent.

Covered: byte-identical stream copy across segment rolls, A/V durations, a receiver killed
with SIGKILL mid-segment, retention by size, a full file system (a real tmpfs) pausing and
resuming recording while streaming goes on, and the issue's acceptance check.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from avd.certs import CertPaths
from avd.media.base import AudioFormat, MediaFormat, StreamKind, VideoFormat
from avd.media.segment import parse_segment_start
from avd.protocol import Connection, Goodbye, GoodbyeReason, Hello, Media, Role, Welcome

from .conftest import (
    Credentials,
    Daemon,
    Launcher,
    ReceiverHandle,
    metric,
    scrape,
    sender_metrics_url,
    small_tmpfs,
    wait_until,
)

pytestmark = pytest.mark.slow

VIDEO = VideoFormat(width=640, height=480, fps=20, quality=70)
AUDIO = AudioFormat(rate=44100, channels=1, sample_width=2, chunk=1024)
FRAME_US = 1_000_000 // VIDEO.fps
CHUNK_SECONDS = AUDIO.chunk / AUDIO.rate
BASE_US = 5_000_000_000  # any sender clock will do; this one is far from zero


# ---- reading recordings -----------------------------------------------------------------


@dataclass(frozen=True)
class Track:
    """One track of one segment as PyAV demuxes it; times in seconds."""

    packets: list[bytes]
    starts: list[Fraction]
    end: Fraction  # end of the last packet

    @property
    def duration(self) -> float:
        return float(self.end - self.starts[0]) if self.starts else 0.0


def read_segment(path: Path) -> dict[str, Track]:
    """Every non-empty packet of ``path``, by stream type ("video", "audio")."""
    found: dict[str, tuple[list[bytes], list[Fraction], Fraction]] = {}
    with av.open(str(path)) as container:
        for packet in container.demux():
            if not packet.size:
                continue
            assert packet.pts is not None, path
            assert packet.time_base is not None, path
            start = packet.pts * packet.time_base
            data, starts, _ = found.setdefault(packet.stream.type, ([], [], Fraction(0)))
            data.append(bytes(packet))
            starts.append(start)
            end = start + (packet.duration or 0) * packet.time_base
            found[packet.stream.type] = (data, starts, end)
    return {kind: Track(*values) for kind, values in found.items()}


def segments_of(record_dir: Path, sender_id: str) -> list[Path]:
    """A sender's segments in recording order (by the start time in their names)."""
    paths = list((record_dir / sender_id).glob("*/*.mkv"))
    starts = {p: parse_segment_start(p.name) for p in paths}
    assert None not in starts.values(), paths
    return sorted(paths, key=lambda p: (starts[p], p.name))


def ffprobe(path: Path, *, packets: bool = False) -> dict[str, object]:
    """ffprobe's JSON for ``path`` (streams with packet counts; packets if asked)."""
    command = ["ffprobe", "-v", "error", "-show_streams", "-count_packets", "-of", "json"]
    if packets:
        command.append("-show_packets")
    result = subprocess.run(
        [*command, str(path)], capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 0, f"ffprobe cannot read {path}: {result.stderr}"
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def probed_streams(probe: dict[str, object]) -> dict[str, dict[str, object]]:
    streams = probe["streams"]
    assert isinstance(streams, list)
    return {str(s["codec_type"]): s for s in streams}


# ---- a client that sends known media ---------------------------------------------------


class MediaClient:
    """One authenticated stream to the real receiver, spoken with ``avd.protocol`` over TLS."""

    def __init__(
        self, pki: CertPaths, port: int, sender_id: str, token: str, fmt: MediaFormat
    ) -> None:
        kind = StreamKind.VIDEO if isinstance(fmt, VideoFormat) else StreamKind.AUDIO
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.conn = Connection(Role.SENDER)
        self.sock.sendall(self.conn.send(Hello(sender_id, kind, fmt, token.encode())))
        while (event := self.conn.next_event()) is None:
            self.conn.receive_data(self.sock.recv(4096))
        assert isinstance(event, Welcome), f"{kind.label} stream refused: {event}"
        self.seq = 0

    def send(self, capture_us: int, data: bytes) -> None:
        self.sock.sendall(self.conn.send(Media(self.seq, capture_us, data)))
        self.seq += 1

    def close(self, *, goodbye: bool = True) -> None:
        """Say goodbye, then read until the receiver closes: closing a socket with unread
        heartbeats in it would send a RST, and a RST throws away frames still in flight."""
        with contextlib.suppress(OSError):
            if goodbye:
                self.sock.sendall(self.conn.send(Goodbye(GoodbyeReason.BYE, "test done")))
                while self.sock.recv(65536):
                    pass
        self.sock.close()


def known_jpegs(count: int) -> list[bytes]:
    """``count`` distinct 640x480 JPEGs: a gradient, a numbered label and some texture."""
    rng = np.random.default_rng(7)
    base = np.tile(np.linspace(0, 200, 640, dtype=np.uint8), (480, 1))
    frames = []
    for n in range(count):
        image = cv2.merge([base, np.roll(base, 8 * n, axis=1), base[::-1]])
        image[200:280, 100:540] = rng.integers(0, 255, (80, 440, 3), dtype=np.uint8)
        cv2.putText(image, f"frame {n}", (40, 120), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 4)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, VIDEO.quality])
        assert ok
        frames.append(encoded.tobytes())
    assert len(set(frames)) == count
    return frames


def known_chunks(count: int) -> list[bytes]:
    """``count`` distinct chunks of random 16-bit mono PCM."""
    rng = np.random.default_rng(11)
    samples = rng.integers(-30000, 30000, count * AUDIO.chunk, dtype=np.int16)
    data = samples.astype("<i2").tobytes()
    return [data[i : i + AUDIO.chunk_bytes] for i in range(0, len(data), AUDIO.chunk_bytes)]


def chunk_capture_us(n: int) -> int:
    return BASE_US + n * AUDIO.chunk * 1_000_000 // AUDIO.rate


@dataclass
class KnownStreams:
    """Two clients of one sender sending known frames and chunks in capture order."""

    video: MediaClient
    audio: MediaClient
    frames: list[bytes]
    chunks: list[bytes]
    frames_sent: int = 0
    chunks_sent: int = 0

    def send_until(self, frame_count: int) -> None:
        """Video frames up to ``frame_count``, with the audio captured before each of them."""
        while self.frames_sent < frame_count:
            capture_us = BASE_US + self.frames_sent * FRAME_US
            while chunk_capture_us(self.chunks_sent) <= capture_us:
                self.audio.send(chunk_capture_us(self.chunks_sent), self.chunks[self.chunks_sent])
                self.chunks_sent += 1
            self.video.send(capture_us, self.frames[self.frames_sent])
            self.frames_sent += 1

    def send_in_real_time(self, frame_count: int) -> None:
        """Up to ``frame_count`` frames at the capture pace, as a live camera sends them.

        Not faster: the receiver reads each connection in large slices, so a burst puts one
        stream seconds of capture time ahead of the other, past the recorder's interleaving
        grace, and the leading audio then lands in the segment before its video's.
        """
        started = time.monotonic() - self.frames_sent / VIDEO.fps
        while self.frames_sent < frame_count:
            self.send_until(self.frames_sent + 1)
            time.sleep(max(0.0, started + self.frames_sent / VIDEO.fps - time.monotonic()))

    def close(self, *, goodbye: bool = True) -> None:
        self.video.close(goodbye=goodbye)
        self.audio.close(goodbye=goodbye)


def open_known_streams(
    pki: CertPaths, handle: ReceiverHandle, token: str, seconds: float
) -> KnownStreams:
    frames = int(seconds * VIDEO.fps)
    video = MediaClient(pki, handle.video_port, "cam1", token, VIDEO)
    audio = MediaClient(pki, handle.audio_port, "cam1", token, AUDIO)
    return KnownStreams(video, audio, known_jpegs(frames), known_chunks(frames * 3))


def _received(handle: ReceiverHandle, stream: str) -> float:
    return metric(handle.metrics(), "avd_frames_received_total", sender="cam1", stream=stream)


# ---- tests with known media ---------------------------------------------------------------


def test_known_frames_and_chunks_are_stored_byte_identical_across_segments(
    pki: CertPaths, creds: Credentials, tmp_path: Path, launch: Launcher
) -> None:
    record_dir = tmp_path / "rec"
    handle = launch.recording_receiver(record_dir, AVD_SEGMENT_SECONDS="2")
    streams = open_known_streams(pki, handle, creds.tokens["cam1"], seconds=5)
    streams.send_in_real_time(len(streams.frames))
    streams.close()
    sent_frames, sent_chunks = streams.frames_sent, streams.chunks_sent
    assert sent_frames == 100
    wait_until(lambda: _received(handle, "video") == sent_frames)
    wait_until(lambda: _received(handle, "audio") == sent_chunks)
    assert handle.daemon.stop() == 0

    tracks = [read_segment(path) for path in segments_of(record_dir, "cam1")]
    assert len(tracks) == 3, "5 s of capture time in 2 s segments"
    stored_frames = [p for t in tracks for p in t["video"].packets]
    stored_pcm = b"".join(p for t in tracks for p in t["audio"].packets)
    assert len(stored_frames) == sent_frames
    assert stored_frames == streams.frames[:sent_frames], "a JPEG was altered or reordered"
    assert stored_pcm == b"".join(streams.chunks[:sent_chunks]), "PCM was altered"
    for track in tracks:
        video, audio = track["video"], track["audio"]
        # Frames keep their capture spacing (50 ms) inside a segment.
        steps = {b - a for a, b in zip(video.starts, video.starts[1:], strict=False)}
        assert steps == {Fraction(1, 20)}, steps
        assert abs(video.duration - audio.duration) < 0.1, (video.duration, audio.duration)
    video_total = sum(t["video"].duration for t in tracks)
    audio_total = sum(t["audio"].duration for t in tracks)
    assert abs(video_total - audio_total) < 0.1, (video_total, audio_total)
    assert abs(audio_total - sent_chunks * CHUNK_SECONDS) < 0.01


def test_audio_trailing_a_stopped_video_stays_in_its_segment(
    pki: CertPaths, creds: Credentials, tmp_path: Path, launch: Launcher
) -> None:
    """A stopping sender ends its video a moment before its audio. At a segment boundary
    the trailing audio once rolled into a sliver of a segment without video."""
    record_dir = tmp_path / "rec"
    handle = launch.recording_receiver(record_dir, AVD_SEGMENT_SECONDS="2")
    streams = open_known_streams(pki, handle, creds.tokens["cam1"], seconds=3)
    streams.send_in_real_time(40)  # video up to 1.95 s, the last frame before the boundary
    streams.video.close()
    handle.daemon.wait_for_log(r"connection closed .*stream=video")
    while chunk_capture_us(streams.chunks_sent) < BASE_US + 2_150_000:  # audio past 2 s
        streams.audio.send(
            chunk_capture_us(streams.chunks_sent), streams.chunks[streams.chunks_sent]
        )
        streams.chunks_sent += 1
    streams.audio.close()
    wait_until(lambda: _received(handle, "audio") == streams.chunks_sent)
    assert handle.daemon.stop() == 0

    (path,) = segments_of(record_dir, "cam1")
    track = read_segment(path)
    assert track["video"].packets == streams.frames[:40]
    assert b"".join(track["audio"].packets) == b"".join(streams.chunks[: streams.chunks_sent])


def test_a_receiver_killed_mid_segment_keeps_all_but_the_last_second(
    pki: CertPaths, creds: Credentials, tmp_path: Path, launch: Launcher
) -> None:
    record_dir = tmp_path / "rec"
    handle = launch.recording_receiver(record_dir)
    streams = open_known_streams(pki, handle, creds.tokens["cam1"], seconds=4)
    try:
        streams.send_in_real_time(60)
        wait_until(lambda: _received(handle, "video") == 60, timeout=5)
        handle.daemon.proc.send_signal(signal.SIGKILL)
        assert handle.daemon.proc.wait(5) == -signal.SIGKILL
    finally:
        streams.close(goodbye=False)

    (path,) = segments_of(record_dir, "cam1")
    streams_seen = probed_streams(ffprobe(path))
    assert streams_seen["video"]["codec_name"] == "mjpeg"
    assert streams_seen["audio"]["codec_name"] == "pcm_s16le"
    track = read_segment(path)
    frames, pcm = track["video"].packets, b"".join(track["audio"].packets)
    assert int(str(streams_seen["video"]["nb_read_packets"])) == len(frames)
    lost_s = (60 - len(frames)) / VIDEO.fps
    print(f"kill -9: {len(frames)} of 60 frames survived ({lost_s:.2f} s lost)")
    assert len(frames) >= 60 - VIDEO.fps, f"only {len(frames)} of 60 frames survived"
    assert frames == streams.frames[: len(frames)]
    sent_pcm = b"".join(streams.chunks[: streams.chunks_sent])
    assert len(pcm) >= len(sent_pcm) - AUDIO.rate * AUDIO.sample_width
    assert sent_pcm.startswith(pcm)


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from avd.media.base import AudioFormat, VideoFormat
from avd.media.segment import SegmentWriter
sys.path.insert(0, sys.argv[3])
from tests.test_recording_e2e import AUDIO, VIDEO, known_chunks, known_jpegs
writer = SegmentWriter(Path(sys.argv[1]), sender_id="cam1", start_us=0, video=VIDEO, audio=AUDIO)
frames, chunks = known_jpegs(2), known_chunks(2)
for n in range(int(sys.argv[2])):  # a frame, then the audio captured while it shows
    if n % 3 == 0:
        writer.write_video(n // 3 * 50_000, frames[n // 3])
    else:
        writer.write_audio((n // 3) * 50_000 + (n % 3 - 1) * 23_220, chunks[n % 3 - 1])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_at_any_packet_leaves_no_unreadable_segment(tmp_path: Path) -> None:
    """The recorder can be killed at any packet, the first ones of a segment included:
    a file under its final name must then open, or not exist."""
    repo = Path(__file__).resolve().parent.parent
    unreadable = []
    for packets in range(1, 7):
        path = tmp_path / f"killed-after-{packets}.mkv"
        result = subprocess.run(
            [sys.executable, "-c", KILLED_WRITER, str(path), str(packets), str(repo)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            cwd=repo,
        )
        assert result.returncode == -signal.SIGKILL, result.stderr
        probe = subprocess.run(
            ["ffprobe", "-v", "error", str(path)], capture_output=True, check=False
        )
        if path.exists() and probe.returncode != 0:
            unreadable.append(packets)
    assert not unreadable, f"killed after these packets, the segment does not open: {unreadable}"


# ---- tests with the real sender ------------------------------------------------------------


def _start_sender(
    launch: Launcher, handle: ReceiverHandle, log: str = "sender"
) -> tuple[Daemon, str]:
    """A real avd-sender with test sources, once it serves its metrics; it and their URL."""
    sender = launch.sender(handle, log)
    return sender, sender_metrics_url(sender)


def _segments_opened(receiver: Daemon, after: str = "") -> list[Path]:
    """Segments the receiver logged opening (DEBUG), optionally only after a log pattern."""
    text = receiver.log_text()
    if after:
        match = re.search(after, text)
        assert match, f"no {after!r} in the receiver's log"
        text = text[match.end() :]
    return [Path(p) for p in re.findall(r"recording cam1 into (\S+\.mkv)", text)]


def test_retention_deletes_the_oldest_segments_when_over_budget(
    tmp_path: Path, launch: Launcher
) -> None:
    record_dir = tmp_path / "rec"
    budget_gb = 0.0012  # about two 1 s segments of the test pattern (~0.6 MB each)
    budget = int(budget_gb * 1024**3)
    handle = launch.recording_receiver(
        record_dir, AVD_SEGMENT_SECONDS="1", AVD_RECORD_MAX_GB=str(budget_gb)
    )
    sender, _ = _start_sender(launch, handle)
    wait_until(lambda: len(_segments_opened(handle.daemon)) >= 6, timeout=30)
    assert sender.stop() == 0
    assert handle.daemon.stop() == 0

    opened = _segments_opened(handle.daemon)
    deleted = [
        Path(p) for p in re.findall(r"deleted recording (\S+\.mkv) \(", handle.daemon.log_text())
    ]
    assert f"recordings over {budget} bytes" in handle.daemon.log_text()
    kept = [p for p in opened if p.exists()]
    assert kept == segments_of(record_dir, "cam1")
    # Exactly the oldest went, each logged once; the newest stayed.
    assert deleted == opened[: len(opened) - len(kept)], (deleted, opened)
    assert kept == opened[len(deleted) :]
    assert deleted, "nothing was deleted"
    # Retention runs at each roll, before the next segment opens: all but the last fit.
    assert sum(p.stat().st_size for p in kept[:-1]) <= budget
    for path in kept[:-1]:  # whole seconds; the last one was cut short by the stop
        assert len(read_segment(path)["video"].packets) >= VIDEO.fps - 2, path
    assert read_segment(kept[-1]), f"{kept[-1]} holds nothing"


def _video_frames(path: Path) -> int:
    """Video packets in a segment being written; 0 while it has no header yet.

    A segment gets its final name once its first cluster is in the file (until then it is
    ``.<name>.part``), so a segment seen a moment ago may not be there under its name yet.
    """
    try:
        track = read_segment(path).get("video")
    except (av.error.EOFError, FileNotFoundError):  # FileNotFound: still .<name>.part
        return 0
    return 0 if track is None else len(track.packets)


def test_a_full_file_system_pauses_recording_while_streaming_goes_on(
    tmp_path: Path, launch: Launcher
) -> None:
    with small_tmpfs(tmp_path / "small", "4m") as small:
        # Leave about 1 MB: two seconds of the test pattern fill it.
        stat = os.statvfs(small)
        filler = small / "filler"
        filler.write_bytes(b"\xa5" * (stat.f_bavail * stat.f_frsize - 1024 * 1024))
        record_dir = small / "rec"
        handle = launch.recording_receiver(record_dir)
        receiver = handle.daemon
        try:
            sender, _ = _start_sender(launch, handle)
            receiver.wait_for_log(r"recording paused for cam1: .*No space left on device")
            before = _received(handle, "video")
            wait_until(lambda: _received(handle, "video") >= before + 30)  # 1.5 s streamed

            filler.unlink()
            receiver.wait_for_log(r"recording resumed for cam1 after", timeout=15)
            # The retry that succeeded opened a new segment just before logging the resume.
            resumed = _segments_opened(receiver, after="recording paused")[-1]
            wait_until(lambda: _video_frames(resumed) >= 20)
            assert sender.stop() == 0
        finally:
            assert receiver.stop() == 0
        log = receiver.log_text()
        assert len(re.findall(r"recording paused for cam1", log)) == 1, "pause logged once"
        for path in segments_of(record_dir, "cam1"):
            assert read_segment(path)["video"].packets, f"{path} holds no frame"
        print(f"full disk: {before:.0f} frames received at the pause, recording resumed")


def _probe_segment(path: Path) -> tuple[int, float, float]:
    """ffprobe one segment as a player would: (video frames, video s, audio s).

    Checks the formats the issue asks for: MJPEG 640x480 and PCM 44.1 kHz mono.
    """
    probe = ffprobe(path, packets=True)
    streams = probed_streams(probe)
    assert set(streams) == {"video", "audio"}, f"{path} has tracks {sorted(streams)}"
    video, audio = streams["video"], streams["audio"]
    assert (video["codec_name"], video["width"], video["height"]) == ("mjpeg", 640, 480), path
    assert (audio["codec_name"], audio["sample_rate"], audio["channels"]) == (
        "pcm_s16le",
        "44100",
        1,
    ), path
    spans: dict[int, list[tuple[float, float]]] = {}
    packets = probe["packets"]
    assert isinstance(packets, list)
    for packet in packets:
        start = float(packet["pts_time"])
        spans.setdefault(int(packet["stream_index"]), []).append(
            (start, start + float(packet.get("duration_time", 0)))
        )

    def duration(stream: dict[str, object]) -> float:
        times = spans.get(int(str(stream["index"])), [])
        return times[-1][1] - times[0][0] if times else 0.0

    return len(spans.get(int(str(video["index"])), [])), duration(video), duration(audio)


def test_acceptance_every_segment_plays_and_holds_what_was_sent(
    tmp_path: Path, launch: Launcher
) -> None:
    """The issue's check: ~8 s of test video and audio in 2 s segments, then a kill -9."""
    record_dir = tmp_path / "rec"
    handle = launch.recording_receiver(record_dir, AVD_SEGMENT_SECONDS="2")
    sender, sender_url = _start_sender(launch, handle)
    wait_until(lambda: _received(handle, "video") > 0)
    # About 8 s, stopping mid-segment: a stop right at a boundary is the trailing-audio test's.
    time.sleep(7)
    sent = metric(scrape(sender_url), "avd_frames_sent_total", stream="video")
    assert sender.stop() == 0
    # Frames sent after the scrape arrive too: count against whichever is larger.
    sent = max(sent, _received(handle, "video"))
    assert handle.daemon.stop() == 0

    paths = segments_of(record_dir, "cam1")
    assert len(paths) >= 4, paths
    recorded = 0
    for path in paths:
        frames, video_s, audio_s = _probe_segment(path)
        recorded += frames
        print(f"{path.name}: {frames} frames, video {video_s:.3f} s, audio {audio_s:.3f} s")
        assert abs(video_s - audio_s) <= 0.25, (path, video_s, audio_s)
    print(f"acceptance: {recorded} frames recorded of {sent:.0f} sent")
    assert recorded >= 0.97 * sent, f"{recorded} frames recorded of {sent} sent"
    # PyAV, opening the files again, finds the same frames: within 1 % of those sent.
    demuxed = sum(len(read_segment(path)["video"].packets) for path in paths)
    assert demuxed == recorded
    assert abs(demuxed - sent) <= 0.01 * sent, f"{demuxed} frames in the files, {sent} sent"
    latest = cv2.imread(str(record_dir / "cam1" / "latest.jpg"))
    assert latest is not None
    assert latest.shape == (480, 640, 3)

    # A receiver killed mid-segment leaves a segment that ffprobe reads.
    killed_dir = tmp_path / "killed"
    handle = launch.recording_receiver(killed_dir, "receiver2", AVD_SEGMENT_SECONDS="2")
    sender, _ = _start_sender(launch, handle, "sender2")
    wait_until(lambda: len(segments_of(killed_dir, "cam1")) >= 2)  # the first one is closed
    rolled_at = _received(handle, "video")
    wait_until(lambda: _received(handle, "video") >= rolled_at + VIDEO.fps)  # 1 s into the next
    received = _received(handle, "video")
    handle.daemon.proc.send_signal(signal.SIGKILL)
    assert handle.daemon.proc.wait(5) == -signal.SIGKILL
    assert sender.stop() == 0
    survived = 0
    for path in segments_of(killed_dir, "cam1"):
        frames, video_s, audio_s = _probe_segment(path)
        survived += frames
        assert frames > 0, path
        assert audio_s > 0, path
    print(f"acceptance kill -9: {survived} frames survived of {received:.0f} received")
    assert survived >= received - VIDEO.fps
