"""Segments written one after another from one capture-ordered flow of one sender's frames.

A sender has two chains. The live chain records frames as they are captured; the backfill
chain records late frames (from the sender's spool, after an outage) that are older than
what the live chain has written, into ``-backfill`` segments named by their own capture
times. Each chain interleaves its frames back into capture order, opens a segment at its
first frame with a track for every stream that will feed it, rolls after ``segment_us`` of
capture time (on a video frame while there is video), and rolls early when a frame does not
fit: a new or changed stream format; for live, a sender clock that went back; for backfill,
a frame before what its stream has in the segment or long after the segment (another
stretch of spool). Used on the recorder's writer thread only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from avd.media.base import (
    AudioFormat,
    MediaFormat,
    ReceivedFrame,
    StreamInfo,
    StreamKind,
    VideoFormat,
)
from avd.media.interleave import Held, Interleaver, WallClock
from avd.media.naming import segment_path
from avd.media.segment import ClosedSegment, SegmentWriter

log = logging.getLogger(__name__)

Done = tuple[StreamKind, int]  # (kind, seq) of a frame the recorder is finished with

_CLOCK_JUMP_US = 10_000_000  # a live frame this far before its segment: the sender restarted
_BACKFILL_GAP_US = 5_000_000  # a spooled frame this far after its segment: another outage
_AUDIO_CUT_SLACK_US = 5_000_000  # backfill video that stopped no longer delays the audio's roll


@dataclass(frozen=True, slots=True)
class ChainSettings:
    record_dir: Path
    segment_us: int
    grace: float  # how long a live frame may wait for the sender's other stream
    backfill_grace: float  # the same for spooled frames, which nobody is waiting to see
    segment_closed: Callable[[ClosedSegment], None]
    before_roll: Callable[[], None]  # retention, which the roll may need room from


class SegmentChain:
    """One chain of segments; see the module docstring.

    ``write`` raises what ``SegmentWriter`` raises (OSError, ValueError). ``take_done`` hands
    back the frames whose packets reached the file, and those a failed close lost (counted
    in ``unwritten``, by kind).
    """

    def __init__(
        self,
        sender_id: str,
        settings: ChainSettings,
        *,
        active: Mapping[StreamKind, StreamInfo],
        wall: WallClock,
        backfill: bool,
    ) -> None:
        self.sender_id, self.backfill = sender_id, backfill
        self.segment: SegmentWriter | None = None
        self.opened = 0
        self.unwritten: Counter[StreamKind] = Counter()  # written, then lost by a failed close
        self._settings = settings
        self._active = active  # the sender's connected streams, kept current by its owner
        self._wall = wall
        grace = settings.backfill_grace if backfill else settings.grace
        self._interleaver = Interleaver(grace, capture_grace=not backfill)
        self._fed: dict[StreamKind, StreamInfo] = {}  # backfill: streams with spooled frames
        self._done: list[Done] = []

    @property
    def idle(self) -> bool:
        return self.segment is None and not self._interleaver

    def newest_us(self) -> int | None:
        """The newest capture time held or written, of any stream."""
        times = [self._interleaver.newest_us, self.segment.end_us if self.segment else None]
        return max((t for t in times if t is not None), default=None)

    def push(self, info: StreamInfo, frame: ReceivedFrame, now: float) -> None:
        self._fed[info.kind] = info
        self._interleaver.push(info, frame, now)

    def restart(self, kind: StreamKind) -> None:
        self._interleaver.restart(kind)

    def ready(self, now: float) -> list[Held]:
        """Frames due to be written; before a segment opens, the other stream gets a grace
        period to show up (to announce itself live, to send spooled frames for backfill).
        Backfill then waits only for the streams that do send spooled frames."""
        active = set(self._active)
        if self.backfill:
            hold = self.segment is None and not active <= set(self._fed)
            return self._interleaver.pop_ready(now, set(self._fed), hold=hold)
        hold = self.segment is None and len(active) < len(StreamKind)
        return self._interleaver.pop_ready(now, active, hold=hold)

    def drain(self) -> list[Held]:
        return self._interleaver.pop_all()

    def write(self, held: Held) -> bool:
        """Write one frame (rolling first if it must); False if its segment refuses it."""
        if self.segment is not None and self._must_roll(held):
            self.close_segment()
            self._settings.before_roll()
        segment = self.segment or self._open(held)
        frame = held.frame
        if held.info.kind is StreamKind.VIDEO:
            return segment.write_video(held.capture_us, frame.data, frame.seq)
        return segment.write_audio(held.capture_us, frame.data, frame.seq)

    def _must_roll(self, held: Held) -> bool:
        segment = self.segment
        assert segment is not None
        kind = held.info.kind
        track = segment.video_format if kind is StreamKind.VIDEO else segment.audio_format
        if track != held.info.format:
            return True  # a stream new to this segment, or one whose format changed
        if self.backfill:
            return self._backfill_rolls(segment, kind, held.capture_us)
        return self._live_rolls(segment, held)

    def _backfill_rolls(self, segment: SegmentWriter, kind: StreamKind, capture: int) -> bool:
        # A stream lagging the other by more than the grace is written behind it: valid
        # Matroska (blocks may be older than their cluster), and no storm of segments.
        last = segment.last_capture_us(kind)
        if capture < segment.start_us or (last is not None and capture <= last):
            return True  # an older stretch of spool
        if capture > segment.end_us + _BACKFILL_GAP_US:
            return True  # a newer stretch: the spool of another outage
        limit_us = self._settings.segment_us
        if kind is not StreamKind.VIDEO and segment.video_format is not None:
            limit_us += _AUDIO_CUT_SLACK_US  # cut on a video frame, unless video stopped
        return capture - segment.start_us >= limit_us

    def _live_rolls(self, segment: SegmentWriter, held: Held) -> bool:
        kind, capture = held.info.kind, held.capture_us
        if not held.frame.late and capture < segment.start_us - _CLOCK_JUMP_US:
            return True  # the sender's clock went back: it restarted
        if kind is not StreamKind.VIDEO and StreamKind.VIDEO in self._active:
            return False  # cut on a video frame while there is video
        limit_us = self._settings.segment_us
        if self._lost_a_track(segment):
            # The sender's other stream has ended: a stopping sender ends its two streams a
            # moment apart, and what trails belongs in this segment, not in a sliver of a
            # segment of its own. A stream that carries on alone rolls one grace later.
            limit_us += int(self._settings.grace * 1_000_000)
        return capture - segment.start_us >= limit_us

    def _lost_a_track(self, segment: SegmentWriter) -> bool:
        tracks = {StreamKind.VIDEO: segment.video_format, StreamKind.AUDIO: segment.audio_format}
        return any(fmt is not None and kind not in self._active for kind, fmt in tracks.items())

    def _open(self, held: Held) -> SegmentWriter:
        formats: dict[StreamKind, MediaFormat] = {
            k: i.format for k, i in (self._fed if self.backfill else self._active).items()
        }
        formats[held.info.kind] = held.info.format
        video, audio = formats.get(StreamKind.VIDEO), formats.get(StreamKind.AUDIO)
        start = self._wall.utc(held.frame)
        path = segment_path(
            self._settings.record_dir, self.sender_id, start, backfill=self.backfill
        )
        self.segment = SegmentWriter(
            path,
            sender_id=self.sender_id,
            start_us=held.capture_us,
            video=video if isinstance(video, VideoFormat) else None,
            audio=audio if isinstance(audio, AudioFormat) else None,
            backfill=self.backfill,
        )
        self.opened += 1
        log.debug("recording %s into %s", self.sender_id, path)
        return self.segment

    def close_segment(self) -> None:
        segment, self.segment = self.segment, None
        if segment is None:
            return
        closed = segment.close()
        self._done += segment.take_durable()
        lost = segment.take_unwritten()
        self._done += lost
        for kind, _ in lost:
            self.unwritten[kind] += 1
        self._settings.segment_closed(closed)

    def finish(self) -> None:
        """The flow stopped: close the segment and forget which streams fed it."""
        self.close_segment()
        self._fed.clear()

    def take_done(self) -> list[Done]:
        segment = self.segment
        if segment is not None:
            self._done += segment.take_durable()
            if segment.deleted:
                self._abandon_deleted(segment)
        done, self._done = self._done, []
        return done

    def _abandon_deleted(self, segment: SegmentWriter) -> None:
        """Someone deleted the segment being written (a clean-up of the folder): had it been
        kept open, the frames of up to a whole segment's length would go on into a file no
        one can open, acknowledged as recorded. Its frames not yet in it count as not
        recorded, and the next frame opens a new segment."""
        self.close_segment()
        log.warning(
            "%s: segment %s was deleted while being written (not by avd): the %d frames "
            "written to it are gone; recording goes on in a new segment",
            self.sender_id,
            segment.path,
            segment.packets,
        )

    def takes_late(self, info: StreamInfo, capture_us: int) -> bool:
        """Whether a late frame may join this (live) chain: only after everything in it, so
        every track's times keep increasing, and only into a track of its format."""
        segment, newest = self.segment, self.newest_us()
        if segment is None or newest is None or capture_us <= newest:
            return False
        track = segment.video_format if info.kind is StreamKind.VIDEO else segment.audio_format
        return track == info.format
