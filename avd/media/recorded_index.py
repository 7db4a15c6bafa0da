"""What is already recorded of one sender, so that frames sent twice are recorded once.

A sender re-sends every frame the receiver has not acknowledged; after a receiver crash, or a
connection lost between a write and its acknowledgement, some of those are already in the
recordings. A frame is known by its stream kind and its exact capture time (the sender's
clock, µs): a spool re-sends the same stamp, and no two frames of a stream share one.

``RecordedIndex`` holds the frames of the last ``window_s`` seconds: on the first stream of a
sender in this process, those stamped in its segments modified within the window (written
by a process that may have crashed; see ``SegmentWriter`` for the stamps), then every frame
this process claims for writing. Only recently written frames can still be unacknowledged,
so nothing older is needed; each stream's entries are also capped, so a burst far beyond
any sane rate costs bounded memory (the price: a duplicate recorded twice, never a loss).
A day folder is only looked into if it was touched within the window (plus an hour), so a
sender with months of recordings costs a few stat calls, not one per segment.
Used on the recorder's writer thread only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import av
import av.error

from avd.media.base import StreamKind
from avd.media.naming import PART_SUFFIX
from avd.media.segment import TAG_SENDER, stamp_of

log = logging.getLogger(__name__)

# A day folder untouched for this long (beyond the window) holds no segment written within
# the window: a segment created in it would have touched it, and none stays open this long.
_SEGMENT_OPEN_MAX_S = 3600.0
_KINDS = {"video": StreamKind.VIDEO, "audio": StreamKind.AUDIO}


@dataclass(frozen=True, slots=True)
class IndexLoad:
    """What building an index from disk found, and what it cost."""

    files: int
    frames: int
    seconds: float


def recorded_stamps(path: Path, sender_id: str) -> list[tuple[StreamKind, int]]:
    """(kind, capture µs) of every stamped packet in one segment of ``sender_id``.

    A file cut short by a crash yields what precedes the cut; a file that is not a segment
    of ``sender_id`` (no tag, another sender's tag) yields nothing.
    """
    found: list[tuple[StreamKind, int]] = []
    try:
        with av.open(str(path)) as container:
            if container.metadata.get(TAG_SENDER) != sender_id:
                log.debug("%s is not a segment of %s: not indexed", path, sender_id)
                return found
            for packet in container.demux():
                kind = _KINDS.get(packet.stream.type)
                stamp = stamp_of(packet) if kind is not None and packet.size else None
                if kind is not None and stamp is not None:
                    found.append((kind, stamp[0]))
    except (OSError, av.error.FFmpegError) as exc:
        log.debug("indexing %s stopped: %s", path, exc)  # a crash's tail, or a vanished file
    return found


def recent_segments(sender_dir: Path, since: float) -> list[Path]:
    """Segments under ``sender_dir`` modified at or after ``since`` (epoch s), oldest first."""
    found: list[tuple[float, Path]] = []
    for day in _recent_days(sender_dir, since):
        for path in day.glob("*.mkv"):
            mtime = _mtime(path)
            if mtime >= since:
                found.append((mtime, path))
    return [path for _, path in sorted(found)]


def remove_leftover_parts(sender_dir: Path, since: float) -> int:
    """Delete the ``.part`` files a killed writer left in day folders touched since ``since``
    (never published, so nothing in them was reported recorded); returns how many."""
    removed = 0
    for day in _recent_days(sender_dir, since):
        for path in day.glob(f".*.mkv{PART_SUFFIX}"):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def _recent_days(sender_dir: Path, since: float) -> list[Path]:
    try:
        days = [p for p in sender_dir.iterdir() if p.is_dir()]
    except OSError:
        return []
    return [day for day in days if _mtime(day) >= since - _SEGMENT_OPEN_MAX_S]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


class RecordedIndex:
    """Recorded (or claimed for recording) frames of one sender; see the module docstring.

    Per kind, a set answers ``seen`` and the same capture times sit in one-second buckets,
    oldest first, which expire whole: about 135 bytes a frame (measured), so 120 s of 20 fps
    video and 43 chunks/s of audio cost about 1 MB. A frame released and claimed again may be
    forgotten with its first claim's bucket (at worst, recorded twice). The cap forgets
    whole seconds, never the current one.
    """

    def __init__(self, window_s: float, *, max_per_kind: int = 1 << 16) -> None:
        self._window_s = window_s
        self._max = max_per_kind
        self._seen: dict[StreamKind, set[int]] = {k: set() for k in StreamKind}
        self._buckets: dict[StreamKind, deque[tuple[int, list[int]]]] = {
            k: deque() for k in StreamKind
        }

    def load(self, sender_dir: Path, sender_id: str) -> IndexLoad:
        """Index the segments of ``sender_dir`` written within the window (and remove what
        a killed writer left unpublished). Call it before this process writes there."""
        started, now = time.monotonic(), time.time()
        remove_leftover_parts(sender_dir, now - self._window_s)
        paths = recent_segments(sender_dir, now - self._window_s)
        frames = 0
        for path in paths:
            written = _mtime(path)
            for kind, capture_us in recorded_stamps(path, sender_id):
                self.claim(kind, capture_us, written)
                frames += 1
        return IndexLoad(len(paths), frames, time.monotonic() - started)

    def seen(self, kind: StreamKind, capture_us: int) -> bool:
        return capture_us in self._seen[kind]

    def claim(self, kind: StreamKind, capture_us: int, when: float | None = None) -> None:
        """Remember a frame as recorded (``when``: epoch seconds; default the present)."""
        now = time.time()
        second = int(now if when is None else when)
        buckets = self._buckets[kind]
        if buckets and buckets[-1][0] >= second:
            buckets[-1][1].append(capture_us)  # this second's (or an older time, kept longer)
        else:
            buckets.append((second, [capture_us]))
        self._seen[kind].add(capture_us)
        self._expire(kind, now - self._window_s)

    def release(self, kind: StreamKind, capture_us: int) -> None:
        """Forget a claimed frame that could not be recorded after all."""
        self._seen[kind].discard(capture_us)

    def expire(self) -> None:
        """Forget what is older than the window (claims do this too, for their kind)."""
        for kind in StreamKind:
            self._expire(kind, time.time() - self._window_s)

    def __len__(self) -> int:
        return sum(len(seen) for seen in self._seen.values())

    def _expire(self, kind: StreamKind, cutoff: float) -> None:
        seen, buckets = self._seen[kind], self._buckets[kind]
        while buckets and (
            buckets[0][0] + 1 <= cutoff or (len(seen) > self._max and len(buckets) > 1)
        ):
            for capture_us in buckets.popleft()[1]:
                seen.discard(capture_us)
