"""Keeps floods out of the log: the first event of a kind from an address is logged, the
rest within the interval are counted and summed up in the next line that is logged.

A receiver on the internet sees scanners and floods; one line per refused connection would
let an attacker fill the journal. Metrics still count every event.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_KEYS = 4096  # bounded memory, whatever the number of addresses


class LogThrottle:
    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def admit(self, kind: str, source: str, now: float) -> int | None:
        """None: stay quiet. Otherwise log, mentioning this many suppressed since last time."""
        key = (kind, source)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > MAX_KEYS:
            self._last.popitem(last=False)
        return last[1] if last is not None else 0


def suppressed_note(count: int) -> str:
    return f" ({count} more like it since the last report)" if count else ""
