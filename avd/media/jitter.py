"""A jitter buffer for live audio: chunks in by sequence number, one chunk out per period.

Pure: no I/O, no clock, no lock (the speaker holds one around it). Chunks arrive from the
network in any order, late or twice; the playback thread asks for the next chunk once per
chunk period, and the device's pace is the only clock. Sequence numbers alone order the
chunks and name their slots, since each chunk fills exactly one period.

States: *buffering* (``next_chunk`` returns None, the caller plays nothing) until the
chunks held span ``target_ms``; then *playing*: each call returns the next chunk, or
silence for a chunk that is missing while later ones are here (a gap). When the buffer runs
dry it goes back to buffering rather than inventing silence slot after slot: a sender whose
clock is a little slower than the sound card would otherwise leave every later chunk late
by a hair. What arrives for a slot already played or skipped is late and dropped.

The chunks held never span more than ``max_ms``: past it the oldest are dropped until the
span is back at ``target_ms`` (overflow). Dropping back to the target rather than to the
limit resets the latency after a burst (a network stall that TCP delivers all at once)
instead of keeping ``max_ms`` of delay for the rest of the stream.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Arrival(enum.Enum):
    QUEUED = "queued"
    LATE = "late"  # its slot was already played or skipped
    DUPLICATE = "duplicate"  # the same sequence number is already held


@dataclass(slots=True)
class JitterStats:
    played: int = 0  # chunks returned by next_chunk
    gaps: int = 0  # slots filled with silence because their chunk was missing
    late: int = 0
    duplicates: int = 0
    overflow: int = 0  # chunks dropped to keep the buffer under max_ms
    underruns: int = 0  # times the buffer ran dry while playing

    def add(self, other: JitterStats) -> None:
        self.played += other.played
        self.gaps += other.gaps
        self.late += other.late
        self.duplicates += other.duplicates
        self.overflow += other.overflow
        self.underruns += other.underruns


class JitterBuffer:
    """Reorders audio chunks by sequence number and plays them out one per period."""

    def __init__(
        self,
        chunk_duration_us: int,
        target_ms: int = 60,
        max_ms: int = 500,
        *,
        silence: bytes,
    ) -> None:
        """``silence`` fills a gap: one chunk of the stream's silence (0x80s for 8-bit PCM)."""
        if chunk_duration_us <= 0:
            raise ValueError(f"chunk duration must be positive, not {chunk_duration_us} µs")
        if not 0 <= target_ms <= max_ms:
            raise ValueError(f"need 0 <= target_ms <= max_ms, not {target_ms} and {max_ms}")
        # In whole chunks: the target rounds up (at least one chunk), the limit down.
        self.target_chunks = max(1, -(-target_ms * 1000 // chunk_duration_us))
        self.max_chunks = max(self.target_chunks, max_ms * 1000 // chunk_duration_us)
        self._silence = silence
        self._held: dict[int, bytes] = {}
        # The slot the next call plays. None until playback first starts: before that the
        # lowest sequence number held is the start, so out-of-order first chunks are kept.
        self._next_seq: int | None = None
        self._newest = 0  # the highest sequence number held; meaningful while any is held
        self._playing = False
        self._finished = False
        self.stats = JitterStats()

    @property
    def held(self) -> int:
        """How many chunks are waiting to be played."""
        return len(self._held)

    @property
    def playing(self) -> bool:
        return self._playing

    @property
    def drained(self) -> bool:
        """``finish`` was called and every chunk held has been played or dropped."""
        return self._finished and not self._held

    def put(self, seq: int, data: bytes) -> Arrival:
        """Take one chunk from the network."""
        if self._next_seq is not None and seq < self._next_seq:
            self.stats.late += 1
            return Arrival.LATE
        if seq in self._held:
            self.stats.duplicates += 1
            return Arrival.DUPLICATE
        self._newest = seq if not self._held else max(self._newest, seq)
        self._held[seq] = data
        self._trim()
        return Arrival.QUEUED

    def finish(self) -> None:
        """No more chunks will come: play out what is held, even if under the target."""
        self._finished = True

    def next_chunk(self) -> bytes | None:
        """The chunk for the next period, silence for a gap, or None while buffering."""
        if not self._playing and not self._ready_to_start():
            return None
        if not self._held:
            self._playing = False
            if not self._finished:
                self.stats.underruns += 1
            return None
        if not self._playing:
            self._playing = True
            self._next_seq = self._first_seq()
        assert self._next_seq is not None
        data = self._held.pop(self._next_seq, None)
        self._next_seq += 1
        if data is None:
            self.stats.gaps += 1
            return self._silence
        self.stats.played += 1
        return data

    def _first_seq(self) -> int:
        return min(self._held) if self._next_seq is None else self._next_seq

    def _span(self) -> int:
        """Slots from the next to play to the newest held, holes included."""
        # Chunks leave only from the oldest end, so the newest put is still the newest held.
        return self._newest - self._first_seq() + 1 if self._held else 0

    def _ready_to_start(self) -> bool:
        if not self._held:
            return False
        return self._finished or self._span() >= self.target_chunks

    def _trim(self) -> None:
        if self._span() <= self.max_chunks:
            return
        # Keep the newest target_chunks slots; everything before them becomes late.
        keep_from = self._newest - self.target_chunks + 1
        for seq in [s for s in self._held if s < keep_from]:
            del self._held[seq]
            self.stats.overflow += 1
        self._next_seq = keep_from
