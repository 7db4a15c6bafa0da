"""The receiver's recorder: every sender's streams into segmented, crash-safe Matroska files.

Threading: the ``MediaSink`` methods run on the receiver's event loop and never touch the
disk; they hand events to ONE writer thread through a queue bounded at ``queue_frames``
frames (a frame that finds it full is dropped and counted as ``dropped``; start/end events
are never dropped). The writer thread owns every file: segments, latest.jpg, retention.

Per sender (``_SenderRecording``), the writer:
- interleaves the sender's video and audio (two connections, one capture clock) back into
  capture order, waiting at most ``interleave_grace`` seconds for the slower stream;
- opens a segment at the first frame, with a track for every stream active at that moment;
  before opening one it waits up to the grace for the sender's other stream to announce
  itself, and a stream that starts (or changes format) mid-segment closes the segment and
  opens a new one that includes it;
- rolls to a new segment after ``segment_seconds`` of capture time, on a video frame (on
  any frame when the sender has no video), and runs retention at each roll;
- closes the segment when the sender's last stream ends;
- writes late frames (from a sender's spool) into the current segment only if they are not
  before its start, else counts them as ``late_dropped`` (``_admit_late`` is the seam for
  backfilling them into segments of their own);
- on an OSError pauses that sender's recording with one error log, counts frames as
  ``not_recorded``, retries every ``retry_seconds`` (retention first) and resumes with one
  info log. Live streaming is unaffected: the sink never raises and never blocks.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from avd.clock import monotonic_us
from avd.media.base import AudioFormat, MediaFormat, ReceivedFrame, StreamInfo, StreamKind
from avd.media.latest import LatestJpeg
from avd.media.retention import RetentionPolicy, enforce
from avd.media.segment import ClosedSegment, SegmentWriter, check_path_component, segment_path

log = logging.getLogger(__name__)

_TICK_SECONDS = 0.1  # how often an idle writer releases held frames and does timed work
_CLOSE_TIMEOUT = 30.0  # seconds close() waits for the writer (a hung NFS mount, say)
_CLOCK_JUMP_US = 10_000_000  # a frame this far before its segment: the sender's clock reset


@dataclass(slots=True)
class RecorderStats:
    """Counters of one sender (a snapshot when returned by ``Recorder.stats``)."""

    video_frames: int = 0  # written to segments
    audio_chunks: int = 0
    bytes: int = 0  # media payload written
    segments_opened: int = 0
    dropped: int = 0  # the writer's queue was full
    not_recorded: int = 0  # recording was paused, or the sender id is unusable
    late_dropped: int = 0  # spooled frames from before the current segment
    out_of_order: int = 0  # not after the previous frame of their stream
    paused: bool = False


@dataclass(frozen=True, slots=True)
class _Event:
    kind: Literal["start", "frame", "end", "stop"]
    info: StreamInfo | None = None
    frame: ReceivedFrame | None = None


@dataclass(order=True, slots=True)
class _Held:
    """A frame waiting in the interleaver; ordered by capture time, then arrival."""

    capture_us: int
    order: int
    info: StreamInfo = field(compare=False)
    frame: ReceivedFrame = field(compare=False)
    held_since: float = field(compare=False)


class _Interleaver:
    """Merges one sender's streams back into capture order (a watermark merge).

    The oldest held frame goes out once every active stream has delivered something at
    least as recent (nothing older can come from it any more), or once it has been held
    ``grace`` seconds, in capture time or wall time: a stalled stream delays the other by
    at most that much.
    """

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._grace_us = int(grace * 1_000_000)
        self._heap: list[_Held] = []
        self._order = itertools.count()
        self._watermark: dict[StreamKind, int] = {}

    def push(self, info: StreamInfo, frame: ReceivedFrame, now: float) -> None:
        held = _Held(frame.capture_us, next(self._order), info, frame, now)
        heapq.heappush(self._heap, held)
        kind = info.kind
        self._watermark[kind] = max(self._watermark.get(kind, frame.capture_us), frame.capture_us)

    def restart(self, kind: StreamKind) -> None:
        """A new session of ``kind``: its old watermark says nothing about the new one."""
        self._watermark.pop(kind, None)

    def pop_ready(self, now: float, active: set[StreamKind], *, hold: bool) -> list[_Held]:
        """Frames that may go out now; ``hold`` keeps all but overdue ones back."""
        ready: list[_Held] = []
        newest = max(self._watermark.values(), default=0)
        while self._heap:
            head = self._heap[0]
            overdue = now - head.held_since >= self._grace or (
                newest - head.capture_us >= self._grace_us
            )
            caught_up = all(self._watermark.get(k, -1) >= head.capture_us for k in active)
            if not (overdue or (caught_up and not hold)):
                break
            ready.append(heapq.heappop(self._heap))
        return ready

    def pop_all(self) -> list[_Held]:
        ready = sorted(self._heap)
        self._heap.clear()
        return ready


class _WallClock:
    """UTC for file names from a sender's capture clock.

    With a clock-sync estimate (``local_capture_us``) the capture time is exact on our
    clock; without one, the session's first recorded frame anchors the sender's clock to
    the wall clock at its arrival, so later segments are named by their capture times.
    """

    def __init__(self) -> None:
        self._anchor: tuple[int, float] | None = None  # (capture µs, epoch seconds)

    def reset(self) -> None:
        self._anchor = None

    def utc(self, frame: ReceivedFrame) -> datetime:
        age_of = frame.local_capture_us if frame.local_capture_us is not None else frame.arrival_us
        seen_at = time.time() - max(0, monotonic_us() - age_of) / 1_000_000
        if frame.local_capture_us is not None:
            return datetime.fromtimestamp(seen_at, UTC)
        if self._anchor is None:
            self._anchor = (frame.capture_us, seen_at)
        capture0, wall0 = self._anchor
        return datetime.fromtimestamp(wall0 + (frame.capture_us - capture0) / 1_000_000, UTC)


@dataclass(frozen=True, slots=True)
class _Settings:
    record_dir: Path
    segment_us: int
    grace: float
    retry_seconds: float
    run_retention: Callable[[], None]
    segment_closed: Callable[[ClosedSegment], None]


class _SenderRecording:
    """Everything the writer thread knows about one sender; see the module docstring."""

    def __init__(self, sender_id: str, settings: _Settings) -> None:
        self.sender_id = sender_id
        self.stats = RecorderStats()
        self.segment: SegmentWriter | None = None
        self.usable = _usable_sender_id(sender_id)
        self._settings = settings
        self._active: dict[StreamKind, StreamInfo] = {}
        self._interleaver = _Interleaver(settings.grace)
        self._wall = _WallClock()
        self._retry_at: float | None = None  # set while paused
        self._paused_at = 0.0
        self._not_recorded_at_pause = 0
        self._refused = False  # a format was refused: logged once

    def started(self, info: StreamInfo, now: float) -> None:
        self._active[info.kind] = info
        self._interleaver.restart(info.kind)
        self._release(now)

    def ended(self, info: StreamInfo, now: float) -> None:
        current = self._active.get(info.kind)
        if current is None or current.session_id != info.session_id:
            return  # an older session of a stream that has already restarted
        del self._active[info.kind]
        if self._active:
            self._release(now)
        else:
            self.close(now)

    def frame(self, info: StreamInfo, frame: ReceivedFrame, now: float) -> None:
        if not self.usable:
            self.stats.not_recorded += 1
        elif frame.late and not self._admit_late(frame):
            self.stats.late_dropped += 1
        else:
            self._interleaver.push(info, frame, now)
            self._release(now)

    def _admit_late(self, frame: ReceivedFrame) -> bool:
        """Spooled frames join the current segment if not before it (backfill: later)."""
        return self.segment is not None and frame.capture_us >= self.segment.start_us

    def tick(self, now: float) -> None:
        self._release(now)

    def close(self, now: float) -> None:
        """Write out every held frame and close the segment (the sender's streams ended)."""
        for held in self._interleaver.pop_all():
            self._record(held, now)
        self._close_segment()
        self._wall.reset()

    def _release(self, now: float) -> None:
        # Before opening a segment, give the sender's other stream time to announce itself.
        hold = self.segment is None and len(self._active) < len(StreamKind)
        for held in self._interleaver.pop_ready(now, set(self._active), hold=hold):
            self._record(held, now)

    def _record(self, held: _Held, now: float) -> None:
        if self._retry_at is not None:
            if now < self._retry_at:
                self.stats.not_recorded += 1
                return
            self._settings.run_retention()  # it may free the space we need
        try:
            self._write(held)
        except OSError as exc:
            self.stats.not_recorded += 1
            self._pause(exc, now)
            return
        except ValueError as exc:  # a format no segment can hold; the sender is told nothing
            self.stats.not_recorded += 1
            self._refuse(exc)
            return
        if self._retry_at is not None:
            self._resume(now)

    def _write(self, held: _Held) -> None:
        if self.segment is not None and self._must_roll(held):
            self._close_segment()
            self._settings.run_retention()
        segment = self.segment or self._open_segment(held)
        data = held.frame.data
        if held.info.kind is StreamKind.VIDEO:
            written = segment.write_video(held.capture_us, data)
            self.stats.video_frames += written
        else:
            written = segment.write_audio(held.capture_us, data)
            self.stats.audio_chunks += written
        if written:
            self.stats.bytes += len(data)
        elif held.frame.late:
            self.stats.late_dropped += 1
        else:
            self.stats.out_of_order += 1

    def _must_roll(self, held: _Held) -> bool:
        segment = self.segment
        assert segment is not None
        kind = held.info.kind
        track = segment.video_format if kind is StreamKind.VIDEO else segment.audio_format
        if track != held.info.format:
            return True  # a stream new to this segment, or one whose format changed
        if not held.frame.late and held.capture_us < segment.start_us - _CLOCK_JUMP_US:
            return True  # the sender's clock went back: it restarted
        if kind is not StreamKind.VIDEO and StreamKind.VIDEO in self._active:
            return False  # cut on a video frame while there is video
        limit_us = self._settings.segment_us
        if self._lost_a_track(segment):
            # The sender's other stream has ended: a stopping sender ends its two streams a
            # moment apart, and what trails belongs in this segment, not in a sliver of a
            # segment of its own. A stream that carries on alone rolls one grace later.
            limit_us += int(self._settings.grace * 1_000_000)
        return held.capture_us - segment.start_us >= limit_us

    def _lost_a_track(self, segment: SegmentWriter) -> bool:
        tracks = {StreamKind.VIDEO: segment.video_format, StreamKind.AUDIO: segment.audio_format}
        return any(fmt is not None and kind not in self._active for kind, fmt in tracks.items())

    def _open_segment(self, held: _Held) -> SegmentWriter:
        formats: dict[StreamKind, MediaFormat] = {k: i.format for k, i in self._active.items()}
        formats[held.info.kind] = held.info.format
        video, audio = formats.get(StreamKind.VIDEO), formats.get(StreamKind.AUDIO)
        path = segment_path(self._settings.record_dir, self.sender_id, self._wall.utc(held.frame))
        self.segment = SegmentWriter(
            path,
            sender_id=self.sender_id,
            start_us=held.capture_us,
            video=None if isinstance(video, AudioFormat) else video,
            audio=audio if isinstance(audio, AudioFormat) else None,
        )
        self.stats.segments_opened += 1
        log.debug("recording %s into %s", self.sender_id, path)
        return self.segment

    def _close_segment(self) -> None:
        segment, self.segment = self.segment, None
        if segment is not None:
            self._settings.segment_closed(segment.close())

    def _pause(self, exc: OSError, now: float) -> None:
        self._close_segment()
        self._retry_at = now + self._settings.retry_seconds
        if self.stats.paused:
            return  # still failing: the pause was logged once already
        self.stats.paused = True
        self._paused_at, self._not_recorded_at_pause = now, self.stats.not_recorded - 1
        where = exc.filename or self._settings.record_dir
        log.error(
            "recording paused for %s: %s: %s; live streaming continues; retrying every %g s",
            self.sender_id,
            where,
            exc.strerror or exc,
            self._settings.retry_seconds,
        )

    def _refuse(self, exc: ValueError) -> None:
        if not self._refused:
            self._refused = True
            log.error("not recording %s: %s", self.sender_id, exc)

    def _resume(self, now: float) -> None:
        self._retry_at = None
        self.stats.paused = False
        log.info(
            "recording resumed for %s after %.1f s; %d frames were not recorded",
            self.sender_id,
            now - self._paused_at,
            self.stats.not_recorded - self._not_recorded_at_pause,
        )


def _usable_sender_id(sender_id: str) -> bool:
    try:
        check_path_component(sender_id)
    except ValueError as exc:
        log.error("not recording: %s", exc)
        return False
    return True


class Recorder:
    """The recording ``MediaSink``; see the module docstring. Starts its writer thread."""

    def __init__(
        self,
        record_dir: Path,
        *,
        segment_seconds: float = 60.0,
        retention: RetentionPolicy,
        queue_frames: int = 2000,
        interleave_grace: float = 1.0,
        retry_seconds: float = 5.0,
        retention_seconds: float = 30.0,
        latest_seconds: float = 1.0,
        on_segment_closed: Callable[[ClosedSegment], None] | None = None,
    ) -> None:
        if segment_seconds <= 0:
            raise ValueError(f"segment_seconds must be positive, got {segment_seconds}")
        if queue_frames < 1:
            raise ValueError(f"queue_frames must be at least 1, got {queue_frames}")
        self.record_dir = record_dir
        self._retention = retention
        self._retention_seconds = retention_seconds
        self._next_retention = -math.inf
        self._on_segment_closed = on_segment_closed
        self._settings = _Settings(
            record_dir,
            int(segment_seconds * 1_000_000),
            interleave_grace,
            retry_seconds,
            self._run_retention,
            self._segment_closed,
        )
        self._latest = LatestJpeg(record_dir, interval=latest_seconds)
        self._queue: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._queue_frames = queue_frames
        self._lock = threading.Lock()  # guards the three fields below and the senders dict
        self._queued_frames = 0
        self._dropped: dict[str, int] = {}
        self._closed = False
        self._senders: dict[str, _SenderRecording] = {}
        self._thread = threading.Thread(target=self._run, name="avd-recorder", daemon=True)
        self._thread.start()

    # --- the MediaSink side: on the event loop, never blocking -----------------------------

    def stream_started(self, info: StreamInfo) -> None:
        self._queue.put(_Event("start", info))

    def frame(self, info: StreamInfo, frame: ReceivedFrame) -> None:
        with self._lock:
            if self._closed:
                return
            if self._queued_frames >= self._queue_frames:
                self._dropped[info.sender_id] = self._dropped.get(info.sender_id, 0) + 1
                return
            self._queued_frames += 1
        self._queue.put(_Event("frame", info, frame))

    def stream_ended(self, info: StreamInfo) -> None:
        self._queue.put(_Event("end", info))

    def close(self) -> None:
        """Write out what is queued, close every segment and stop the writer thread.

        Unlike the other sink methods this waits for the disk (usually milliseconds): call
        it at shutdown, or through ``asyncio.to_thread`` from a loop that must stay live.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_Event("stop"))
        self._thread.join(_CLOSE_TIMEOUT)
        if self._thread.is_alive():
            log.warning(
                "recorder: writes to %s still blocked after %g s", self.record_dir, _CLOSE_TIMEOUT
            )

    # --- introspection, from any thread ----------------------------------------------------

    def stats(self) -> dict[str, RecorderStats]:
        with self._lock:
            senders = dict(self._senders)
            dropped = dict(self._dropped)
        stats = {sid: replace(s.stats, dropped=dropped.get(sid, 0)) for sid, s in senders.items()}
        for sid, count in dropped.items():
            stats.setdefault(sid, RecorderStats(dropped=count))
        return stats

    def paused(self, sender_id: str) -> bool:
        sender = self._senders.get(sender_id)
        return sender is not None and sender.stats.paused

    def current_segment(self, sender_id: str) -> Path | None:
        sender = self._senders.get(sender_id)
        segment = None if sender is None else sender.segment
        return None if segment is None else segment.path

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        next_tick = 0.0
        while True:
            try:
                event: _Event | None = self._queue.get(timeout=_TICK_SECONDS)
            except queue.Empty:
                event = None
            if event is not None and event.kind == "stop":
                break
            if event is not None:
                self._safely(functools.partial(self._handle, event), event.kind)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + _TICK_SECONDS
                self._safely(self._tick, "tick")
        self._safely(self._shutdown, "shutdown")

    def _safely(self, step: Callable[[], None], what: str) -> None:
        try:
            step()
        except Exception:
            # A bug must not stop recording for everyone, nor reach the event loop.
            log.exception("recorder: unexpected error in %s", what)

    def _handle(self, event: _Event) -> None:
        if event.kind == "frame":
            with self._lock:
                self._queued_frames -= 1
        assert event.info is not None
        info, now = event.info, time.monotonic()
        sender = self._sender(info.sender_id)
        if event.kind == "start":
            sender.started(info, now)
        elif event.kind == "end":
            sender.ended(info, now)
        elif event.frame is not None:
            if info.kind is StreamKind.VIDEO and sender.usable and not event.frame.late:
                self._latest.offer(info.sender_id, event.frame.data)
            sender.frame(info, event.frame, now)

    def _sender(self, sender_id: str) -> _SenderRecording:
        sender = self._senders.get(sender_id)
        if sender is None:
            sender = _SenderRecording(sender_id, self._settings)
            with self._lock:
                self._senders[sender_id] = sender
        return sender

    def _tick(self) -> None:
        now = time.monotonic()
        for sender in list(self._senders.values()):
            sender.tick(now)
        self._latest.flush_due()
        if now >= self._next_retention:
            self._run_retention()

    def _shutdown(self) -> None:
        now = time.monotonic()
        for sender in list(self._senders.values()):
            sender.close(now)

    def _run_retention(self) -> None:
        self._next_retention = time.monotonic() + self._retention_seconds
        in_use = {s.segment.path for s in self._senders.values() if s.segment is not None}
        try:
            enforce(self._retention, self.record_dir, now=time.time(), in_use=in_use)
        except OSError as exc:
            log.warning("retention of %s failed: %s", self.record_dir, exc.strerror or exc)

    def _segment_closed(self, closed: ClosedSegment) -> None:
        log.debug(
            "closed segment %s (%d video, %d audio)",
            closed.path,
            closed.video_frames,
            closed.audio_chunks,
        )
        if self._on_segment_closed is not None:
            try:
                self._on_segment_closed(closed)
            except Exception:
                log.exception("on_segment_closed callback failed for %s", closed.path)
