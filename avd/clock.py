"""One monotonic clock for every timestamp, and the clock-offset estimate between peers.

All media and heartbeat timestamps are integer microseconds from ``time.monotonic_ns``.
Both streams of one sender share this clock, so the receiver can align audio and video.

``ClockSync`` is pure (no clock read inside): it is fed the four timestamps of an
NTP-style exchange carried by heartbeats and keeps the estimate from the sample with the
smallest round trip in a sliding window, since queuing delay only ever adds to the RTT
(the same filter NTP's clock-select uses).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


def monotonic_us() -> int:
    """Microseconds on the process-wide monotonic clock."""
    return time.monotonic_ns() // 1000


@dataclass(frozen=True, slots=True)
class SyncSample:
    rtt_us: int
    offset_us: int


class ClockSync:
    """Estimates ``peer_clock + offset = local_clock`` and the round-trip time.

    A heartbeat from the peer carries its send time (peer clock) and echoes our last
    heartbeat's send time (local clock) with how long the peer held it. On receipt at
    ``local_now``: rtt = local_now - echoed - held; the peer's send time corresponds to
    local time ``local_now - rtt / 2``.
    """

    def __init__(self, window: int = 16) -> None:
        self._samples: deque[SyncSample] = deque(maxlen=window)
        # Chosen once per heartbeat, not per frame: every frame's capture time is converted.
        self._best: SyncSample | None = None

    def add(self, *, local_now_us: int, peer_sent_us: int, echoed_us: int, held_us: int) -> None:
        """Record one heartbeat exchange; ignores samples without an echo or with rtt < 0."""
        if echoed_us <= 0:
            return
        rtt = local_now_us - echoed_us - held_us
        if rtt < 0:
            return
        offset = local_now_us - rtt // 2 - peer_sent_us
        self._samples.append(SyncSample(rtt_us=rtt, offset_us=offset))
        self._best = min(self._samples, key=lambda s: s.rtt_us)  # the window may drop the old

    @property
    def ready(self) -> bool:
        return bool(self._samples)

    def best(self) -> SyncSample | None:
        return self._best

    @property
    def rtt_us(self) -> int | None:
        best = self.best()
        return None if best is None else best.rtt_us

    @property
    def offset_us(self) -> int | None:
        best = self.best()
        return None if best is None else best.offset_us

    def to_local(self, peer_us: int) -> int | None:
        """A peer timestamp expressed on the local clock, once an estimate exists."""
        best = self._best
        return None if best is None else peer_us + best.offset_us
