"""The sender's spool: every captured frame until the receiver acknowledges recording it.

Live frames go out through a small drop-oldest queue; the spool is the memory behind it.
A frame stays here from capture until an ack covers its sequence number, so frames the
live queue dropped (a slow link) or captured while the receiver was away (an outage) are
still here, and are sent as *late* frames behind the live ones once the link allows. After
a receiver crash, whatever it had not acknowledged is sent again; the receiver drops what it
already recorded.

Two tiers. Memory holds up to ``max_bytes``; beyond it, the oldest frames move to the disk
tier (``avd.diskspool``, when ``AVD_SPOOL_DIR`` is set), which has a cap of its own and
survives a restart. Every frame on disk is older than every frame in memory, so the spool
is one sequence: disk then memory. Frames older than ``max_age_us`` of capture time
(``AVD_SPOOL_SECONDS``) than the newest, or beyond both caps, are evicted and counted as
lost: an outage shorter than the spool loses nothing.

Written by the capture thread (``add``, which may write to disk: bounded to about the frame
it adds), read and acknowledged on the event loop (a disk read is one pread): one lock
guards it. Frames are kept in sequence order (sequence numbers are assigned at capture,
increasing); after a restart the sender numbers on from ``next_seq_hint()``.
"""

from __future__ import annotations

import bisect
import threading
from pathlib import Path

from avd.diskspool import DiskSpool, sync_and_close
from avd.media.base import CapturedFrame


class Spool:
    def __init__(self, *, max_bytes: int, max_age_us: int, disk: DiskSpool | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_age_us = max_age_us
        self.disk = disk
        self._seqs: list[int] = []  # in memory, increasing; entries before _head are gone
        self._frames: dict[int, CapturedFrame] = {}
        self._head = 0
        self._memory_bytes = 0
        self._lock = threading.Lock()
        self._memory_lost = 0  # evicted from memory before any ack covered them
        self._lost_reported = 0  # what add() has returned so far, in total
        self.acked_seq = -1
        self._newest_seq = disk.newest_seq if disk is not None else -1

    # Read without the lock by the metrics endpoint's thread: one read of self.disk each.
    def __len__(self) -> int:
        disk = self.disk
        return len(self._frames) + (len(disk) if disk is not None else 0)

    @property
    def bytes(self) -> int:
        """Payload bytes held, memory and disk."""
        disk = self.disk
        return self._memory_bytes + (disk.bytes if disk is not None else 0)

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    @property
    def lost(self) -> int:
        """Frames evicted (or unreadable on disk) before any ack covered them."""
        return self._memory_lost + (self.disk.lost if self.disk is not None else 0)

    def add(self, seq: int, frame: CapturedFrame) -> int:
        """Keep ``frame`` until acknowledged; returns how many frames were lost since the
        last call (evicted now, or found unreadable on disk meanwhile)."""
        with self._lock:
            if seq <= self.acked_seq:
                return 0
            self._seqs.append(seq)
            self._frames[seq] = frame
            self._newest_seq = max(self._newest_seq, seq)
            self._memory_bytes += len(frame.data)
            self._evict(frame.capture_us)
            newly_lost, self._lost_reported = self.lost - self._lost_reported, self.lost
            full_segments = self.disk.take_unsynced() if self.disk is not None else []
        sync_and_close(full_segments)  # fsync outside the lock: the event loop never waits
        return newly_lost

    def _evict(self, newest_us: int) -> None:
        limit_us = newest_us - self.max_age_us
        if self.disk is not None:
            self.disk.evict_older_than(limit_us)  # older than anything in memory
        while self._frames and self._frames[self._seqs[self._head]].capture_us < limit_us:
            self._pop_oldest()
            self._memory_lost += 1
        while self._memory_bytes > self.max_bytes:
            seq, frame = self._pop_oldest()
            if self.disk is not None:
                self.disk.append(seq, frame)  # counts its own losses
            else:
                self._memory_lost += 1

    def _pop_oldest(self) -> tuple[int, CapturedFrame]:
        seq = self._seqs[self._head]
        self._head += 1
        frame = self._frames.pop(seq)
        self._memory_bytes -= len(frame.data)
        if self._head > 1024 and self._head * 2 > len(self._seqs):
            del self._seqs[: self._head]  # amortised compaction of the consumed prefix
            self._head = 0
        return seq, frame

    def ack(self, seq: int) -> int:
        """Forget every frame up to and including ``seq``; returns how many."""
        with self._lock:
            self.acked_seq = max(self.acked_seq, seq)
            forgotten = self.disk.drop_through(seq) if self.disk is not None else 0
            while self._frames and self._seqs[self._head] <= seq:
                self._pop_oldest()
                forgotten += 1
            return forgotten

    def oldest_seq(self) -> int | None:
        with self._lock:
            return self._oldest_seq()

    def _oldest_seq(self) -> int | None:
        on_disk = self.disk.oldest() if self.disk is not None else None
        if on_disk is not None:
            return on_disk[0]
        return self._seqs[self._head] if self._frames else None

    def floor(self) -> int:
        """The lowest seq still held; if none, one past everything ever added or acked."""
        with self._lock:
            oldest = self._oldest_seq()
            return max(self._newest_seq, self.acked_seq) + 1 if oldest is None else oldest

    def next_seq_hint(self) -> int:
        """Where the sender's numbering starts: above every seq held, acked or found on disk."""
        with self._lock:
            return max(self._newest_seq, self.acked_seq) + 1

    def next_after(self, seq: int) -> tuple[int, CapturedFrame] | None:
        """The oldest frame whose sequence number is greater than ``seq``."""
        with self._lock:
            if self.disk is not None and (found := self.disk.next_after(seq)) is not None:
                return found
            index = bisect.bisect_right(self._seqs, seq, lo=self._head)
            if index >= len(self._seqs):
                return None
            found_seq = self._seqs[index]
            return found_seq, self._frames[found_seq]

    def close(self) -> Path | None:
        """At shutdown, after the last ``add``: frames in memory go to disk, so a restart
        sends them; the disk tier is closed. Returns its folder, None without a disk tier
        (the frames held are then lost with the process)."""
        with self._lock:
            if self.disk is None:
                return None
            while self._frames:
                self.disk.append(*self._pop_oldest())
            self._memory_lost += self.disk.lost
            self.disk.close()
            directory, self.disk = self.disk.directory, None
            return directory
