"""The receiver's cumulative acknowledgement of one stream: pure, no I/O.

``acked`` is the highest sequence number such that every frame from the session's
``first_seq`` up to it is done (recorded, found already recorded, or given up). Frames finish
out of order (late frames come behind live ones), so those above a gap wait in a set until
the gap fills. The sender's *floor* (the oldest frame it still holds) lets the watermark pass
frames the sender evicted and will never send: without it, one evicted frame would stall
the acknowledgements for good.
"""

from __future__ import annotations

# Bounds the pending set whatever the peer does; a sane sender keeps it to a spool's worth.
MAX_PENDING = 1 << 16


class AckWatermark:
    def __init__(self, first_seq: int) -> None:
        self.acked = first_seq - 1
        self._pending: set[int] = set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def done(self, seq: int) -> bool:
        """Frame ``seq`` is finished; True if the watermark moved."""
        if seq <= self.acked:
            return False
        if seq != self.acked + 1:
            self._pending.add(seq)
            if len(self._pending) > MAX_PENDING:
                return self.floor(min(self._pending))
            return False
        self.acked = seq
        self._advance()
        return True

    def floor(self, seq: int) -> bool:
        """The sender holds nothing below ``seq``: frames before it need no waiting for."""
        if seq - 1 <= self.acked:
            return False
        self.acked = seq - 1
        self._pending = {s for s in self._pending if s > self.acked}
        self._advance()
        return True

    def _advance(self) -> None:
        while self.acked + 1 in self._pending:
            self.acked += 1
            self._pending.remove(self.acked)
