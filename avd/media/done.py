"""What the recorder says about the frames it has finished with (see ``avd.media.recorder``).

``on_done`` receives batches of ``FrameDone``: (sender id, stream kind, seq). ``Overflow``
keeps the frames the event loop had to drop on a full queue until the writer thread reports
them, as runs of consecutive seqs: a full queue drops whole stretches, so a stalled writer
costs a few runs per stream, not a tuple per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from avd.media.base import StreamKind

FrameDone = tuple[str, StreamKind, int]  # (sender id, kind, seq)
OnDone = Callable[[Sequence[FrameDone]], None]


class Overflow:
    """Frames dropped on a full queue, waiting to be reported done (guarded by its owner)."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, StreamKind], list[list[int]]] = {}

    def add(self, sender_id: str, kind: StreamKind, seq: int) -> None:
        runs = self._runs.setdefault((sender_id, kind), [])
        if runs and runs[-1][1] + 1 == seq:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])

    def take(self) -> list[FrameDone]:
        taken = [
            (sender_id, kind, seq)
            for (sender_id, kind), runs in self._runs.items()
            for first, last in runs
            for seq in range(first, last + 1)
        ]
        self._runs.clear()
        return taken
