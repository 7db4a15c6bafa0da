"""Putting one sender's two streams back in capture order, and naming its files in UTC.

A sender's video and audio travel on two connections, so they reach the recorder out of
step; a Matroska file wants its packets in capture order. ``Interleaver`` is the watermark
merge that restores it; ``WallClock`` turns the sender's capture clock into the UTC times
segment files are named by. Both are used on the recorder's writer thread only.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from avd.clock import monotonic_us
from avd.media.base import ReceivedFrame, StreamInfo, StreamKind


@dataclass(order=True, slots=True)
class Held:
    """A frame waiting in the interleaver; ordered by capture time, then arrival."""

    capture_us: int
    order: int
    info: StreamInfo = field(compare=False)
    frame: ReceivedFrame = field(compare=False)
    held_since: float = field(compare=False)


class Interleaver:
    """Merges one sender's streams back into capture order (a watermark merge).

    The oldest held frame goes out once every active stream has delivered something at
    least as recent (nothing older can come from it any more), or once it has been held
    ``grace`` seconds of wall time, or (with ``capture_grace``) once a frame ``grace``
    seconds newer in capture time has come: a stalled stream delays the other by at most
    that much. Backfill turns ``capture_grace`` off: spooled frames arrive in bursts, far
    faster than real time, and one stream's burst must not push out the other's.
    """

    def __init__(self, grace: float, *, capture_grace: bool = True) -> None:
        self._grace = grace
        self._grace_us = int(grace * 1_000_000) if capture_grace else None
        self._heap: list[Held] = []
        self._order = itertools.count()
        self._watermark: dict[StreamKind, int] = {}

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def newest_us(self) -> int | None:
        """The newest capture time pushed of any stream (since its last restart)."""
        return max(self._watermark.values(), default=None)

    def kinds_seen(self) -> set[StreamKind]:
        return set(self._watermark)

    def push(self, info: StreamInfo, frame: ReceivedFrame, now: float) -> None:
        held = Held(frame.capture_us, next(self._order), info, frame, now)
        heapq.heappush(self._heap, held)
        kind = info.kind
        self._watermark[kind] = max(self._watermark.get(kind, frame.capture_us), frame.capture_us)

    def restart(self, kind: StreamKind) -> None:
        """A new session of ``kind``: its old watermark says nothing about the new one."""
        self._watermark.pop(kind, None)

    def pop_ready(self, now: float, active: set[StreamKind], *, hold: bool) -> list[Held]:
        """Frames that may go out now; ``hold`` keeps all but overdue ones back."""
        ready: list[Held] = []
        newest = max(self._watermark.values(), default=0)
        while self._heap:
            head = self._heap[0]
            overdue = now - head.held_since >= self._grace or (
                self._grace_us is not None and newest - head.capture_us >= self._grace_us
            )
            caught_up = all(self._watermark.get(k, -1) >= head.capture_us for k in active)
            if not (overdue or (caught_up and not hold)):
                break
            ready.append(heapq.heappop(self._heap))
        return ready

    def pop_all(self) -> list[Held]:
        ready = sorted(self._heap)
        self._heap.clear()
        return ready


class WallClock:
    """UTC for file names from a sender's capture clock.

    With a clock-sync estimate (``local_capture_us``) the capture time is exact on our
    clock; without one, the first live frame anchors the sender's clock to the wall clock at
    its arrival, so later segments (and backfill segments, before it) are named by their
    capture times. A late frame never anchors: it arrived long after its capture.
    """

    def __init__(self) -> None:
        self._anchor: tuple[int, float] | None = None  # (capture µs, epoch seconds)

    def reset(self) -> None:
        self._anchor = None

    def observe(self, frame: ReceivedFrame) -> None:
        """Anchor on ``frame`` if nothing anchors yet and it is a live frame."""
        if self._anchor is None and not frame.late:
            self._anchor = (frame.capture_us, self._seen_at(frame.arrival_us))

    def utc(self, frame: ReceivedFrame) -> datetime:
        if frame.local_capture_us is not None:
            return datetime.fromtimestamp(self._seen_at(frame.local_capture_us), UTC)
        self.observe(frame)
        if self._anchor is None:  # a late frame before any live one: its arrival is all we know
            return datetime.fromtimestamp(self._seen_at(frame.arrival_us), UTC)
        capture0, wall0 = self._anchor
        return datetime.fromtimestamp(wall0 + (frame.capture_us - capture0) / 1_000_000, UTC)

    @staticmethod
    def _seen_at(local_us: int) -> float:
        """Epoch seconds of an instant on our monotonic clock (µs)."""
        return time.time() - max(0, monotonic_us() - local_us) / 1_000_000
