"""Dynamic quality: when the link cannot carry the video, lower JPEG quality, then frame rate.

Pure: the sender feeds ``observe`` once per heartbeat interval with what the link did
(live frames dropped from the queue, the longest capture-to-send wait of a live frame, late
frames backfilled) and applies the state it returns. Steps down go quality first (cheaper
for the viewer than losing motion), then frame rate, to the configured floors; steps up go
the other way, one step per ``recover_s`` of health, so the stream creeps back instead of
oscillating. After a step down, the next one waits ``settle_s``: the link needs a moment to
show its effect. While backfilling, the link is busy on purpose, so an interval with
backfill counts neither as congested nor as healthy.
"""

from __future__ import annotations

from dataclasses import dataclass

QUALITY_STEP = 10
FPS_STEPS = (120, 60, 30, 25, 20, 15, 10, 5, 2, 1)


@dataclass(frozen=True, slots=True)
class QualityState:
    quality: int
    fps: int


@dataclass(frozen=True, slots=True)
class LinkReport:
    dropped: int  # live frames the queue dropped since the last report
    max_wait_s: float  # longest capture-to-send wait of a live frame since the last report
    backfilled: int = 0  # late frames sent since the last report


class QualityController:
    def __init__(
        self,
        *,
        quality: int,
        fps: int,
        min_quality: int,
        min_fps: int,
        congested_wait_s: float = 0.25,
        settle_s: float = 2.0,
        recover_s: float = 10.0,
    ) -> None:
        self.best = QualityState(quality, fps)
        self.floor = QualityState(min(min_quality, quality), min(min_fps, fps))
        self.state = self.best
        self.congested_wait_s = congested_wait_s
        self.settle_s = settle_s
        self.recover_s = recover_s
        self._last_change_s = -1e9
        self._healthy_since_s: float | None = None

    def observe(self, report: LinkReport, now_s: float) -> QualityState | None:
        """The new state if it changed, else None."""
        if report.backfilled:
            # Backfill fills the link on purpose, and live frames queue behind it: that is
            # no verdict on whether the live stream fits. Neither step; recovery restarts.
            self._healthy_since_s = None
            return None
        congested = report.dropped > 0 or report.max_wait_s > self.congested_wait_s
        if congested:
            self._healthy_since_s = None
            if now_s - self._last_change_s < self.settle_s:
                return None
            return self._change(self._lower(), now_s)
        if self._healthy_since_s is None:
            self._healthy_since_s = now_s
        if now_s - self._healthy_since_s < self.recover_s:
            return None
        self._healthy_since_s = now_s  # one step per recovery period
        return self._change(self._raise(), now_s)

    def _change(self, new: QualityState, now_s: float) -> QualityState | None:
        if new == self.state:
            return None
        self.state = new
        self._last_change_s = now_s
        return new

    def _lower(self) -> QualityState:
        s, floor = self.state, self.floor
        if s.quality > floor.quality:
            return QualityState(max(floor.quality, s.quality - QUALITY_STEP), s.fps)
        lower = [f for f in FPS_STEPS if f < s.fps]
        return QualityState(s.quality, max(floor.fps, lower[0] if lower else s.fps))

    def _raise(self) -> QualityState:
        s, best = self.state, self.best
        if s.fps < best.fps:
            higher = [f for f in reversed(FPS_STEPS) if f > s.fps]
            return QualityState(s.quality, min(best.fps, higher[0] if higher else best.fps))
        return QualityState(min(best.quality, s.quality + QUALITY_STEP), s.fps)


class FrameDecimator:
    """Keeps frames at no more than ``fps``, by their capture times: the rate reduction.

    At the full rate (``fps`` >= ``full_fps``) it keeps every frame: the source paces itself
    (a file at its own rate, a camera capped by its frame-rate cap), and a source catching up
    after a stall of a busy machine delivers frames closer together than a period, none of
    which may be lost for that (a file streamed whole must be recorded whole).
    """

    def __init__(self, full_fps: int) -> None:
        self.full_fps = full_fps
        self.fps = full_fps  # lowered and restored by the sender's dynamic quality
        self._next_us: int | None = None

    def keep(self, capture_us: int) -> bool:
        if self.fps >= self.full_fps:
            self._next_us = None  # a later reduction starts afresh
            return True
        period = 1_000_000 // max(self.fps, 1)
        # A quarter period of slack: a source at exactly ``fps`` with jitter loses nothing.
        if self._next_us is not None and capture_us < self._next_us - period // 4:
            return False
        base = capture_us if self._next_us is None else max(self._next_us, capture_us - period)
        self._next_us = base + period
        return True
