"""The receiver's recorder: every sender's streams into segmented, crash-safe Matroska files.

Threading: the ``MediaSink`` methods run on the receiver's event loop and never touch the
disk; they hand events to ONE writer thread through a queue bounded at ``queue_frames``
frames and ``queue_bytes`` of media (a frame that finds it full is dropped and counted as
``dropped``; start/end events are never dropped). The writer thread owns every file:
segments, latest.jpg, retention. The daemons run all of this in a child process of its own
(``avd.media.recorder_process`` and ``recorder_child``), away from the event loop's GIL.
What becomes of each frame, per sender, is ``avd.media.recording``'s business: live and
backfill segments (``avd.media.chain``), duplicates (``avd.media.recorded_index``), pauses.
A sender's first stream in this process makes the writer read what it recorded in the last
``dedupe_window_s`` (about 0.1 s for 120 s of A/V); its frames queue up meanwhile.

Acknowledgements: ``on_done(batch)`` is called on the writer thread, and only there, with
(sender id, kind, seq) for every frame the recorder is finished with, each exactly once:
written and in the file (so a kill -9 of the receiver cannot lose it), recognised as a
duplicate, or given up (queue full, recording paused, unusable sender id or format, no
segment could take it). Batches go out at most every ``_REPORT_SECONDS`` and when the
writer stops. A written frame waits for its cluster to reach the file: until the next video
frame starts a cluster (250 ms for audio alone), after at most ``interleave_grace`` (live) or
``max(interleave_grace, backfill_idle_s)`` (backfill) in the interleaver. The callback
must be quick and must not block (hand the batch to the event loop with
``loop.call_soon_threadsafe``); an exception it raises is logged and ignored. Frames
offered after ``close()`` are neither recorded nor reported.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from avd.media.base import ReceivedFrame, SinkEvent, StreamInfo, StreamKind
from avd.media.chain import ChainSettings
from avd.media.done import FrameDone, OnDone, Overflow, RecorderStats
from avd.media.latest import LatestJpeg
from avd.media.recording import RecordingSettings, SenderRecording
from avd.media.retention import RetentionPolicy, enforce
from avd.media.segment import ClosedSegment

__all__ = ["FrameDone", "OnDone", "Recorder", "RecorderStats", "SinkEvent"]

log = logging.getLogger(__name__)

# How long a writer waits without events before it releases held frames and does its timed
# work (also done after events, when due). Longer than the receiver's batch interval (at most
# 0.5 s, ``recorder_process._FLUSH_DELAY_S``), so that a steady stream's batches carry it:
# at one 20 fps stream, 0.1 s here woke the writer twice per batch, 22 times a second.
_TICK_SECONDS = 0.6
# With no stream open and a quiet tick behind it, the writer waits this long instead: a
# receiver left alone for hours wakes once a second here, not ten times (timed work such as
# retention or a backfill's last segment is then up to a second late; nothing is waiting).
_IDLE_TICK_SECONDS = 1.0
_REPORT_SECONDS = 0.05  # how often finished frames are reported: batches, not one per frame
_BATCH_EVENTS = 256  # events handled in a row before timed work gets its turn
_CLOSE_TIMEOUT = 30.0  # seconds close() waits for the writer (a hung NFS mount, say)


class Recorder:
    """The recording ``MediaSink``; see the module docstring. Starts its writer thread.

    ``dedupe_window_s``: how far back (by when they were written) recordings are checked for
    frames sent again. ``backfill_idle_s``: a backfill segment closes once no late frame of
    its sender has come for this long.
    """

    def __init__(
        self,
        record_dir: Path,
        *,
        segment_seconds: float = 60.0,
        retention: RetentionPolicy,
        queue_frames: int | None = 2000,
        queue_bytes: int | None = None,
        interleave_grace: float = 1.0,
        retry_seconds: float = 5.0,
        retention_seconds: float = 30.0,
        latest_seconds: float = 1.0,
        dedupe_window_s: float = 120.0,
        backfill_idle_s: float = 3.0,
        on_segment_closed: Callable[[ClosedSegment], None] | None = None,
        on_done: OnDone | None = None,
    ) -> None:
        if segment_seconds <= 0:
            raise ValueError(f"segment_seconds must be positive, got {segment_seconds}")
        if queue_frames is not None and queue_frames < 1:
            raise ValueError(f"queue_frames must be at least 1, got {queue_frames}")
        self.record_dir = record_dir
        self._retention = retention
        self._retention_seconds = retention_seconds
        self._next_retention = -math.inf
        self._on_segment_closed = on_segment_closed
        self._on_done = on_done
        chain = ChainSettings(
            record_dir,
            int(segment_seconds * 1_000_000),
            interleave_grace,
            max(interleave_grace, backfill_idle_s),
            self._segment_closed,
            self._run_retention,
        )
        self._settings = RecordingSettings(chain, retry_seconds, dedupe_window_s, backfill_idle_s)
        self._latest = LatestJpeg(record_dir, interval=latest_seconds)
        self._queue: queue.SimpleQueue[SinkEvent | list[SinkEvent]] = queue.SimpleQueue()
        self._queue_frames = queue_frames if queue_frames is not None else 1 << 62  # None: no bound
        self._queue_bytes = queue_bytes if queue_bytes is not None else 1 << 62
        self._queued_bytes = 0
        self._lock = threading.Lock()  # guards the four fields below and the senders dict
        self._queued_frames = 0
        limits = [f"{queue_frames} frames"] if queue_frames is not None else []
        if queue_bytes is not None:
            limits.append(f"{queue_bytes / (1024 * 1024):g} MiB, AVD_RECORD_BUFFER_MB")
        self._overflow = Overflow(
            f"the writer is behind, its queue is full ({' or '.join(limits)})",
            "is the disk slow, or the machine short of CPU for this many senders?",
            log,
        )
        self._closed = False
        self._senders: dict[str, SenderRecording] = {}
        self._open_streams: set[int] = set()  # session ids; the writer thread's only
        self._thread = threading.Thread(target=self._run, name="avd-recorder", daemon=True)
        self._thread.start()

    # --- the MediaSink side: on the event loop, never blocking -----------------------------

    def stream_started(self, info: StreamInfo) -> None:
        self._queue.put(SinkEvent("start", info))

    def frame(self, info: StreamInfo, frame: ReceivedFrame) -> None:
        with self._lock:
            if self._closed or not self._admit(info, frame):
                return
        self._queue.put(SinkEvent("frame", info, frame))

    def feed(self, events: Iterable[SinkEvent]) -> None:
        """Sink calls in their order, handed to the writer thread in one go. The recording
        process feeds each read of its inbox so: one wake-up of the writer per read, not one
        per frame, each of which cost a round of GIL hand-offs between the two threads."""
        with self._lock:
            if self._closed:
                return
            kept = [e for e in events if e.frame is None or self._admit(e.info, e.frame)]
        if kept:
            self._queue.put(kept)

    def _admit(self, info: StreamInfo | None, frame: ReceivedFrame) -> bool:
        """Count a frame into the queue, or drop it if the queue is full (lock held)."""
        assert info is not None
        size = len(frame.data)
        if (
            self._queued_frames >= self._queue_frames
            or self._queued_bytes + size > self._queue_bytes
        ):
            self._overflow.add(info.sender_id, info.kind, frame.seq)
            return False
        self._overflow.admitted()
        self._queued_frames += 1
        self._queued_bytes += size
        return True

    def stream_ended(self, info: StreamInfo) -> None:
        self._queue.put(SinkEvent("end", info))

    def close(self) -> None:
        """Write out what is queued, close every segment, report and stop the writer thread.

        Unlike the other sink methods this waits for the disk (usually milliseconds): call
        it at shutdown, or through ``asyncio.to_thread`` from a loop that must stay live.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._overflow.finish()
        self._queue.put(SinkEvent("stop"))
        self._thread.join(_CLOSE_TIMEOUT)
        if self._thread.is_alive():
            log.warning(
                "recorder: writes to %s still blocked after %g s", self.record_dir, _CLOSE_TIMEOUT
            )

    # --- introspection, from any thread ----------------------------------------------------

    @property
    def queued_frames(self) -> int:
        """Frames waiting for the writer: a sender far ahead of the disk shows here first."""
        with self._lock:
            return self._queued_frames

    def stats(self) -> dict[str, RecorderStats]:
        with self._lock:
            senders = dict(self._senders)
            dropped = dict(self._overflow.dropped)
        stats = {sid: replace(s.stats, dropped=dropped.get(sid, 0)) for sid, s in senders.items()}
        for sid, count in dropped.items():
            stats.setdefault(sid, RecorderStats(dropped=count))
        return stats

    def paused(self, sender_id: str) -> bool:
        sender = self._senders.get(sender_id)
        return sender is not None and sender.stats.paused

    def current_segment(self, sender_id: str) -> Path | None:
        """The live segment being written for ``sender_id``, if any."""
        sender = self._senders.get(sender_id)
        segment = None if sender is None else sender.live.segment
        return None if segment is None else segment.path

    def backfill_segment(self, sender_id: str) -> Path | None:
        """The backfill segment being written for ``sender_id``, if any."""
        sender = self._senders.get(sender_id)
        segment = None if sender is None else sender.backfill.segment
        return None if segment is None else segment.path

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        next_tick = next_report = 0.0
        stopping = quiet = False
        while not stopping:
            idle = quiet and not self._open_streams
            events = self._next_events(_IDLE_TICK_SECONDS if idle else _TICK_SECONDS)
            quiet = not events
            for event in events:
                if event.kind == "stop":
                    stopping = True
                    break
                self._safely(functools.partial(self._handle, event), event.kind)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + _TICK_SECONDS
                self._safely(self._tick, "tick")
            if now >= next_report:
                next_report = now + _REPORT_SECONDS
                self._safely(self._report_done, "done report")
        self._safely(self._shutdown, "shutdown")
        self._safely(self._report_done, "done report")

    def _next_events(self, wait_s: float) -> list[SinkEvent]:
        """The next events (waiting up to ``wait_s``), and those queued behind them."""
        events: list[SinkEvent] = []
        try:
            item = self._queue.get(timeout=wait_s)
        except queue.Empty:
            return events
        while True:
            if isinstance(item, list):
                events += item
            else:
                events.append(item)
            if len(events) >= _BATCH_EVENTS:
                return events
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return events

    def _safely(self, step: Callable[[], None], what: str) -> None:
        try:
            step()
        except Exception:
            # A bug must not stop recording for everyone, nor reach the event loop.
            log.exception("recorder: unexpected error in %s", what)

    def _handle(self, event: SinkEvent) -> None:
        if event.kind == "frame":
            assert event.frame is not None
            with self._lock:
                self._queued_frames -= 1
                self._queued_bytes -= len(event.frame.data)
        assert event.info is not None
        info, now = event.info, time.monotonic()
        sender = self._sender(info.sender_id)
        if event.kind == "start":
            self._open_streams.add(info.session_id)
            sender.started(info, now)
        elif event.kind == "end":
            self._open_streams.discard(info.session_id)
            sender.ended(info, now)
        elif event.frame is not None:
            if info.kind is StreamKind.VIDEO and sender.usable and not event.frame.late:
                self._latest.offer(info.sender_id, event.frame.data)
            sender.frame(info, event.frame, now)

    def _sender(self, sender_id: str) -> SenderRecording:
        sender = self._senders.get(sender_id)
        if sender is None:
            sender = SenderRecording(sender_id, self._settings)
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

    def _report_done(self) -> None:
        with self._lock:
            batch = self._overflow.take()
        for sender in list(self._senders.values()):
            batch += [(sender.sender_id, kind, seq) for kind, seq in sender.take_done()]
        if batch and self._on_done is not None:
            try:
                self._on_done(batch)
            except Exception:
                log.exception("recorder: on_done callback failed")

    def _shutdown(self) -> None:
        now = time.monotonic()
        for sender in list(self._senders.values()):
            sender.close(now)

    def _run_retention(self) -> None:
        self._next_retention = time.monotonic() + self._retention_seconds
        in_use = {
            chain.segment.path
            for sender in self._senders.values()
            for chain in (sender.live, sender.backfill)
            if chain.segment is not None
        }
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
