"""Two senders with one id: told apart from a sender that reconnects.

A new session of a sender replaces its previous one of the same stream: that is how a
sender that lost its connection, or restarted, takes over at once instead of waiting for
the receiver to notice the old connection is dead. But two machines given the same
``AVD_SENDER_ID`` and token (a sender's env file copied to a second camera, or two hosts
cloned from one image, whose host names are the default id) replace each other for ever:
each is told "another sender connected with the same id" and comes back a moment later,
and the recordings of both cameras go into one sender's files.

What tells them apart: a sender that reconnects stopped sending on its old connection a
while before (it found it dead and waits at least a quarter of a second before it tries
again, ``avd.backoff``; a restart under systemd takes 2 s), while of two senders sharing an
id, the one being replaced was still streaming: its last frame came within the stream's
frame interval (50 ms at 20 fps, 23 ms for audio chunks). Streams slower than 5 frames a
second are caught only when a replacement falls soon after one of their frames, which a
pair that keeps replacing each other soon does. A few such replacements of one stream
within a minute are reported, once a minute per sender, with the addresses involved.
Pure: the caller gives the times.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

LIVE_WITHIN_S = 0.2  # a session that received something this recently was still streaming
WINDOW_S = 60.0
THRESHOLD = 3  # live replacements of one stream within the window that make a clash
MAX_KEYS = 4096  # bounded memory, whatever the number of ids


class IdClashes:
    def __init__(self) -> None:
        self._replaced: dict[tuple[str, str], deque[float]] = {}  # (sender, stream): times
        self._addresses: dict[str, dict[str, None]] = {}  # sender: an ordered set of IPs
        self._reported: dict[str, float] = {}  # sender: when

    def replaced(
        self,
        sender_id: str,
        stream: str,
        *,
        old_idle_s: float,
        old_ip: str,
        new_ip: str,
        now: float,
    ) -> str | None:
        """A session of ``sender_id``'s ``stream`` replaced one that had been silent for
        ``old_idle_s``: the warning to log if that makes a clash (once a window), else None."""
        if old_idle_s > LIVE_WITHIN_S:
            return None  # a reconnect: the old connection had gone quiet
        times = _recent(self._replaced, (sender_id, stream), deque)
        times.append(now)
        while now - times[0] > WINDOW_S:
            times.popleft()
        addresses = _recent(self._addresses, sender_id, dict)
        addresses.update({old_ip: None, new_ip: None})
        if len(times) < THRESHOLD or now - self._reported.get(sender_id, -WINDOW_S) < WINDOW_S:
            return None
        _recent(self._reported, sender_id, float)  # bounded like the others
        self._reported[sender_id] = now
        ips = list(self._addresses.pop(sender_id))
        where = f"from {' and '.join(ips)}" if len(ips) > 1 else f"all from {ips[0]}"
        return (
            f"{sender_id}: its {stream} sessions replaced each other {len(times)} times in "
            f"the last {WINDOW_S:g} s while still streaming, {where}: are two senders using "
            f"the id {sender_id} and its token? Give each its own AVD_SENDER_ID and token "
            "(avd token new --sender-id ID)"
        )


def _recent(table: dict[K, V], key: K, make: Callable[[], V]) -> V:
    """``table[key]`` (made if missing), moved to the end; the oldest keys past
    ``MAX_KEYS`` are forgotten."""
    value = table.pop(key) if key in table else make()
    table[key] = value
    while len(table) > MAX_KEYS:
        del table[next(iter(table))]
    return value
