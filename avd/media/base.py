"""The small interfaces every media source and sink meets on.

Sources run in their own thread on the sender: ``read()`` blocks until the next frame is
due (each source paces itself in real time), returns it already encoded (JPEG for video,
interleaved little-endian PCM for audio) with its capture time from ``avd.clock``, or
returns ``None`` when the stream has ended for good. Sinks are called on the receiver's
event loop and must not block on I/O: a sink that writes files hands the work to its own
bounded queue and thread.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Protocol


class StreamKind(enum.IntEnum):
    VIDEO = 1
    AUDIO = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class VideoFormat:
    width: int
    height: int
    fps: int
    quality: int


@dataclass(frozen=True, slots=True)
class AudioFormat:
    rate: int
    channels: int
    sample_width: int  # bytes per sample: 2 for 16-bit
    chunk: int  # frames (samples per channel) per chunk

    @property
    def chunk_bytes(self) -> int:
        return self.chunk * self.channels * self.sample_width

    @property
    def chunk_duration_us(self) -> int:
        return self.chunk * 1_000_000 // self.rate


MediaFormat = VideoFormat | AudioFormat


@dataclass(frozen=True, slots=True)
class CapturedFrame:
    """One encoded frame or chunk, stamped with its capture time (``avd.clock`` µs)."""

    capture_us: int
    data: bytes


class MediaSource(Protocol):
    """Something that captures one stream. Opened once; ``read`` blocks until due."""

    kind: StreamKind
    format: MediaFormat
    description: str  # for logs: "test pattern 640x480@20", "camera /dev/video0", ...

    def open(self) -> None:
        """Acquire the device; raise DeviceError naming it if it cannot be opened."""

    def read(self) -> CapturedFrame | None:
        """The next frame, paced in real time; None when the stream has ended for good."""

    def close(self) -> None:
        """Release the device. Safe to call twice, and from another thread after stop()."""

    def stop(self) -> None:
        """Ask a blocked ``read`` to return None soon (called from another thread)."""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One authenticated stream of one sender, as the receiver knows it."""

    sender_id: str
    kind: StreamKind
    format: MediaFormat
    peer: str  # "ip:port"
    session_id: int


@dataclass(frozen=True, slots=True)
class ReceivedFrame:
    seq: int
    capture_us: int  # sender's clock
    arrival_us: int  # receiver's clock
    local_capture_us: int | None  # capture time on the receiver's clock, once synced
    data: bytes
    late: bool = False  # delivered from the sender's spool after an outage


@dataclass(frozen=True, slots=True)
class SinkEvent:
    """One ``MediaSink`` call as data (or "stop"): what a sink's own thread is handed."""

    kind: Literal["start", "frame", "end", "stop"]
    info: StreamInfo | None = None
    frame: ReceivedFrame | None = None


class MediaSink(Protocol):
    """Receives the frames of authenticated streams. Called on the event loop."""

    def stream_started(self, info: StreamInfo) -> None: ...

    def frame(self, info: StreamInfo, frame: ReceivedFrame) -> None: ...

    def stream_ended(self, info: StreamInfo) -> None: ...

    def close(self) -> None: ...
