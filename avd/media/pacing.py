"""Real-time pacing for the synthetic and file sources.

A ``Pacer`` turns "period number n" into an instant on ``avd.clock``: period n is due at
``anchor_us + (n - anchor_n) * period``, computed from the count in integer arithmetic (never
by adding periods up), so a source paced by it never drifts: aiortc paces its audio the same
way, from the sample count rather than the wall clock.

If the loop falls more than a few periods behind (the machine stalled, the process was
stopped), the pacer re-anchors at the late period instead of letting the caller run the
missed periods back to back: a stalled sender resumes at the normal rate and never sends a
burst, which would fill every queue between it and the receiver at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from fractions import Fraction

from avd.clock import monotonic_us

DEFAULT_MAX_LAG_PERIODS = 4
# A floor on the re-anchoring lag, so that ordinary scheduling hiccups of a busy 2-core
# machine (tens of ms) never shift the timeline of a short-period source such as audio.
MIN_MAX_LAG_US = 200_000


class Pacer:
    """Paces a loop at ``frequency`` periods per second from the instant it is created.

    ``frequency`` is a ``Fraction`` so that non-integer periods stay exact: audio chunks of
    1024 frames at 44100 Hz are ``Fraction(44100, 1024)`` periods per second.
    """

    def __init__(
        self,
        frequency: Fraction | int,
        *,
        max_lag_periods: int = DEFAULT_MAX_LAG_PERIODS,
        clock: Callable[[], int] = monotonic_us,
    ) -> None:
        frequency = Fraction(frequency)
        if frequency <= 0:
            raise ValueError(f"pacing frequency must be positive, not {frequency}")
        # period_us = 1e6 * den / num, kept as an exact ratio.
        self._period_num = 1_000_000 * frequency.denominator
        self._period_den = frequency.numerator
        self._clock = clock
        self._max_lag_us = max(max_lag_periods * self.period_us, MIN_MAX_LAG_US)
        self._anchor_n = 0
        self._anchor_us = clock()
        self.reanchors = 0  # how many times the timeline was moved after a stall

    @property
    def period_us(self) -> int:
        """The period, rounded down to a whole microsecond (for display and thresholds)."""
        return self._period_num // self._period_den

    @property
    def start_us(self) -> int:
        """When period 0 was (or would have been) due on the current timeline."""
        return self.due_us(0)

    def due_us(self, n: int) -> int:
        """The instant period ``n`` is due, exact from the count (floor to a microsecond)."""
        return self._anchor_us + (n - self._anchor_n) * self._period_num // self._period_den

    def wait(self, n: int, stop: threading.Event) -> bool:
        """Sleep until period ``n`` is due; False if ``stop`` was set before or meanwhile."""
        now = self._clock()
        if now - self.due_us(n) > self._max_lag_us:
            self._reanchor(n, now)
        while (remaining_us := self.due_us(n) - now) > 0:
            if stop.wait(remaining_us / 1_000_000):
                return False
            now = self._clock()  # Event.wait may wake a little early: check again
        return not stop.is_set()

    def _reanchor(self, n: int, now_us: int) -> None:
        """Make period ``n`` due now: the periods missed during a stall are skipped."""
        self._anchor_n = n
        self._anchor_us = now_us
        self.reanchors += 1
