"""``record_dir/<sender>/latest.jpg``: each sender's most recent video frame, for a quick look.

The file is replaced atomically (written under a temporary name in the same folder, then
``os.replace``), so a reader sees either the previous picture or the new one, never half of
one. It is rewritten at most once per interval per sender: a frame offered too soon waits as
the pending picture and goes out at the next ``flush_due``, so the file is never more than
about one interval behind. Used from the recorder's writer thread only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

LATEST_NAME = "latest.jpg"
_TEMP_NAME = ".latest.jpg.tmp"  # one writer thread per record dir, so one fixed name is enough


class LatestJpeg:
    """Keeps ``latest.jpg`` of every sender fresh, at most once per ``interval`` seconds."""

    def __init__(
        self,
        record_dir: Path,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._record_dir = record_dir
        self._interval = interval
        self._clock = clock
        self._last_write: dict[str, float] = {}
        self._pending: dict[str, bytes] = {}
        self._failing: set[str] = set()  # senders whose last write failed: logged once

    def path(self, sender_id: str) -> Path:
        return self._record_dir / sender_id / LATEST_NAME

    def offer(self, sender_id: str, jpeg: bytes) -> None:
        """Write ``jpeg`` now if this sender's interval has passed, else keep it pending."""
        self._pending[sender_id] = jpeg
        self._write_if_due(sender_id, self._clock())

    def flush_due(self) -> None:
        """Write every pending picture whose interval has passed."""
        now = self._clock()
        for sender_id in list(self._pending):
            self._write_if_due(sender_id, now)

    def forget(self, sender_id: str) -> None:
        """Drop a pending picture (the sender's video ended)."""
        self._pending.pop(sender_id, None)

    def _write_if_due(self, sender_id: str, now: float) -> None:
        last = self._last_write.get(sender_id)
        if last is not None and now - last < self._interval:
            return
        jpeg = self._pending.pop(sender_id)
        # Counted as written even if it failed: a full disk is not retried on every frame.
        self._last_write[sender_id] = now
        self._write(sender_id, jpeg)

    def _write(self, sender_id: str, jpeg: bytes) -> None:
        folder = self._record_dir / sender_id
        temp = folder / _TEMP_NAME
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temp.write_bytes(jpeg)
            os.replace(temp, folder / LATEST_NAME)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            if sender_id not in self._failing:
                self._failing.add(sender_id)
                log.warning("cannot update %s: %s", folder / LATEST_NAME, exc.strerror or exc)
            return
        if sender_id in self._failing:
            self._failing.discard(sender_id)
            log.info("%s is updated again", folder / LATEST_NAME)
