"""What the recorder says about the frames it has finished with (see ``avd.media.recorder``).

``RecorderStats`` counts, per sender, what became of every frame. ``on_done`` receives
batches of ``FrameDone``: (sender id, stream kind, seq). ``Overflow`` follows the frames
a full queue drops: counted, kept until reported done, and said in the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from avd.logs import LogEvent, log_event
from avd.media.base import StreamKind

# A full queue's incident is over once this long has passed without a frame left out: a
# queue hovering at its limit (a frame in, a frame out) makes one incident, not hundreds.
LEFT_OUT_QUIET_S = 10.0
_NAMED_SENDERS = 5  # in the summary; the rest are counted

FrameDone = tuple[str, StreamKind, int]  # (sender id, kind, seq)
OnDone = Callable[[Sequence[FrameDone]], None]


class Overflow:
    """The frames a full queue drops, from the drop to their report (guarded by its owner).

    Each dropped frame is counted per sender (the stats' ``dropped``) and kept until the
    writer reports it done, as runs of consecutive seqs: a full queue drops whole stretches,
    so a stalled writer costs a few runs per stream, not a tuple per frame. Being reported
    done, so that the senders' acknowledgements go on, such frames are in no file and no
    sender will send them again: an operator must read that in the journal, not only in a
    counter. So the log gets two lines an incident, however many frames: when it starts
    (``why`` the queue is full, the first sender, the ``hint`` of what to look at) and once
    ``quiet_s`` passed without a drop, or at ``finish`` (how many, whose, over how long).
    """

    def __init__(
        self,
        why: str,
        hint: str,
        log: logging.Logger,
        *,
        quiet_s: float = LEFT_OUT_QUIET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._why, self._hint = why, hint
        self._log, self._quiet_s, self._clock = log, quiet_s, clock
        self._runs: dict[tuple[str, StreamKind], list[list[int]]] = {}
        self.dropped: dict[str, int] = {}  # per sender, since the start
        self._incident: dict[str, int] = {}  # per sender, in the incident under way
        self._first = self._last = 0.0

    def add(self, sender_id: str, kind: StreamKind, seq: int) -> None:
        """A frame dropped: counted, kept for its report, and said if it starts an incident."""
        runs = self._runs.setdefault((sender_id, kind), [])
        if runs and runs[-1][1] + 1 == seq:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
        self.dropped[sender_id] = self.dropped.get(sender_id, 0) + 1
        now = self._clock()
        if not self._incident:
            self._first = now
            message = (
                f"recorder: {self._why}: frames are left out of the recordings until it "
                f"catches up (the first from {sender_id}); {self._hint}"
            )
            log_event(self._log, logging.WARNING, LogEvent.FRAMES_LEFT_OUT, message)
        self._incident[sender_id] = self._incident.get(sender_id, 0) + 1
        self._last = now

    def admitted(self) -> None:
        """A frame found room: the incident is over once none was dropped for a while."""
        if self._incident and self._clock() - self._last >= self._quiet_s:
            self.finish()

    def finish(self) -> None:
        """Sum the incident up now, if there is one (and at shutdown)."""
        if not self._incident:
            return
        ranked = sorted(self._incident.items(), key=lambda item: (-item[1], item[0]))
        named = ", ".join(f"{sid} {count}" for sid, count in ranked[:_NAMED_SENDERS])
        if len(ranked) > _NAMED_SENDERS:
            named += f" and {len(ranked) - _NAMED_SENDERS} more senders"
        total = sum(self._incident.values())
        message = (
            "recorder: caught up; frames left out of the recordings: "
            f"{total} over {self._last - self._first:.1f} s ({named})"
        )
        log_event(self._log, logging.WARNING, LogEvent.FRAMES_LEFT_OUT_OVER, message, frames=total)
        self._incident.clear()

    def take(self) -> list[FrameDone]:
        """The dropped frames not yet reported done, and forget them."""
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
