"""The sender's spool: every captured frame until the receiver acknowledges recording it.

Live frames go out through a small drop-oldest queue; the spool is the memory behind it.
A frame stays here from capture until an ack covers its sequence number, so frames the
live queue dropped (a slow link) or captured while the receiver was away (an outage) are
still here, and are sent as *late* frames behind the live ones once the link allows. After
a receiver crash, whatever it had not acknowledged is sent again; the receiver drops what it
already recorded.

Bounded two ways: ``max_bytes`` and ``max_age_us`` of capture time (``AVD_SPOOL_SECONDS``).
Beyond either, the oldest unacknowledged frames are evicted and counted as lost: an outage
shorter than the spool loses nothing.

Written by the capture thread, read and acknowledged on the event loop: one lock guards it.
Frames are kept in sequence order (sequence numbers are assigned at capture, increasing).
"""

from __future__ import annotations

import bisect
import threading

from avd.media.base import CapturedFrame


class Spool:
    def __init__(self, *, max_bytes: int, max_age_us: int) -> None:
        self.max_bytes = max_bytes
        self.max_age_us = max_age_us
        self._seqs: list[int] = []  # increasing; entries before _head are gone
        self._frames: dict[int, CapturedFrame] = {}
        self._head = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self.lost = 0  # evicted before any ack covered them
        self.acked_seq = -1
        self._newest_seq = -1

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def bytes(self) -> int:
        return self._bytes

    def add(self, seq: int, frame: CapturedFrame) -> int:
        """Keep ``frame`` until acknowledged; returns how many old frames were evicted."""
        with self._lock:
            if seq <= self.acked_seq:
                return 0
            self._seqs.append(seq)
            self._frames[seq] = frame
            self._newest_seq = max(self._newest_seq, seq)
            self._bytes += len(frame.data)
            return self._evict(frame.capture_us)

    def _evict(self, newest_us: int) -> int:
        evicted = 0
        while self._frames and (
            self._bytes > self.max_bytes
            or newest_us - self._frames[self._seqs[self._head]].capture_us > self.max_age_us
        ):
            self._pop_oldest()
            evicted += 1
        self.lost += evicted
        return evicted

    def _pop_oldest(self) -> None:
        seq = self._seqs[self._head]
        self._head += 1
        frame = self._frames.pop(seq)
        self._bytes -= len(frame.data)
        if self._head > 1024 and self._head * 2 > len(self._seqs):
            del self._seqs[: self._head]  # amortised compaction of the consumed prefix
            self._head = 0

    def ack(self, seq: int) -> int:
        """Forget every frame up to and including ``seq``; returns how many."""
        with self._lock:
            self.acked_seq = max(self.acked_seq, seq)
            forgotten = 0
            while self._frames and self._seqs[self._head] <= seq:
                self._pop_oldest()
                forgotten += 1
            return forgotten

    def oldest_seq(self) -> int | None:
        with self._lock:
            return self._seqs[self._head] if self._frames else None

    def floor(self) -> int:
        """The lowest seq still held; if none, one past everything ever added or acked."""
        with self._lock:
            if self._frames:
                return self._seqs[self._head]
            return max(self._newest_seq, self.acked_seq) + 1

    def next_after(self, seq: int) -> tuple[int, CapturedFrame] | None:
        """The oldest frame whose sequence number is greater than ``seq``."""
        with self._lock:
            index = bisect.bisect_right(self._seqs, seq, lo=self._head)
            if index >= len(self._seqs):
                return None
            found = self._seqs[index]
            return found, self._frames[found]
