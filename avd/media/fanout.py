"""One sink that forwards to several (recorder, speaker, ...), isolating their failures.

A sink that raises must not take a live session down with it: the error is logged once
per sink and stream, and the other sinks go on receiving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from avd.media.base import MediaSink, ReceivedFrame, StreamInfo

log = logging.getLogger("avd.sinks")


class FanoutSink:
    def __init__(self, sinks: Sequence[MediaSink]) -> None:
        self.sinks = list(sinks)
        self._failed: set[tuple[int, int]] = set()  # (sink index, session id) already logged

    def _report(self, index: int, info: StreamInfo, exc: Exception) -> None:
        key = (index, info.session_id)
        if key not in self._failed:
            self._failed.add(key)
            name = type(self.sinks[index]).__name__
            log.error("%s failed on %s/%s: %s", name, info.sender_id, info.kind.label, exc)

    def stream_started(self, info: StreamInfo) -> None:
        for index, sink in enumerate(self.sinks):
            try:
                sink.stream_started(info)
            except Exception as exc:
                self._report(index, info, exc)

    def frame(self, info: StreamInfo, frame: ReceivedFrame) -> None:
        for index, sink in enumerate(self.sinks):
            try:
                sink.frame(info, frame)
            except Exception as exc:
                self._report(index, info, exc)

    def stream_ended(self, info: StreamInfo) -> None:
        for index, sink in enumerate(self.sinks):
            try:
                sink.stream_ended(info)
            except Exception as exc:
                self._report(index, info, exc)
        self._failed = {key for key in self._failed if key[1] != info.session_id}

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing %s failed", type(sink).__name__)
