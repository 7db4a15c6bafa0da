"""What the recorder says about the frames it has finished with (see ``avd.media.recorder``).

``RecorderStats`` counts, per sender, what became of every frame. ``on_done`` receives
batches of ``FrameDone``: (sender id, stream kind, seq). ``Overflow``
keeps the frames the event loop had to drop on a full queue until the writer thread reports
them, as runs of consecutive seqs: a full queue drops whole stretches, so a stalled writer
costs a few runs per stream, not a tuple per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass(slots=True)
class RecorderStats:
    """Counters of one sender (a snapshot when returned by ``Recorder.stats``).

    Every frame offered ends up in exactly one of: ``video_frames``/``audio_chunks``
    (written), ``duplicates``, or ``given_up`` (the sum of the four reasons below it).
    """

    video_frames: int = 0  # written to segments (live and backfill)
    audio_chunks: int = 0
    bytes: int = 0  # media payload written
    segments_opened: int = 0  # live and backfill
    backfill_segments: int = 0
    late_recorded: int = 0  # late frames written (included in video_frames/audio_chunks)
    duplicates: int = 0  # already recorded: not written again
    dropped: int = 0  # the writer's queue was full
    not_recorded: int = 0  # paused, unusable sender id, refused format, lost at a failed close
    late_dropped: int = 0  # late frames no segment could take
    out_of_order: int = 0  # live frames not after the previous frame of their stream
    paused: bool = False

    @property
    def given_up(self) -> int:
        return self.dropped + self.not_recorded + self.late_dropped + self.out_of_order
