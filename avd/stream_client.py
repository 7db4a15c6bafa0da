"""The sender's side of one stream: connect, authenticate, stream, and reconnect for ever.

Each stream (video on its port, audio on its port) runs one ``StreamClient``. A session is:
TLS connect (the receiver's certificate checked against ``AVD_TLS_CA`` and its name), hello
(with the spool's floor as ``first_seq``), welcome, then ``avd.link.Link`` until it ends.
Whatever ends a session, the client waits as ``Backoff`` says (a refused connection every
0.25-0.5 s, a welcomed session the receiver went away from within 0.5 s, otherwise from
0.5 s doubling to the cap, at the cap after a refusal) and tries again, until the daemon
stops or the source ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from avd import protocol
from avd.backoff import Backoff, FailureKind, classify, describe_failure
from avd.clock import monotonic_us
from avd.config import join_host_port
from avd.errors import AuthError, RemoteProtocolError
from avd.link import Link, SessionEnded, SourceEnded, tune_socket
from avd.logs import LogEvent, log_event
from avd.logthrottle import LogThrottle, suppressed_note
from avd.media.base import CapturedFrame, MediaFormat, StreamKind
from avd.metrics import SenderMetrics
from avd.protocol import GoodbyeReason, Role
from avd.quality import LinkReport
from avd.queues import DropOldestQueue
from avd.spool import Spool
from avd.streams import close_stream
from avd.tokens import Token

log = logging.getLogger("avd.sender")

T = TypeVar("T")

# A receiver away for hours must not fill the journal: the same problem is reported
# again only this often (with how many attempts were made meanwhile).
RETRY_LOG_INTERVAL_US = 60_000_000


class _Stopped(Exception):
    """The daemon is stopping: abandon whatever was being waited for."""


async def _unless_stopped(stop: asyncio.Event, awaitable: Awaitable[T], limit_s: float) -> T:
    """``awaitable``'s result, TimeoutError after ``limit_s``, or _Stopped once ``stop`` is set."""
    work = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({work, stopper}, timeout=limit_s, return_when=FIRST_COMPLETED)
    stopper.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    if stop.is_set():
        raise _Stopped
    raise TimeoutError(f"no answer within {limit_s:.0f} s")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    server_name: str
    ssl_context: ssl.SSLContext
    handshake_timeout_s: float


class StreamClient:
    def __init__(
        self,
        *,
        kind: StreamKind,
        endpoint: Endpoint,
        sender_id: str,
        token: Token,
        media_format: MediaFormat,
        queue: DropOldestQueue[tuple[int, CapturedFrame]],
        spool: Spool,
        metrics: SenderMetrics,
        backoff: Backoff,
        on_link_report: Callable[[LinkReport], None] | None = None,
    ) -> None:
        self.kind, self.endpoint = kind, endpoint
        self.on_link_report = on_link_report  # dynamic quality, for video
        self.sender_id, self.token, self.media_format = sender_id, token, media_format
        self.queue, self.spool, self.metrics, self.backoff = queue, spool, metrics, backoff
        self.label = kind.label
        self.state = "starting"
        self.connected = False
        self.acked_seq = -1
        self.rtt_us: int | None = None
        # The receiver's largest payload, from its welcome: read by the capture thread too,
        # which then spools no frame the receiver would refuse.
        self.max_payload: int | None = None
        self._oversized = metrics.frames_oversized.labels(stream=self.label)
        self._log_throttle = LogThrottle()  # oversized frames, and bugs that repeat
        self._established = False
        self._last_problem = ""
        self._last_retry_log_us = 0
        self._retries_unlogged = 0

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set() and not self._nothing_left():
            if attempt:
                self.metrics.reconnects.labels(stream=self.label).inc()
            attempt += 1
            started = monotonic_us()
            self._established = False
            try:
                await self._session(stop)
                failure, problem = FailureKind.SESSION_LOST, "session ended"
            except SourceEnded:
                self.state = "source ended"
                return
            except _Stopped:
                return
            except SessionEnded as exc:
                failure, problem = self._goodbye_failure(exc)
            except (OSError, ssl.SSLError, TimeoutError, AuthError, RemoteProtocolError) as exc:
                failure = classify(exc)
                problem = describe_failure(failure, exc)
            except Exception as exc:
                # A bug of ours must not take the daemon down for months of unattended
                # running: it is logged with its traceback and the stream starts again. The
                # same one again within a minute is counted, not logged whole each time.
                suppressed = self._log_throttle.admit(repr(exc)[:200], self.label, time.monotonic())
                if suppressed is not None:
                    log.exception(
                        "%s stream: unexpected error; reconnecting%s",
                        *(self.label, suppressed_note(suppressed)),
                    )
                failure, problem = FailureKind.PROTOCOL, f"unexpected {type(exc).__name__}"
            finally:
                self._set_connected(False)
            if stop.is_set():
                return
            if self._established:  # welcomed: the backoff decides if it was a good session
                self.backoff.session_ended((monotonic_us() - started) / 1e6, failure)
            await self._wait_before_retry(stop, failure, problem)

    def fits(self, size: int) -> bool:
        """Whether a payload of ``size`` bytes is within the receiver's limit (unknown before
        the first welcome: then it fits). One that does not is counted and logged (a line a
        minute): the stream goes on without it, where sending it ended the session."""
        limit = self.max_payload
        if limit is None or size <= limit:
            return True
        self._oversized.inc()
        suppressed = self._log_throttle.admit("oversized", self.label, time.monotonic())
        if suppressed is not None:
            video = self.kind is StreamKind.VIDEO
            setting = "AVD_MAX_VIDEO_FRAME_KB" if video else "AVD_MAX_AUDIO_CHUNK_KB"
            ours = "AVD_JPEG_QUALITY or the size" if video else "AVD_AUDIO_CHUNK"
            log.warning(
                "%s: a frame of %d bytes is larger than the receiver takes (%d, its %s): not "
                "sent; lower %s, or raise that limit%s",
                *(self.label, size, limit, setting, ours, suppressed_note(suppressed)),
            )
        return False

    def _nothing_left(self) -> bool:
        """Capture has stopped and every frame was delivered: no reason to reconnect."""
        return self.queue.closed and not len(self.queue) and not len(self.spool)

    def _goodbye_failure(self, exc: SessionEnded) -> tuple[FailureKind, str]:
        if exc.reason == GoodbyeReason.REVOKED:
            return FailureKind.AUTH_REFUSED, "the receiver revoked this sender's token"
        if exc.reason == GoodbyeReason.REPLACED:
            return (
                FailureKind.TURNED_AWAY,
                f"another sender connected with the same id {self.sender_id!r}",
            )
        if exc.reason == GoodbyeReason.OVERLOADED:
            return FailureKind.TURNED_AWAY, "the receiver is overloaded"
        if exc.reason == GoodbyeReason.PROTOCOL_ERROR and not self._established:
            # Our token was right, our hello not: the receiver says which setting.
            return FailureKind.HELLO_REFUSED, f"the receiver turned the stream away: {exc.text}"
        if exc.reason == GoodbyeReason.PROTOCOL_ERROR:
            return FailureKind.PROTOCOL, str(exc)  # the receiver says we broke the protocol
        return FailureKind.SESSION_LOST, str(exc)

    async def _wait_before_retry(
        self, stop: asyncio.Event, failure: FailureKind, problem: str
    ) -> None:
        delay = self.backoff.next_delay(failure)
        self.state = f"waiting for receiver ({problem}), retry in {delay:.1f} s"
        self._log_retry(failure, problem, delay)
        # Wakes early if the daemon stops, or if capture stops with nothing left to deliver.
        # Polled in steps of at most 0.25 s, the last one cut to the deadline: rounding the
        # wait up to whole steps would make every 0.25-0.5 s retry a 0.5 s one.
        deadline = monotonic_us() + delay * 1e6
        while (left_us := deadline - monotonic_us()) > 0 and not self._nothing_left():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(0.25, left_us / 1e6))
                return

    def _log_retry(self, failure: FailureKind, problem: str, delay: float) -> None:
        """Logs a new problem at once, the same one at most every RETRY_LOG_INTERVAL_S."""
        now = monotonic_us()
        self._retries_unlogged += 1
        if problem == self._last_problem and now - self._last_retry_log_us < RETRY_LOG_INTERVAL_US:
            log.debug("%s stream: %s; retrying in %.1f s", self.label, problem, delay)
            return
        repeated = self._retries_unlogged - 1 if problem == self._last_problem else 0
        self._last_problem, self._last_retry_log_us, self._retries_unlogged = problem, now, 0
        where = join_host_port(self.endpoint.host, self.endpoint.port)
        also = f" ({repeated} more attempts since the last report)" if repeated else ""
        level = logging.INFO if failure is FailureKind.SESSION_LOST else logging.WARNING
        log_event(
            log,
            level,
            LogEvent.STREAM_RETRY,
            f"{self.label} stream to {where}: {problem}; retrying in {delay:.1f} s{also}",
            stream=self.label,
            peer=where,
            retry_s=round(delay, 2),
        )

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.metrics.connected.labels(stream=self.label).set(1 if connected else 0)

    # ---- one session -------------------------------------------------------------------

    async def _session(self, stop: asyncio.Event) -> None:
        """Run one session until it ends; raises why, unless the daemon is stopping."""
        ep = self.endpoint
        self.state = f"connecting to {ep.host}:{ep.port}"
        reader, writer = await _unless_stopped(
            stop,
            asyncio.open_connection(
                ep.host,
                ep.port,
                ssl=ep.ssl_context,
                server_hostname=ep.server_name,
                ssl_handshake_timeout=ep.handshake_timeout_s,
            ),
            limit_s=ep.handshake_timeout_s + 1,
        )
        tune_socket(writer)
        try:
            conn = protocol.Connection(Role.SENDER)
            # Acks count from the oldest frame still held: the receiver must not skip it.
            first_seq = self.spool.floor()
            hello = protocol.Hello(
                self.sender_id,
                self.kind,
                self.media_format,
                self.token.as_bytes(),
                first_seq=first_seq,
            )
            writer.write(conn.send(hello))
            welcome = await _unless_stopped(
                stop, self._await_welcome(reader, conn), ep.handshake_timeout_s
            )
            self.max_payload = welcome.max_payload
            self._set_connected(True)
            self._established = True
            self._last_problem = ""
            self.state = "streaming"
            log_event(
                log,
                logging.INFO,
                LogEvent.STREAM_STARTED,
                f"{self.label} stream connected to {join_host_port(ep.host, ep.port)} "
                f"(session {welcome.session_id})",
                stream=self.label,
                peer=join_host_port(ep.host, ep.port),
            )
            link = Link(
                self,
                conn,
                reader,
                writer,
                heartbeat_s=welcome.heartbeat_ms / 1000,
                first_seq=first_seq,
            )
            await link.run(stop)
        finally:
            await close_stream(writer, timeout_s=1.0)

    @staticmethod
    async def _await_welcome(
        reader: asyncio.StreamReader, conn: protocol.Connection
    ) -> protocol.Welcome:
        while True:
            event = conn.next_event()
            if isinstance(event, protocol.Welcome):
                return event
            if isinstance(event, protocol.Refused):
                raise AuthError("the receiver refused this sender's token")
            if isinstance(event, protocol.Goodbye):
                raise SessionEnded(event.reason, event.text)
            if isinstance(event, protocol.ConnectionClosed):
                raise ConnectionResetError("the receiver closed the connection during the hello")
            if event is None:
                conn.receive_data(await reader.read(4096))
