"""One sender's recording, as the recorder's writer thread sees it.

``SenderRecording`` decides what becomes of each frame and says when it is done with it:

- a frame already recorded (``RecordedIndex``: re-sent after a lost acknowledgement or a
  receiver crash) is a duplicate: not written, done at once;
- a live frame goes to the live chain; a late frame (from the sender's spool) joins the live
  chain only if it is newer than everything in it, else the backfill chain, which records it
  at its own capture time in ``-backfill`` segments (see ``avd.media.chain``), closed once
  no late frame has come for ``backfill_idle_s``;
- a written frame is done once its packet is in the file (``SegmentWriter.take_durable``);
- a frame that cannot be recorded is given up, and done too, so that the sender's cumulative
  acknowledgement never waits for it: the sender id is unusable, its format is refused,
  recording is paused (an OSError, a full disk: one error log, a retry every
  ``retry_seconds``, retention first, one info log on resuming), or it does not fit its
  segment (``out_of_order``, or ``late_dropped`` for late frames).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Literal

from avd.logs import LogEvent, log_event
from avd.media.base import ReceivedFrame, StreamInfo, StreamKind
from avd.media.chain import ChainSettings, Done, SegmentChain
from avd.media.done import RecorderStats
from avd.media.interleave import Held, WallClock
from avd.media.naming import check_path_component
from avd.media.recorded_index import RecordedIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecordingSettings:
    chain: ChainSettings
    retry_seconds: float
    dedupe_window_s: float
    backfill_idle_s: float


_Reason = Literal["not_recorded", "late_dropped", "out_of_order"]  # RecorderStats fields


@dataclass(slots=True)
class _Pause:
    retry_at: float = math.inf
    since: float = 0.0
    not_recorded_before: int = 0


class SenderRecording:
    """Everything the writer thread knows about one sender; see the module docstring."""

    def __init__(self, sender_id: str, settings: RecordingSettings) -> None:
        self.sender_id = sender_id
        self.usable = _usable_sender_id(sender_id)
        self._stats = RecorderStats()
        self._settings = settings
        self._active: dict[StreamKind, StreamInfo] = {}
        self._wall = WallClock()
        chains = [
            SegmentChain(
                sender_id, settings.chain, active=self._active, wall=self._wall, backfill=b
            )
            for b in (False, True)
        ]
        self.live, self.backfill = chains
        self._index: RecordedIndex | None = None
        self._done: list[Done] = []
        self._last_late = -math.inf
        self._pause: _Pause | None = None  # set while recording is paused
        self._refused_logged = False  # a format was refused: logged once

    @property
    def stats(self) -> RecorderStats:
        """A snapshot; the chains count their own segments, and the frames a failed close
        lost after they were written (counted as not recorded instead)."""
        s, lost = self._stats, self.live.unwritten + self.backfill.unwritten
        return replace(
            s,
            video_frames=s.video_frames - lost[StreamKind.VIDEO],
            audio_chunks=s.audio_chunks - lost[StreamKind.AUDIO],
            segments_opened=self.live.opened + self.backfill.opened,
            backfill_segments=self.backfill.opened,
            not_recorded=s.not_recorded + lost.total(),
        )

    # --- events ----------------------------------------------------------------------------

    def started(self, info: StreamInfo, now: float) -> None:
        self._active[info.kind] = info
        self.live.restart(info.kind)
        self.backfill.restart(info.kind)
        if self.usable:
            self._ensure_index()
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
        kind = info.kind
        if not self.usable:
            self._give_up(kind, frame, "not_recorded")
            return
        index = self._ensure_index()
        if index.seen(kind, frame.capture_us):
            self._stats.duplicates += 1
            self._done.append((kind, frame.seq))
            return
        index.claim(kind, frame.capture_us)
        chain = self.live
        if frame.late:
            self._last_late = now
            if not self.live.takes_late(info, frame.capture_us):
                chain = self.backfill
        else:
            self._wall.observe(frame)
        chain.push(info, frame, now)
        self._release(now)

    def tick(self, now: float) -> None:
        self._release(now)
        if self._index is not None:
            self._index.expire()  # a sender that went away frees its index too
        if not self.backfill.idle and now - self._last_late >= self._settings.backfill_idle_s:
            self._finish(self.backfill, now)  # the spool has been sent: close its segment

    def close(self, now: float) -> None:
        """Write out every held frame and close the segments (the sender's streams ended)."""
        for chain in (self.live, self.backfill):
            self._finish(chain, now)
        self._wall.reset()

    def take_done(self) -> list[Done]:
        """(kind, seq) of every frame finished with since the previous call, once each."""
        done, self._done = self._done, []
        return done + self.live.take_done() + self.backfill.take_done()

    # --- writing ---------------------------------------------------------------------------

    def _ensure_index(self) -> RecordedIndex:
        if self._index is None:
            self._index = RecordedIndex(self._settings.dedupe_window_s)
            sender_dir = self._settings.chain.record_dir / self.sender_id
            load = self._index.load(sender_dir, self.sender_id)
            if load.files:
                log.info(
                    "%s: %d frames recorded in the last %g s (%d segments, indexed in %.0f ms)",
                    self.sender_id,
                    load.frames,
                    self._settings.dedupe_window_s,
                    load.files,
                    load.seconds * 1000,
                )
        return self._index

    def _finish(self, chain: SegmentChain, now: float) -> None:
        for held in chain.drain():
            self._record(chain, held, now)
        chain.finish()

    def _release(self, now: float) -> None:
        for chain in (self.live, self.backfill):
            for held in chain.ready(now):
                self._record(chain, held, now)

    def _record(self, chain: SegmentChain, held: Held, now: float) -> None:
        kind, frame = held.info.kind, held.frame
        if self._pause is not None:
            if now < self._pause.retry_at:
                self._give_up(kind, frame, "not_recorded")
                return
            self._settings.chain.before_roll()  # retention may free the space we need
        try:
            written = chain.write(held)
        except OSError as exc:
            self._give_up(kind, frame, "not_recorded")
            self._pause_for(exc, now)
            return
        except ValueError as exc:  # a format no segment can hold; the sender is told nothing
            self._give_up(kind, frame, "not_recorded")
            self._refuse(exc)
            return
        if self._pause is not None:
            self._resume(now)
        if not written:
            self._give_up(kind, frame, "late_dropped" if frame.late else "out_of_order")
            return
        if kind is StreamKind.VIDEO:
            self._stats.video_frames += 1
        else:
            self._stats.audio_chunks += 1
        self._stats.bytes += len(frame.data)
        if frame.late:
            self._stats.late_recorded += 1

    def _give_up(self, kind: StreamKind, frame: ReceivedFrame, reason: _Reason) -> None:
        setattr(self._stats, reason, getattr(self._stats, reason) + 1)
        self._done.append((kind, frame.seq))
        if self._index is not None:
            self._index.release(kind, frame.capture_us)  # a copy sent again may be recorded

    def _pause_for(self, exc: OSError, now: float) -> None:
        for chain in (self.live, self.backfill):
            chain.close_segment()
        if self._pause is not None:
            self._pause.retry_at = now + self._settings.retry_seconds
            return  # still failing: the pause was logged once already
        self._pause = _Pause(now + self._settings.retry_seconds, now, self._stats.not_recorded - 1)
        self._stats.paused = True
        message = (
            f"recording paused for {self.sender_id}: "
            f"{exc.filename or self._settings.chain.record_dir}: {exc.strerror or exc}; "
            f"live streaming continues; retrying every {self._settings.retry_seconds:g} s"
        )
        log_event(log, logging.ERROR, LogEvent.RECORDING_PAUSED, message, sender_id=self.sender_id)

    def _refuse(self, exc: ValueError) -> None:
        if not self._refused_logged:
            self._refused_logged = True
            log.error("not recording %s: %s", self.sender_id, exc)

    def _resume(self, now: float) -> None:
        pause, self._pause = self._pause, None
        assert pause is not None
        self._stats.paused = False
        message = (
            f"recording resumed for {self.sender_id} after {now - pause.since:.1f} s; "
            f"{self._stats.not_recorded - pause.not_recorded_before} frames were not recorded"
        )
        log_event(log, logging.INFO, LogEvent.RECORDING_RESUMED, message, sender_id=self.sender_id)


def _usable_sender_id(sender_id: str) -> bool:
    try:
        check_path_component(sender_id)
    except ValueError as exc:
        log.error("not recording: %s", exc)
        return False
    return True
