"""One Matroska segment of one sender: JPEG and PCM packets muxed by stream copy with PyAV.

No encoder runs: each JPEG becomes one MJPEG packet and each PCM chunk one ``pcm_s16le``
packet, byte for byte. Timestamps are the sender's capture clock (µs, shared by both of its
streams) relative to the segment's first packet, in Matroska's native millisecond time base.

Crash safety, chosen over a ``.part`` file renamed at close: the segment is written under its
final name, so nothing is ever left half-renamed and a reader may open it at any time. Three
muxer options make a kill -9 lose at most the last packet or two (tried on this machine):
``flush_packets=1`` writes each packet through to the file, ``max_interleave_delta=1`` (µs)
stops FFmpeg's interleaving queue from holding video back while an audio track is silent
(packets already arrive in capture order: the recorder interleaves them), and
``cluster_time_limit`` bounds how long an audio-only cluster stays in memory. Page-cache
durability is what kill -9 needs; no fsync. ``take_durable`` says which packets have reached
the file (see ``avd.media.mkvblocks``): only those may be acknowledged to the sender.

Every segment says whose it is and when it starts, so a receiver that restarts can tell what
is already recorded: container tags ``AVD_SENDER`` and ``AVD_START_US`` (the sender's capture
clock at pts 0), written in the header before the first packet, and on every packet a
Matroska BlockAdditional stamp with its exact capture time and sequence number (``stamp_of``
reads it back). Packet times cannot serve: audio follows its sample count, and two frames
in one millisecond are nudged apart.

A segment that never received a packet is removed when closed: no empty file is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Final

import av
import av.error
from av.packet import PacketSideData, packet_sidedata_type_from_literal
from av.stream import Stream

from avd.media.base import AudioFormat, StreamKind, VideoFormat
from avd.media.mkvblocks import ClusterScanner

log = logging.getLogger(__name__)

MATROSKA_TIME_BASE = Fraction(1, 1000)  # Matroska's default TimestampScale is 1 ms
_MUXER_OPTIONS = {"flush_packets": "1", "max_interleave_delta": "1", "cluster_time_limit": "250"}
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAME = re.compile(r"(\d{8}T\d{6})(?:\.(\d{3}))?Z(?:-backfill)?(?:-\d+)?\.mkv")
BACKFILL_SUFFIX = "-backfill"
TAG_SENDER, TAG_START_US, TAG_BACKFILL = "AVD_SENDER", "AVD_START_US", "AVD_BACKFILL"
# BlockAddID 1 (codec-opaque data, the one FFmpeg writes), a magic, capture µs, seq.
_STAMP = struct.Struct(">Q4sQQ")
_STAMP_MAGIC = b"AVD1"
_SIDE_DATA: Final = "matroska_block_additional"
_SIDE_DATA_TYPE = packet_sidedata_type_from_literal(_SIDE_DATA)
# FFmpeg's default layout for each channel count; Matroska itself stores only the count.
_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


@dataclass(frozen=True, slots=True)
class ClosedSegment:
    """What a closed segment holds; ``kept`` is False when it was removed for being empty."""

    sender_id: str
    path: Path
    start_us: int  # sender capture clock
    end_us: int  # end of the last packet, sender capture clock
    video_frames: int
    audio_chunks: int
    bytes: int
    kept: bool


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


def parse_segment_start(name: str) -> datetime | None:
    """The UTC start time in a segment's file name, or None if it is not one of ours."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    start = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return start.replace(microsecond=int(match.group(2) or 0) * 1000)


def stamp_of(packet: av.Packet[Stream]) -> tuple[int, int] | None:
    """(capture µs, seq) stamped on a demuxed packet by ``SegmentWriter``, or None."""
    if not packet.has_sidedata(_SIDE_DATA):
        return None
    raw = bytes(packet.get_sidedata(_SIDE_DATA))
    if len(raw) != _STAMP.size:
        return None
    _, magic, capture_us, seq = _STAMP.unpack(raw)
    return (capture_us, seq) if magic == _STAMP_MAGIC else None


def _stamp(packet: av.Packet[Stream], capture_us: int, seq: int) -> None:
    side = PacketSideData(_SIDE_DATA_TYPE, _STAMP.size)  # type: ignore[call-arg]  # stub lacks it
    side.update(_STAMP.pack(1, _STAMP_MAGIC, capture_us, seq))
    packet.set_sidedata(side, move=True)


class SegmentWriter:
    """Writes one segment. Both tracks are declared at open, before any packet is muxed.

    ``write_*`` return False for a packet they refuse (before the segment start, or not after
    the previous one of its stream) and raise OSError when the file system fails. Each packet
    carries its sender's ``seq``; ``take_durable`` hands back, once each, the (kind, seq) of
    the packets that have reached the file, and after ``close`` ``take_unwritten`` those that
    never did (the file system failed).
    """

    def __init__(
        self,
        path: Path,
        *,
        sender_id: str,
        start_us: int,
        video: VideoFormat | None,
        audio: AudioFormat | None,
        backfill: bool = False,
    ) -> None:
        if video is None and audio is None:
            raise ValueError(f"segment {path} needs a video or an audio track")
        self.path, self.sender_id, self.start_us = path, sender_id, start_us
        self.video_format, self.audio_format, self.backfill = video, audio, backfill
        if audio is not None and (audio.sample_width != 2 or audio.channels not in _LAYOUTS):
            raise ValueError(f"segment {path}: only 16-bit PCM with 1 to 8 channels is recorded")
        self.video_frames = self.audio_chunks = self.bytes = 0
        self.end_us = start_us
        path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(path), "w", format="matroska", options=_MUXER_OPTIONS)
        self._container.metadata[TAG_SENDER] = sender_id  # written with the header
        self._container.metadata[TAG_START_US] = str(start_us)
        if backfill:
            self._container.metadata[TAG_BACKFILL] = "1"
        self._video = self._add_video(video) if video else None
        self._audio = self._add_audio(audio) if audio else None
        self._last_capture_us: dict[StreamKind, int] = {}
        self._last_pts_ms = {"video": -1, "audio": -1}
        self._audio_clock = _AudioClock(audio) if audio else None
        self._pending: dict[int, tuple[StreamKind, deque[int]]] = {}  # by Matroska track number
        for kind, stream in ((StreamKind.VIDEO, self._video), (StreamKind.AUDIO, self._audio)):
            if stream is not None:
                self._pending[stream.index + 1] = (kind, deque())
        self._scanner = ClusterScanner(path)
        self._durable: list[tuple[StreamKind, int]] = []

    def _add_video(self, fmt: VideoFormat) -> av.VideoStream:
        stream = self._container.add_stream("mjpeg", rate=fmt.fps)
        stream.width, stream.height = fmt.width, fmt.height
        stream.pix_fmt = "yuvj420p"  # full-range 4:2:0, what cv2.imencode produces
        return stream

    def _add_audio(self, fmt: AudioFormat) -> av.AudioStream:
        layout = _LAYOUTS[fmt.channels]
        return self._container.add_stream("pcm_s16le", rate=fmt.rate, layout=layout)

    @property
    def packets(self) -> int:
        return self.video_frames + self.audio_chunks

    def last_capture_us(self, kind: StreamKind) -> int | None:
        """Capture time of the newest packet of ``kind`` written, None before the first."""
        return self._last_capture_us.get(kind)

    def write_video(self, capture_us: int, jpeg: bytes, seq: int = 0) -> bool:
        """Mux one JPEG captured at ``capture_us``; every MJPEG frame is a keyframe."""
        if self._video is None or self.video_format is None:
            raise ValueError(f"segment {self.path} has no video track")
        last = self._last_capture_us.get(StreamKind.VIDEO)
        if capture_us < self.start_us or (last is not None and capture_us <= last):
            return False
        duration_us = 1_000_000 // max(1, self.video_format.fps)
        span = (capture_us, capture_us + duration_us)
        self._mux(self._video, StreamKind.VIDEO, span, jpeg, seq=seq, capture_us=capture_us)
        self._last_capture_us[StreamKind.VIDEO] = capture_us
        self.video_frames += 1
        return True

    def write_audio(self, capture_us: int, pcm: bytes, seq: int = 0) -> bool:
        """Mux one PCM chunk; its time follows the sample count (see ``_AudioClock``)."""
        if self._audio is None or self._audio_clock is None:
            raise ValueError(f"segment {self.path} has no audio track")
        if capture_us < self.start_us:
            return False
        span = self._audio_clock.place(capture_us, len(pcm))
        if span is None:
            return False
        self._mux(self._audio, StreamKind.AUDIO, span, pcm, seq=seq, capture_us=capture_us)
        self._last_capture_us[StreamKind.AUDIO] = capture_us
        self.audio_chunks += 1
        return True

    def _mux(
        self,
        stream: Stream,
        kind: StreamKind,
        span_us: tuple[int, int],
        data: bytes,
        *,
        seq: int,
        capture_us: int,
    ) -> None:
        # pts in ms, kept strictly increasing per track even when two captures share a ms.
        track = kind.label
        pts = max(self._ms(span_us[0]), self._last_pts_ms[track] + 1)
        packet = av.Packet(data)
        packet.stream = stream
        packet.time_base = MATROSKA_TIME_BASE
        packet.pts = packet.dts = pts
        packet.duration = max(1, self._ms(span_us[1]) - pts)
        packet.is_keyframe = True  # MJPEG and PCM packets are all independently decodable
        _stamp(packet, capture_us, seq)
        self._container.mux(packet)
        self._pending[stream.index + 1][1].append(seq)
        self._last_pts_ms[track] = pts
        self.bytes += len(data)
        self.end_us = max(self.end_us, span_us[1])

    def _ms(self, capture_us: int) -> int:
        return (capture_us - self.start_us) // 1000

    def take_durable(self) -> list[tuple[StreamKind, int]]:
        """(kind, seq) of the packets that reached the file since the previous call."""
        self._collect_durable()
        durable, self._durable = self._durable, []
        return durable

    def _collect_durable(self) -> None:
        for track, count in self._scanner.scan().items():
            kind, seqs = self._pending.get(track, (StreamKind.VIDEO, deque()))
            for _ in range(min(count, len(seqs))):
                self._durable.append((kind, seqs.popleft()))

    def take_unwritten(self) -> list[tuple[StreamKind, int]]:
        """After ``close``: (kind, seq) of the packets that never reached the file."""
        lost = [(kind, seq) for kind, seqs in self._pending.values() for seq in seqs]
        for _, seqs in self._pending.values():
            seqs.clear()
        return lost

    def close(self) -> ClosedSegment:
        """Finish the file (never raises); remove it if no packet made it in."""
        try:
            self._container.close()
        except (OSError, av.error.FFmpegError) as exc:
            # The pause that follows a write error already logged the cause once.
            log.debug("closing segment %s failed: %s", self.path, exc)
        kept = self.packets > 0
        if kept:
            self._collect_durable()  # what the close wrote out
        else:
            with contextlib.suppress(OSError):  # a read-only folder keeps its empty file
                self.path.unlink(missing_ok=True)
        return ClosedSegment(
            self.sender_id,
            self.path,
            self.start_us,
            self.end_us,
            self.video_frames,
            self.audio_chunks,
            self.bytes,
            kept,
        )


class _AudioClock:
    """Places PCM chunks on the capture clock by their sample count, not their arrival.

    A capture thread stamps chunks with jitter; following the sample count keeps the audio
    gapless (as aiortc does). The position re-anchors to the capture time when the two
    disagree by more than one chunk (a lost chunk, or clock drift); a chunk that would
    overlap the previous one by more than that is refused.
    """

    def __init__(self, fmt: AudioFormat) -> None:
        self._rate = fmt.rate
        self._frame_bytes = fmt.channels * fmt.sample_width
        self._tolerance_us = max(1, fmt.chunk_duration_us)
        self._anchor_us: int | None = None
        self._samples = 0  # written since the anchor

    def _at(self, samples: int) -> int:
        assert self._anchor_us is not None
        return self._anchor_us + samples * 1_000_000 // self._rate

    def place(self, capture_us: int, size: int) -> tuple[int, int] | None:
        """(start, end) in capture µs for a chunk of ``size`` bytes, or None to refuse it."""
        if self._anchor_us is not None:
            expected = self._at(self._samples)
            if capture_us < expected - self._tolerance_us:
                return None
            if capture_us > expected + self._tolerance_us:
                self._anchor_us = None
        if self._anchor_us is None:
            self._anchor_us, self._samples = capture_us, 0
        start = self._at(self._samples)
        self._samples += size // self._frame_bytes
        return start, self._at(self._samples)
