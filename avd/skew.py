"""Audio/video skew per sender: how much later video arrives than audio, for the same instant.

Both streams of a sender carry capture times from one clock, and the receiver knows each
frame's arrival time, so each stream has a capture-to-arrival delay. The skew is the
difference of the two delays, smoothed (an exponentially weighted mean, so one late frame
does not swing it): positive when video lags audio. A player that aligns by capture time
(as recordings do) hides it; live playback and monitoring want to see it.
"""

from __future__ import annotations

from avd.media.base import StreamKind

SMOOTHING = 0.1  # weight of the newest sample: settles within ~20 frames


class SkewTracker:
    def __init__(self) -> None:
        self._delay_s: dict[tuple[str, StreamKind], float] = {}

    def observe(self, sender_id: str, kind: StreamKind, delay_s: float) -> float | None:
        """Record one frame's delay; returns the sender's skew once both streams have one."""
        key = (sender_id, kind)
        previous = self._delay_s.get(key)
        self._delay_s[key] = (
            delay_s if previous is None else previous + SMOOTHING * (delay_s - previous)
        )
        return self.skew(sender_id)

    def skew(self, sender_id: str) -> float | None:
        video = self._delay_s.get((sender_id, StreamKind.VIDEO))
        audio = self._delay_s.get((sender_id, StreamKind.AUDIO))
        if video is None or audio is None:
            return None
        return video - audio

    def forget(self, sender_id: str, kind: StreamKind) -> None:
        """A stream ended: its old delay must not pair with a new session's."""
        self._delay_s.pop((sender_id, kind), None)
