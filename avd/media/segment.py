"""One Matroska segment of one sender: JPEG and PCM packets muxed by stream copy with PyAV.

No encoder runs: each JPEG becomes one MJPEG packet and each PCM chunk one ``pcm_s16le``
packet, byte for byte. Timestamps are the sender's capture clock (µs, shared by both of its
streams) relative to the segment's first packet, in Matroska's native millisecond time base.

Crash safety: until its first cluster is in the file a segment is a bare header, which no
player opens, so it is written as ``.<name>.part`` and takes its final name as soon as that
cluster is there (a rename in one folder: atomic); from then on a reader may open it at any
time, and a kill -9 leaves a playable file. A ``.part`` left by a kill holds nothing that was
reported durable (``RecordedIndex.load`` removes it). Three muxer options make a kill -9
lose at most the last packet or two (tried on this machine):
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

A segment none of whose packets reached the file is removed when closed: no empty file is
left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections import Counter, deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Final

import av
import av.error
from av.packet import PacketSideData, packet_sidedata_type_from_literal
from av.stream import Stream

from avd.media.audioclock import AudioClock
from avd.media.base import AudioFormat, StreamKind, VideoFormat
from avd.media.mkvblocks import ClusterScanner
from avd.media.naming import (
    check_path_component,
    parse_segment_start,
    part_path,
    segment_path,
)

__all__ = [  # the naming helpers are re-exported: callers know them from here
    "TAG_BACKFILL",
    "TAG_SENDER",
    "TAG_START_US",
    "ClosedSegment",
    "SegmentWriter",
    "check_path_component",
    "parse_segment_start",
    "part_path",
    "segment_path",
    "stamp_of",
]

log = logging.getLogger(__name__)

MATROSKA_TIME_BASE = Fraction(1, 1000)  # Matroska's default TimestampScale is 1 ms
_MUXER_OPTIONS = {"flush_packets": "1", "max_interleave_delta": "1", "cluster_time_limit": "250"}
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
        self._part = part_path(path)
        self._published = False  # the file has its final name
        self._container = av.open(str(self._part), "w", format="matroska", options=_MUXER_OPTIONS)
        self._container.metadata[TAG_SENDER] = sender_id  # written with the header
        self._container.metadata[TAG_START_US] = str(start_us)
        if backfill:
            self._container.metadata[TAG_BACKFILL] = "1"
        self._video = self._add_video(video) if video else None
        self._audio = self._add_audio(audio) if audio else None
        self._last_capture_us: dict[StreamKind, int] = {}
        self._last_pts_ms = {"video": -1, "audio": -1}
        self._audio_clock = AudioClock(audio) if audio else None
        self._pending: dict[int, tuple[StreamKind, deque[int]]] = {}  # by Matroska track number
        for kind, stream in ((StreamKind.VIDEO, self._video), (StreamKind.AUDIO, self._audio)):
            if stream is not None:
                self._pending[stream.index + 1] = (kind, deque())
        self._scanner = ClusterScanner(self._part)
        self._durable: list[tuple[StreamKind, int]] = []
        self._arrived: Counter[int] = Counter()  # blocks in the file, per track, not yet reported

    def _add_video(self, fmt: VideoFormat) -> av.VideoStream:
        stream = self._container.add_stream("mjpeg", rate=fmt.fps)
        stream.width, stream.height = fmt.width, fmt.height
        stream.pix_fmt = "yuvj420p"  # full-range 4:2:0, what cv2.imencode produces
        # The JPEGs are muxed as they came, never encoded, but FFmpeg still opens the track's
        # MJPEG encoder when the header is written, with a slice thread per core by default:
        # a recorder of 200 senders on 2 cores ran 400 idle threads (a 64-core host: 12,800).
        stream.codec_context.thread_count = 1
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
        """Mux one PCM chunk; its time follows the sample count (see ``AudioClock``)."""
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

    @property
    def deleted(self) -> bool:
        """The file was deleted while being written (not by avd): what goes in is lost."""
        return self._scanner.unlinked

    def take_durable(self) -> list[tuple[StreamKind, int]]:
        """(kind, seq) of the packets that reached the file since the previous call."""
        self._collect_durable()
        durable, self._durable = self._durable, []
        return durable

    def _collect_durable(self) -> None:
        self._arrived += self._scanner.scan()
        if not self._arrived or not self._publish():
            return  # a packet counts once the file holding it has its final name
        for track, count in self._arrived.items():
            kind, seqs = self._pending.get(track, (StreamKind.VIDEO, deque()))
            for _ in range(min(count, len(seqs))):
                self._durable.append((kind, seqs.popleft()))
        self._arrived.clear()

    def _publish(self) -> bool:
        """Give the file its final name (its first cluster is in it); True once it has it."""
        if not self._published:
            try:
                os.rename(self._part, self.path)
            except OSError as exc:
                log.warning("cannot rename %s to %s: %s", self._part, self.path, exc)
                return False
            self._published = True
        return True

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
        self._collect_durable()  # what the close wrote out
        self._scanner.close()
        kept = self._published and not self.deleted
        if not kept and not self._arrived:
            with contextlib.suppress(OSError):  # a read-only folder keeps its empty file
                self._part.unlink(missing_ok=True)
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
