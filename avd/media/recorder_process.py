"""The receiver's recorder in a process of its own: ``RecorderProcess``, the parent's side.

Why a process: muxing, the cluster scanner and latest.jpg cost 30-80 µs of Python a frame.
As a thread of the receiver they held the GIL the event loop needed for TLS and the protocol,
and each time the loop waited for it, it could wait a whole switch interval (5 ms): at 150
senders `avd bench` measured a p99 arrival latency of 96 ms and a writer too far behind to
record every frame. In a child process the recorder has an interpreter and a core to itself.

Parent side, ``RecorderProcess`` (a ``MediaSink``, called on the event loop): each frame is
packed (``avd.media.recorder_wire``) and queued; a flush half a second after the first of a
batch, once 1 MiB waits, or at the end of a stream, hands the whole batch to the kernel with
``sendmsg`` (never blocking: a full socket resumes through ``add_writer``), so the child
wakes once for many frames. Frames beyond ``max_pending_bytes`` are dropped and reported
done, as the recorder does when its own queue is full. A reader thread takes the child's
reports: DONE batches go to ``on_done`` (so acknowledgements still mean "in a file"), STATS
snapshots answer ``stats()``.

Failure: if the child exits while the receiver runs, the error is logged and ``on_failure``
called; the daemon then stops with exit code 1 and systemd starts it again. Frames the child
had not finished were never acknowledged, so the senders still hold them and send them
again, and the new recorder skips those already in a file (its dedupe index).

The child is ``avd.media.recorder_child``. Shutdown: it ignores SIGTERM and SIGINT, which
systemd sends to the whole cgroup and a terminal to the whole process group. It stops when
the parent sends STOP, or when its socket closes because the parent died (even by SIGKILL),
each time after writing out what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from avd.media import recorder_wire as wire
from avd.media.base import ReceivedFrame, StreamInfo
from avd.media.done import OnDone, Overflow, RecorderStats
from avd.media.recorder_wire import Kind
from avd.media.retention import RetentionPolicy

log = logging.getLogger("avd.media.recorder")

_CHILD_MODULE = "avd.media.recorder_child"
_SOCKET_BUFFER = 4 * 1024 * 1024  # ~170 frames in the kernel: a child busy for a moment
_IOV_MAX = 1024  # Linux's limit on the buffers of one sendmsg
_READ_SIZE = 1024 * 1024
_CLOSE_TIMEOUT = 30.0  # seconds close() waits for the child (a hung NFS mount, say)
# A batch goes to the child with the first frame that comes _FLUSH_AGE_S or more after the
# batch's first, or on a timer _FLUSH_DELAY_S after it if no such frame comes, or as soon as
# _FLUSH_BYTES wait: the child then wakes once for many frames, not once per frame. Its
# wake-ups, not its muxing, are most of the recording's CPU at a few streams: at one 20 fps
# stream, 1.6-2.0 % of a core with a 10 ms delay (a wake-up per frame in two processes and
# four threads), 0.7-1.0 % with 100 ms; half a second took the receiver with its recording
# process from 1.62 to 1.23 % of a core (docs/performance.md). A steady stream's own frames
# carry its batches, so the timer (a wake-up of the event loop of its own) fires only for a
# stream slower than 1/_FLUSH_AGE_S or one that stopped. Recording is not the live path:
# frames reach the file (and are acknowledged, and latest.jpg shows them) within about half
# a second; the sender holds them until then, so a crash meanwhile loses nothing.
_FLUSH_AGE_S = 0.45  # below ten frame periods at 20 fps: clear of an arrival's jitter
_FLUSH_DELAY_S = 0.5
# With hundreds of senders a batch fills this in a few ms: it goes out at once, so the
# pending bytes stay far below max_pending_bytes and the child is fed steadily.
_FLUSH_BYTES = 1024 * 1024
# Only the daemon itself talks to systemd; its child must not (NotifyAccess=main anyway).
_PARENT_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


@dataclass(frozen=True)
class RecorderConfig:
    """What the child needs to build its ``Recorder`` and its logging (sent as JSON)."""

    record_dir: Path
    segment_seconds: float = 60.0
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    buffer_bytes: int = 256 * 1024 * 1024  # AVD_RECORD_BUFFER_MB: the recorder's queue
    log_role: str = "avd-receiver"
    log_format: str = "auto"
    log_level: str = "INFO"

    def to_json(self) -> str:
        fields = asdict(self)
        fields["record_dir"] = str(self.record_dir)
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> RecorderConfig:
        fields = json.loads(text)
        fields["record_dir"] = Path(fields["record_dir"])
        fields["retention"] = RetentionPolicy(**fields["retention"])
        fields["buffer_bytes"] = int(fields["buffer_bytes"])
        return cls(**fields)


class RecorderProcess:
    """The recording ``MediaSink``: a ``Recorder`` in a child process. See the module doc.

    ``on_done`` is called on a reader thread, as ``Recorder``'s on its writer thread, and for
    frames dropped here on the event loop's; it must be quick and thread-safe.
    ``on_failure(message)`` is called once, on the reader thread, if the child exits unasked.
    """

    def __init__(
        self,
        config: RecorderConfig,
        *,
        on_done: OnDone | None = None,
        on_failure: Callable[[str], None] | None = None,
        max_pending_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.record_dir = config.record_dir
        self._on_done, self._on_failure = on_done, on_failure
        self._max_pending = max_pending_bytes
        self._to_child, child_in = socket.socketpair()
        child_out, self._from_child = socket.socketpair()
        with contextlib.suppress(OSError):  # capped by net.core.wmem_max: fine either way
            self._to_child.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        fds = (child_in.fileno(), child_out.fileno())
        env = {k: v for k, v in os.environ.items() if k not in _PARENT_ONLY_ENV}
        command = [sys.executable, "-m", _CHILD_MODULE, *map(str, fds), config.to_json()]
        try:
            self._child = subprocess.Popen(
                command, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env
            )
        finally:
            child_in.close()
            child_out.close()
        self._to_child.setblocking(False)
        self._lock = threading.Lock()  # guards everything below; the loop and the reader share
        self._pending: deque[bytes | memoryview] = deque()
        self._pending_bytes = 0
        self._flush_scheduled = False
        self._batch_started = 0.0  # time.monotonic() of the first message of the batch
        self._flush_timer: asyncio.TimerHandle | None = None  # touched on the loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer_registered = False
        self._overflow = Overflow(
            f"the recording process is behind, {max_pending_bytes / (1024 * 1024):g} MiB of "
            "frames wait for it",
            "is the machine short of CPU for this many senders?",
            log,
        )
        self._stats: dict[str, RecorderStats] = {}
        self._closing = self._broken = False
        self._ready = threading.Event()
        self._reader = threading.Thread(
            target=self._read_reports, name="avd-recorder-reports", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._child.pid

    def wait_ready(self, timeout: float) -> bool:
        """True once the child's recorder is up (it imports PyAV: a fraction of a second)."""
        return self._ready.wait(timeout)

    # --- the MediaSink side: on the event loop, never blocking -----------------------------

    def stream_started(self, info: StreamInfo) -> None:
        self._queue(wire.start(info))

    def frame(self, info: StreamInfo, frame: ReceivedFrame) -> None:
        size = len(frame.data)
        with self._lock:
            if self._closing or self._broken:
                return
            if self._pending_bytes + size > self._max_pending:
                self._overflow.add(info.sender_id, info.kind, frame.seq)
            else:
                self._overflow.admitted()
                header = wire.frame_header(info.session_id, frame)
                self._pending += (header, frame.data)
                self._pending_bytes += len(header) + size
            first = self._claim_flush()
            full = self._pending_bytes >= _FLUSH_BYTES
            due = not first and time.monotonic() - self._batch_started >= _FLUSH_AGE_S
        if first or full or due:
            self._schedule_flush(now=full or due)

    def stream_ended(self, info: StreamInfo) -> None:
        # At once: the sender waits for the acknowledgement of its last frames before it goes.
        self._queue(wire.end(info.session_id), now=True)

    def _queue(self, message: bytes, *, now: bool = False) -> None:
        """Start and end are never dropped: they are small, and the child needs them."""
        with self._lock:
            if self._closing or self._broken:
                return
            self._pending.append(message)
            self._pending_bytes += len(message)
            first = self._claim_flush()
        if first or now:
            self._schedule_flush(now=now)

    def _claim_flush(self) -> bool:
        """True for the first message since the last flush (lock held): one flush per batch,
        whatever the number of frames that came in it."""
        first = not self._flush_scheduled
        self._flush_scheduled = True
        if first:
            self._batch_started = time.monotonic()
        return first

    def _schedule_flush(self, *, now: bool = False) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside a loop (a script, a test): send right away
            self._send_blocking()
            return
        if not now:
            self._flush_timer = self._loop.call_later(_FLUSH_DELAY_S, self._flush)
        elif not self._writer_registered:  # else the socket is full: its callback flushes
            self._flush()

    def _flush(self) -> None:
        if self._flush_timer is not None:  # an early flush makes the timed one pointless
            self._flush_timer.cancel()
            self._flush_timer = None
        with self._lock:
            self._flush_scheduled = False
            if not self._closing:
                self._send_some()
            waiting = bool(self._pending) and not self._closing and not self._broken
            self._flush_scheduled = waiting  # the writer callback below will flush
            overflow = self._overflow.take()
        self._watch_writable(waiting)
        if overflow:
            self._report(overflow)

    def _watch_writable(self, waiting: bool) -> None:
        loop = self._loop
        if loop is None or waiting == self._writer_registered:
            return
        if waiting:
            loop.add_writer(self._to_child, self._flush)
        else:
            loop.remove_writer(self._to_child)
        self._writer_registered = waiting

    def _send_some(self) -> None:
        """Send what the socket takes now (lock held)."""
        while self._pending:
            try:
                sent = self._to_child.sendmsg(list(itertools.islice(self._pending, _IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # the child is gone: the reader thread reports it
                self._broken = True
                self._pending.clear()
                self._pending_bytes = 0
                log.debug("recorder: sending to the recording process failed: %s", exc)
                return
            self._consume(sent)

    def _consume(self, sent: int) -> None:
        self._pending_bytes -= sent
        while sent:
            head = self._pending[0]
            if len(head) <= sent:
                sent -= len(head)
                self._pending.popleft()
            else:
                self._pending[0] = memoryview(head)[sent:]
                sent = 0

    def _send_blocking(self, extra: bytes = b"") -> None:
        """Send everything queued (and ``extra``), waiting for the socket if need be."""
        with self._lock:
            self._flush_scheduled = False
            buffers, self._pending = list(self._pending), deque()
            self._pending_bytes = 0
            overflow = self._overflow.take()
            broken = self._broken
        if not broken:
            try:
                self._to_child.settimeout(_CLOSE_TIMEOUT)
                for buffer in [*buffers, extra]:
                    self._to_child.sendall(buffer)
            except OSError as exc:
                log.debug("recorder: sending to the recording process failed: %s", exc)
            finally:
                self._to_child.setblocking(False)
        if overflow:
            self._report(overflow)

    def close(self) -> None:
        """Send what is queued and STOP, then wait for the child to write it out and exit.

        Waits for the disk (usually milliseconds): call it at shutdown, or through
        ``asyncio.to_thread`` from a loop that must stay live.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._overflow.finish()
        self._stop_watching()
        self._send_blocking(wire.message(Kind.STOP))
        try:
            self._child.wait(_CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning(
                "recorder: writes to %s still blocked after %g s; killing the recording process",
                self.record_dir,
                _CLOSE_TIMEOUT,
            )
            self._child.kill()
        self._reader.join(_CLOSE_TIMEOUT)
        self._to_child.close()
        self._from_child.close()

    def _stop_watching(self) -> None:
        """Unregister the socket from the loop before it is closed (on the loop's thread)."""
        loop = self._loop
        if loop is None or not self._writer_registered or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._watch_writable(False)
            return
        done = threading.Event()

        def unregister() -> None:
            self._watch_writable(False)
            done.set()

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(unregister)
            done.wait(1.0)

    # --- the child's reports, on the reader thread -----------------------------------------

    def stats(self) -> dict[str, RecorderStats]:
        """The child's latest counters (at most ``_STATS_SECONDS`` old), plus drops here."""
        with self._lock:
            stats, dropped = dict(self._stats), dict(self._overflow.dropped)
        merged = {
            sid: replace(s, dropped=s.dropped + dropped.get(sid, 0)) for sid, s in stats.items()
        }
        for sid, count in dropped.items():
            merged.setdefault(sid, RecorderStats(dropped=count))
        return merged

    def _read_reports(self) -> None:
        reader = wire.MessageReader()
        try:
            while data := self._from_child.recv(_READ_SIZE):
                for kind, body in reader.feed(data):
                    self._on_report(kind, body)
        except (OSError, wire.WireError) as exc:
            log.error("recorder: cannot read the recording process's reports: %s", exc)
        code = self._child.wait()
        with self._lock:
            unasked, self._broken = not self._closing, True
        if unasked:
            message = f"the recording process (pid {self._child.pid}) exited with code {code}"
            log.error("recorder: %s", message)
            if self._on_failure is not None:
                self._on_failure(message)

    def _on_report(self, kind: Kind, body: memoryview) -> None:
        if kind is Kind.DONE:
            self._report(wire.unpickle(body))
        elif kind is Kind.STATS:
            stats = {sid: RecorderStats(**fields) for sid, fields in wire.unpickle(body).items()}
            with self._lock:
                self._stats = stats
        elif kind is Kind.READY:
            self._ready.set()
        else:
            raise wire.WireError(f"unexpected {kind.name} from the recording process")

    def _report(self, batch: Sequence[Any]) -> None:
        if batch and self._on_done is not None:
            try:
                self._on_done(batch)
            except Exception:
                log.exception("recorder: on_done callback failed")
