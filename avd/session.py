"""The receiver's side of one connection: hello, authentication, then media until the end.

A session is one TLS connection carrying one stream (video or audio) of one sender. It
reads the hello within the handshake deadline, checks the token (the peer only ever learns
"refused"), then validates each media frame cheaply, measures latency against the clock
offset that heartbeats estimate, and hands frames to the sinks. It ends on a goodbye, the
peer closing, silence past the idle timeout, a protocol error, or ``close()`` from the
receiver (shutdown, a replacing session, a revoked token); the reason is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from avd import protocol
from avd.accept import PushProtocol
from avd.acks import AckWatermark
from avd.clock import ClockSync, monotonic_us
from avd.errors import BadFrame, RemoteProtocolError
from avd.logs import CloseReason, auth_failed, connection_closed, connection_opened
from avd.logthrottle import LogThrottle, suppressed_note
from avd.media.base import (
    AudioFormat,
    MediaSink,
    ReceivedFrame,
    StreamInfo,
    StreamKind,
    VideoFormat,
)
from avd.media.jpeg import check_video_frame
from avd.metrics import ReceiverMetrics
from avd.protocol import GoodbyeReason, Hello, Role
from avd.skew import SkewTracker
from avd.streams import close_stream
from avd.tokens import TokenStore

log = logging.getLogger("avd.receiver")

# Acks are batched: one per ACK_DELAY_S at most, whatever the frame rate.
ACK_DELAY_S = 0.1
# After a sender's goodbye, how long its last frames may take to be recorded and acked.
FINAL_ACK_WAIT_S = 2.0
# A peer that does not read its heartbeats and goodbyes must not make us buffer for it.
MAX_WRITE_BUFFER = 1024 * 1024

_session_ids = itertools.count(1)

GOODBYE_TO_CLOSE: dict[int, CloseReason] = {
    GoodbyeReason.BYE: CloseReason.BYE,
    GoodbyeReason.SHUTDOWN: CloseReason.BYE,
    GoodbyeReason.TIMEOUT: CloseReason.TIMEOUT,
    GoodbyeReason.PROTOCOL_ERROR: CloseReason.PROTOCOL_ERROR,
}
CLOSE_TO_GOODBYE = {
    CloseReason.SHUTDOWN: GoodbyeReason.SHUTDOWN,
    CloseReason.REPLACED: GoodbyeReason.REPLACED,
    CloseReason.TOKEN_REVOKED: GoodbyeReason.REVOKED,
    CloseReason.TIMEOUT: GoodbyeReason.TIMEOUT,
    CloseReason.PROTOCOL_ERROR: GoodbyeReason.PROTOCOL_ERROR,
}


@dataclass
class SessionContext:
    """What every session of one receiver shares, built once by the receiver."""

    tokens: Callable[[], TokenStore]
    metrics: ReceiverMetrics
    sink: MediaSink
    limits: protocol.Limits
    heartbeat_s: float
    idle_timeout_s: float
    register: Callable[[Session], None]
    unregister: Callable[[Session], None]
    finished: Callable[[Session], None]  # no more acknowledgements will be sent
    auth_result: Callable[[str, bool], None]  # (peer ip, token good?) for the lockout
    skew: SkewTracker = field(default_factory=SkewTracker)
    # Hellos turned away, though their token was right: a line a minute per stream.
    refusals: LogThrottle = field(default_factory=LogThrottle)
    # True when a recorder reports each frame done (recorded, duplicate or given up) through
    # Receiver.frames_done; otherwise a frame is done as soon as it arrives.
    acks_after_recording: bool = False


@dataclass
class Counters:
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: int = 0
    lost: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def payload_bound(hello: Hello) -> int:
    """The largest media payload this stream can need: bounds memory per connection."""
    fmt = hello.format
    if isinstance(fmt, VideoFormat):
        # A JPEG is smaller than raw RGB plus its headers, even of pure noise at quality 100.
        return fmt.width * fmt.height * 3 + 64 * 1024
    return fmt.chunk_bytes


def format_problem(hello: Hello) -> str | None:
    """Why a hello's media format cannot be served, or None if it can."""
    fmt = hello.format
    if isinstance(fmt, VideoFormat):
        if not (16 <= fmt.width <= 7680 and 16 <= fmt.height <= 4320):
            return "video size out of range"
        if not (1 <= fmt.fps <= 120 and 1 <= fmt.quality <= 100):
            return "video rate or quality out of range"
    elif isinstance(fmt, AudioFormat):
        if not (8000 <= fmt.rate <= 192_000 and 1 <= fmt.channels <= 8):
            return "audio rate or channels out of range"
        if fmt.sample_width != 2 or not 1 <= fmt.chunk <= 8192:
            return "audio sample width or chunk out of range"
    return None


class _FrameMetrics:
    """A stream's labelled metrics, looked up once per session rather than once per frame."""

    def __init__(self, metrics: ReceiverMetrics, sender_id: str, stream: str) -> None:
        self.received = metrics.frames_received.labels(sender=sender_id, stream=stream)
        self.received_bytes = metrics.bytes_received.labels(sender=sender_id, stream=stream)
        self.late = metrics.frames_late.labels(sender=sender_id, stream=stream)
        self.latency = metrics.frame_latency.labels(stream=stream)
        # Not the skew gauge: it must not show a 0 for a sender that sends one stream only.


class _Incoming:
    """The session's end of its ``PushProtocol``: bytes into the ``Connection`` as they come.

    Until the stream opens, the session's task looks at the events itself (the hello, a
    probe's goodbye), and ``wait`` wakes it when more bytes or the end arrive. Once it
    streams, ``handler`` takes the events in the transport's callback as they complete, and
    the task is woken only at the end: no reader buffer to copy through and no task wake-up
    per frame (55-65 µs of CPU a 25 KB frame here, see docs/performance.md).
    """

    def __init__(self, conn: protocol.Connection) -> None:
        self.conn = conn
        self.handler: Callable[[], bool] | None = None  # streaming; True: the session ends
        self.finished = False  # nothing more is taken: the end, an error, a goodbye, close()
        self._error: Exception | None = None
        self._arrived = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        if not self.finished:
            self._take(data)

    def _take(self, data: bytes | None) -> None:
        """``data`` (None: nothing new) into the protocol, and the events to the handler."""
        try:
            if data is not None:
                self.conn.receive_data(data)
            if self.handler is not None and self.handler():
                self.finished = True
        except Exception as exc:  # the peer broke the protocol (or a bug): the task raises it
            self._error, self.finished = exc, True
        if self.handler is None or self.finished:
            self._arrived.set()

    def connection_ended(self, exc: Exception | None) -> None:
        if exc is None:
            self.data_received(b"")  # the peer's end: the protocol's ConnectionClosed
        elif not self.finished:
            self._error = exc
        self.finished = True
        self._arrived.set()

    def start_streaming(self, handler: Callable[[], bool]) -> None:
        """From now on ``handler`` takes the events: first those already received."""
        self.handler = handler
        if self._error is None:
            self._take(None)

    def stop(self) -> None:
        """Take nothing more, and wake the task: the session is closing."""
        self.finished = True
        self._arrived.set()

    async def wait(self) -> bool:
        """Until more bytes (before streaming) or the end arrive: False once nothing more
        will come. Raises the connection's error, or the protocol's."""
        if not self.finished:
            self._arrived.clear()
            await self._arrived.wait()
        error, self._error = self._error, None
        if error is not None:
            try:
                raise error
            finally:
                del error  # not kept by this frame, which the error's traceback holds
        return not self.finished


class Session:
    def __init__(
        self,
        ctx: SessionContext,
        writer: asyncio.StreamWriter,
        incoming: PushProtocol,
        *,
        peer: str,
        port_kind: StreamKind,
        ip: str,
        tls_version: str,
        tls_cipher: str,
    ) -> None:
        self.ctx = ctx
        self.writer = writer
        self.peer, self.port_kind, self.ip = peer, port_kind, ip
        self.tls_version, self.tls_cipher = tls_version, tls_cipher
        self.session_id = next(_session_ids)
        self.conn = protocol.Connection(Role.RECEIVER, ctx.limits)
        self._incoming = _Incoming(self.conn)
        self._final_event: protocol.Goodbye | protocol.ConnectionClosed | None = None
        incoming.attach(self._incoming)
        self.counters = Counters()
        self.clock = ClockSync()
        self.info: StreamInfo | None = None
        self.started_us = monotonic_us()
        self.last_rx_us = self.started_us
        self._close_reason: CloseReason | None = None
        self.acks = AckWatermark(0)
        self._highest_seq = -1
        self._acks_moved = asyncio.Event()
        self._stream_open = False
        self._acks_sent = -1
        self._ack_timer: asyncio.TimerHandle | None = None
        self._last_ack_s = -math.inf  # on the loop's clock
        self._last_peer_hb: tuple[int, int] | None = None  # (peer sent µs, our arrival µs)
        self._claimed_id: str | None = None  # an authenticated id with no stream, for the log

    @property
    def sender_id(self) -> str | None:
        return self.info.sender_id if self.info else self._claimed_id

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self, hello_deadline_s: float) -> CloseReason:
        reason = CloseReason.ERROR
        try:
            hello = await asyncio.wait_for(self._read_hello(), timeout=max(hello_deadline_s, 0))
            if hello is None:
                reason = CloseReason.PEER_CLOSED
            elif (refused := self._authenticate(hello)) is not None:
                reason = refused
            elif hello.probe:
                reason = await self._answer_probe(hello)
            else:
                self._open_stream(hello)
                reason = await self._serve()
        except TimeoutError:
            reason = CloseReason.TIMEOUT
            self.ctx.metrics.handshake_failures.labels(reason="hello-timeout").inc()
        except RemoteProtocolError as exc:
            reason = CloseReason.PROTOCOL_ERROR
            log.warning("protocol error from %s (%s): %s", self.peer, self.sender_id or "-", exc)
            self._send_goodbye(GoodbyeReason.PROTOCOL_ERROR, "protocol error")
            if self.info is None:
                self.ctx.metrics.handshake_failures.labels(reason="protocol-error").inc()
        except (ConnectionError, ssl.SSLError, OSError):
            reason = self._close_reason or CloseReason.PEER_CLOSED
        finally:
            await self._finish(reason)
        return reason

    def close(self, reason: CloseReason) -> None:
        """End the session from outside (shutdown, replaced, revoked); idempotent."""
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self._send_goodbye(CLOSE_TO_GOODBYE.get(reason, GoodbyeReason.BYE), reason.value)
        self.writer.close()
        self._incoming.stop()

    async def _answer_goodbye(self) -> None:
        """The sender is done: end the stream (the recorder finishes its file), wait for the
        acknowledgements to cover what arrived, send them, then our own goodbye."""
        self._end_stream()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINAL_ACK_WAIT_S):
                while self.acks.acked < self._highest_seq:
                    self._acks_moved.clear()
                    await self._acks_moved.wait()
        self._send_ack()
        self._send_goodbye(GoodbyeReason.BYE, "recorded")

    def _end_stream(self) -> None:
        """No more frames for the sinks from this session; idempotent."""
        if self.info is None or not self._stream_open:
            return
        self._stream_open = False
        self.ctx.skew.forget(self.info.sender_id, self.info.kind)
        self.ctx.unregister(self)
        self.ctx.sink.stream_ended(self.info)
        self.ctx.metrics.connections_active.labels(stream=self.info.kind.label).dec()

    async def _finish(self, reason: CloseReason) -> None:
        reason = self._close_reason or reason
        self._send_ack()  # what is recorded by now, the sender may forget
        self._end_stream()
        if self.info is not None:
            self.ctx.finished(self)
        await close_stream(self.writer, timeout_s=1.0)
        c = self.counters
        connection_closed(
            log,
            peer=self.peer,
            sender_id=self.sender_id or "-",
            stream=self.port_kind.label,
            duration_s=(monotonic_us() - self.started_us) / 1e6,
            frames_in=c.frames_in,
            frames_out=c.frames_out,
            bytes_in=self.conn.bytes_in,
            bytes_out=c.bytes_out,
            reason=reason,
        )

    # ---- handshake ---------------------------------------------------------------------

    async def _read_hello(self) -> Hello | None:
        more = True
        while True:
            event = self.conn.next_event()
            if isinstance(event, Hello):
                return event
            if isinstance(event, protocol.ConnectionClosed) or (event is None and not more):
                return None
            if event is None:
                more = await self._incoming.wait()

    def _authenticate(self, hello: Hello) -> CloseReason | None:
        """None once the hello is welcomed; else why the connection closes.

        A wrong token is refused with nothing said (``Refused`` is empty). A sender whose
        token is right but whose hello cannot be served (its video on the audio port, a
        format out of range) is told why, in a goodbye: it has proved who it is, the
        reason is its own setting, and "token refused" would send its operator looking in
        the wrong place.
        """
        # The token check runs first and always, so every refusal costs the same.
        token_ok = self.ctx.tokens().verify(hello.sender_id, hello.token)
        self.ctx.auth_result(self.ip, token_ok)
        if not token_ok:
            self._write(self.conn.send(protocol.Refused()))
            auth_failed(
                log, peer=self.peer, claimed_sender_id=hello.sender_id, stream=hello.kind.label
            )
            self.ctx.metrics.auth_failures.inc()
            return CloseReason.AUTH_FAILED
        problem = format_problem(hello)
        if hello.kind is not self.port_kind:
            problem = (
                f"{hello.kind.label} stream on the {self.port_kind.label} port "
                "(are AVD_VIDEO_PORT and AVD_AUDIO_PORT swapped?)"
            )
        if problem is not None:
            self._claimed_id = hello.sender_id  # proven by its token: its close line names it
            self._write(self.conn.send(protocol.Goodbye(GoodbyeReason.PROTOCOL_ERROR, problem)))
            self.ctx.metrics.handshake_failures.labels(reason="bad-hello").inc()
            stream = f"{hello.sender_id}/{hello.kind.label}"
            suppressed = self.ctx.refusals.admit("bad-hello", stream, time.monotonic())
            if suppressed is not None:
                log.warning(
                    "refused %s from %s: %s%s",
                    *(hello.sender_id, self.peer, problem, suppressed_note(suppressed)),
                )
            return CloseReason.PROTOCOL_ERROR
        max_payload = min(self.ctx.limits.media_payload(hello.kind), payload_bound(hello))
        heartbeat_ms = int(self.ctx.heartbeat_s * 1000)
        self._write(self.conn.send(protocol.Welcome(self.session_id, heartbeat_ms, max_payload)))
        return None

    async def _answer_probe(self, hello: Hello) -> CloseReason:
        """``avd check``: authenticated and welcomed, nothing else; it says goodbye next."""
        self._claimed_id = hello.sender_id
        log.info("%s passed an authentication probe from %s", hello.sender_id, self.peer)
        try:
            async with asyncio.timeout(self.ctx.heartbeat_s * 3):
                more = True
                while True:
                    event = self.conn.next_event()
                    ended = event is None and not more
                    if isinstance(event, protocol.Goodbye | protocol.ConnectionClosed) or ended:
                        return CloseReason.BYE
                    if event is None:
                        more = await self._incoming.wait()
        except TimeoutError:
            return CloseReason.TIMEOUT

    def _open_stream(self, hello: Hello) -> None:
        self.info = StreamInfo(
            sender_id=hello.sender_id,
            kind=hello.kind,
            format=hello.format,
            peer=self.peer,
            session_id=self.session_id,
        )
        self.acks = AckWatermark(hello.first_seq)
        self._highest_seq = hello.first_seq - 1
        self._stream_open = True
        self._per_frame = _FrameMetrics(self.ctx.metrics, hello.sender_id, hello.kind.label)
        self.ctx.register(self)
        self.ctx.metrics.connections_active.labels(stream=hello.kind.label).inc()
        self.ctx.sink.stream_started(self.info)
        connection_opened(
            log,
            peer=self.peer,
            sender_id=hello.sender_id,
            stream=hello.kind.label,
            tls_version=self.tls_version,
            tls_cipher=self.tls_cipher,
        )

    # ---- streaming ---------------------------------------------------------------------

    async def _serve(self) -> CloseReason:
        ticker = asyncio.create_task(self._tick())
        try:
            return await self._read_loop()
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    async def _read_loop(self) -> CloseReason:
        """Frames are handled as they arrive (``_handle_events``, in the transport's
        callback); this waits for the end: a goodbye, the peer gone, an error, close()."""
        if (closed := self._closed_by_us()) is not None:  # closed while it said hello
            return closed
        self._incoming.start_streaming(self._handle_events)
        try:
            while await self._incoming.wait():
                pass
        finally:
            self._incoming.handler = None  # a bound method of ours: no cycle through it
        event, self._final_event = self._final_event, None
        if (closed := self._closed_by_us()) is not None:
            return closed
        if isinstance(event, protocol.Goodbye):
            await self._answer_goodbye()
            return GOODBYE_TO_CLOSE.get(int(event.reason), CloseReason.BYE)
        return CloseReason.PEER_CLOSED

    def _closed_by_us(self) -> CloseReason | None:
        """Why close() ended the session, if it did (a call: it changes across awaits)."""
        return self._close_reason

    def _handle_events(self) -> bool:
        """Every event complete so far; True once the session ends (a goodbye, the end)."""
        self.last_rx_us = monotonic_us()
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, protocol.Media):
                self._on_media(event)
            elif isinstance(event, protocol.Heartbeat):
                self._on_heartbeat(event)
            elif isinstance(event, protocol.Floor):
                if self.acks.floor(event.seq):
                    self._schedule_ack()
            elif isinstance(event, protocol.Goodbye | protocol.ConnectionClosed):
                self._final_event = event
                return True
        return False

    async def _tick(self) -> None:
        """Heartbeats at the agreed interval; closes a session silent past the idle timeout."""
        while True:
            self._send_heartbeat()
            await asyncio.sleep(self.ctx.heartbeat_s)
            if monotonic_us() - self.last_rx_us > self.ctx.idle_timeout_s * 1e6:
                log.info("closing idle session of %s from %s", self.sender_id, self.peer)
                self.close(CloseReason.TIMEOUT)
                return

    def _on_media(self, media: protocol.Media) -> None:
        info = self.info
        assert info is not None
        self._highest_seq = max(self._highest_seq, media.seq)
        try:
            self._validate(info, media.data)
        except BadFrame as exc:
            stream = info.kind.label
            self.counters.rejected += 1
            # A fixed label set: the exception text holds numbers and would explode it.
            self.ctx.metrics.frames_rejected.labels(reason=f"{stream}-invalid").inc()
            if self.counters.rejected == 1:
                log.warning("rejected a %s frame from %s: %s", stream, info.sender_id, exc)
            self.frames_done((media.seq,))  # resending a bad frame would not make it good
            return
        metrics = self._per_frame
        if media.late:
            metrics.late.inc()
        arrival = monotonic_us()
        local_capture = self.clock.to_local(media.capture_us)
        frame = ReceivedFrame(
            media.seq, media.capture_us, arrival, local_capture, media.data, media.late
        )
        self.ctx.sink.frame(info, frame)  # the live view and speaker first; counting after
        if local_capture is not None and not media.late:
            latency = max(arrival - local_capture, 0) / 1e6
            metrics.latency.observe(latency)
            skew = self.ctx.skew.observe(info.sender_id, info.kind, latency)
            if skew is not None:
                self.ctx.metrics.av_skew.labels(sender=info.sender_id).set(skew)
        self.counters.frames_in += 1
        metrics.received.inc()
        metrics.received_bytes.inc(len(media.data))
        if not self.ctx.acks_after_recording:
            self.frames_done((media.seq,))

    # ---- acknowledgements --------------------------------------------------------------

    def frames_done(self, seqs: Iterable[int]) -> None:
        """These frames are finished with: acknowledge them (batched, within ACK_DELAY_S)."""
        moved = False
        for seq in seqs:
            moved = self.acks.done(seq) or moved
        if moved:
            self._acks_moved.set()
            self._schedule_ack()

    def _schedule_ack(self) -> None:
        """An ack goes out at once if the last one went out ACK_DELAY_S ago or more, else
        when that much time has passed: no timer (a wake-up of its own) while frames or the
        recorder's reports come less often than that, as they do from a 20 fps stream."""
        if self._ack_timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._last_ack_s + ACK_DELAY_S - loop.time()
        if wait <= 0:
            self._send_ack()
        else:
            self._ack_timer = loop.call_later(wait, self._send_ack)

    def _send_ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        open_states = (protocol.State.OPEN, protocol.State.GOODBYE_RECEIVED)
        if self.acks.acked > self._acks_sent and self.conn.state in open_states:
            self._acks_sent = self.acks.acked
            self._last_ack_s = asyncio.get_running_loop().time()
            self._write(self.conn.send(protocol.Ack(self.acks.acked)))
            assert self.info is not None
            self.ctx.metrics.acks_sent.labels(stream=self.info.kind.label).inc()

    @staticmethod
    def _validate(info: StreamInfo, data: bytes) -> None:
        fmt = info.format
        if isinstance(fmt, VideoFormat):
            check_video_frame(data, fmt.width, fmt.height)
        elif len(data) != fmt.chunk_bytes:
            raise BadFrame(f"chunk of {len(data)} bytes, expected {fmt.chunk_bytes}")

    def _on_heartbeat(self, hb: protocol.Heartbeat) -> None:
        now = monotonic_us()
        self._last_peer_hb = (hb.sent_us, now)
        # Any echo of one of ours is a sample (a congested link delivers it after newer
        # ones were sent); the min-RTT filter keeps the good ones.
        if 0 < hb.echo_us <= now:
            self.clock.add(
                local_now_us=now, peer_sent_us=hb.sent_us, echoed_us=hb.echo_us, held_us=hb.held_us
            )
            if self.clock.rtt_us is not None and self.info is not None:
                self.ctx.metrics.rtt.labels(
                    sender=self.info.sender_id, stream=self.info.kind.label
                ).set(self.clock.rtt_us / 1e6)

    def _send_heartbeat(self) -> None:
        if self.conn.state is not protocol.State.OPEN:
            return
        now = monotonic_us()
        echo, held = 0, 0
        if self._last_peer_hb is not None:
            echo, held = self._last_peer_hb[0], now - self._last_peer_hb[1]
        self._write(self.conn.send(protocol.Heartbeat(now, echo, held)))

    # ---- writing -----------------------------------------------------------------------

    def _send_goodbye(self, reason: GoodbyeReason, text: str) -> None:
        with contextlib.suppress(Exception):
            self._write(self.conn.send(protocol.Goodbye(reason, text)))

    def _write(self, data: bytes) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            # The peer stopped reading: do not buffer for it any longer.
            self._close_reason = self._close_reason or CloseReason.TIMEOUT
            transport.abort()
            return
        self.writer.write(data)
        self.counters.frames_out += 1
        self.counters.bytes_out += len(data)
