"""The receiver's recording process: a ``Recorder`` fed by ``avd.media.recorder_process``.

``python -m avd.media.recorder_child INBOX_FD REPORTS_FD CONFIG_JSON``, started by
``RecorderProcess`` with the two socket ends it passes. The main thread reads frames and
stream events from the inbox and hands them to the ``Recorder``, a read's worth at a time
(``Recorder.feed``), whose writer thread muxes;
DONE batches (from the writer thread) and STATS (at most every ``_STATS_SECONDS``, when
they changed) go back through the reports socket. SIGTERM and SIGINT are ignored: the child
stops on STOP or when the inbox closes (the receiver died), after writing out what it holds.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from avd.media import recorder_wire as wire
from avd.media.base import SinkEvent, StreamInfo
from avd.media.done import RecorderStats
from avd.media.recorder_process import RecorderConfig
from avd.media.recorder_wire import Kind

if TYPE_CHECKING:
    from avd.media.recorder import Recorder

log = logging.getLogger("avd.media.recorder")

_READ_SIZE = 1024 * 1024
# How often the child sends its counters (when they changed), and how long its inbox waits
# for a batch: longer than the receiver's batch interval (0.5 s), so that a steady stream's
# batches carry the counters and waiting for the next batch is not a wake-up of its own; an
# idle receiver's child wakes once a second.
_STATS_SECONDS = 1.0


class _Reports:
    """The child's side of the reports socket: DONE from the writer thread, STATS from main."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._last_stats: dict[str, dict[str, Any]] | None = None
        self._next_stats = 0.0

    def send(self, data: bytes) -> None:
        # OSError: the parent is gone; the main loop sees EOF and finishes up.
        with self._lock, contextlib.suppress(OSError):
            self._sock.sendall(data)

    def done(self, batch: Sequence[Any]) -> None:
        self.send(wire.pickled(Kind.DONE, list(batch)))

    def stats_if_due(self, stats: Callable[[], dict[str, RecorderStats]]) -> None:
        """Every ``_STATS_SECONDS``: counting is not free with hundreds of senders."""
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + _STATS_SECONDS
            self.stats(stats())

    def stats(self, stats: dict[str, RecorderStats]) -> None:
        """Sends the counters if they changed since the last time."""
        plain = wire.stats_body(stats)
        if plain != self._last_stats:
            self._last_stats = plain
            self.send(wire.pickled(Kind.STATS, plain))


def _serve(inbox: socket.socket, recorder: Recorder, reports: _Reports) -> None:
    """Feed the recorder until STOP or the parent's end of the socket closes."""
    streams: dict[int, StreamInfo] = {}
    reader = wire.MessageReader()
    inbox.settimeout(_STATS_SECONDS)
    while True:
        try:
            data = inbox.recv(_READ_SIZE)
        except TimeoutError:
            data = None
        if data == b"":
            log.warning("recorder: the receiver went away; closing the recordings")
            return
        events: list[SinkEvent] = []
        try:
            for kind, body in reader.feed(data or b""):
                if kind is Kind.STOP:
                    return
                if (event := _event(kind, body, streams)) is not None:
                    events.append(event)
        finally:  # what came before a STOP or a bad message is still recorded
            recorder.feed(events)
        reports.stats_if_due(recorder.stats)


def _event(kind: Kind, body: memoryview, streams: dict[int, StreamInfo]) -> SinkEvent | None:
    """The sink call a message stands for; None for the end of a stream never started."""
    if kind is Kind.FRAME:
        session_id, frame = wire.parse_frame(body)
        info = streams.get(session_id)
        if info is None:
            raise wire.WireError(f"a frame of session {session_id}, which never started")
        return SinkEvent("frame", info, frame)
    if kind is Kind.START:
        info = wire.unpickle(body)
        streams[info.session_id] = info
        return SinkEvent("start", info)
    if kind is Kind.END:
        ended = streams.pop(wire.parse_session(body), None)
        return None if ended is None else SinkEvent("end", ended)
    raise wire.WireError(f"unexpected {kind.name} from the receiver")


def child_main(argv: Sequence[str]) -> int:
    """``python -m avd.media.recorder_child INBOX_FD REPORTS_FD CONFIG_JSON``."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # the parent decides when we stop; see module doc
    from avd.logs import setup_logging  # noqa: PLC0415
    from avd.media.recorder import Recorder  # noqa: PLC0415 - PyAV loads slowly

    inbox = socket.socket(fileno=int(argv[0]))
    reports = _Reports(socket.socket(fileno=int(argv[1])))
    config = RecorderConfig.from_json(argv[2])
    setup_logging(role=config.log_role, log_format=config.log_format, level=config.log_level)
    recorder = Recorder(
        config.record_dir,
        segment_seconds=config.segment_seconds,
        retention=config.retention,
        # Bounded by bytes, not frames: a burst of a hundred cameras starting at once (each
        # new segment costs the writer a few ms) must not cost frames, a slow disk neither.
        queue_frames=None,
        queue_bytes=config.buffer_bytes,
        on_done=reports.done,
    )
    reports.send(wire.message(Kind.READY))
    try:
        _serve(inbox, recorder, reports)
    except (OSError, wire.WireError) as exc:
        log.error("recorder: %s; closing the recordings", exc)
        return 1
    finally:
        recorder.close()
        reports.stats(recorder.stats())
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
