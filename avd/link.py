"""An established session of one stream: the tasks that run between welcome and goodbye.

The pump moves frames to the socket: live ones first, from the drop-oldest queue; when none
waits, the spool's unsent ones as late frames (only into an idle link, paced by acks); at
the end, what is left, then a goodbye. The reader answers heartbeats, notes acks and ends
the session on the receiver's goodbye. The ticker sends heartbeats and the spool's floor,
reports the link to dynamic quality, and drops a receiver silent for three intervals.
``Link.run`` raises why the session ended; ``StreamClient`` decides what happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
from typing import TYPE_CHECKING, Any

from avd import protocol
from avd.clock import monotonic_us
from avd.media.base import CapturedFrame
from avd.metrics import SenderMetrics
from avd.protocol import GoodbyeReason
from avd.quality import LinkReport

if TYPE_CHECKING:
    from avd.stream_client import StreamClient

# A live frame older than this when its turn comes is left to the spool (sent later as a
# late frame): the live view never shows the past as if it were now.
MAX_LIVE_AGE_US = 1_000_000
# Spooled frames sent but not yet acknowledged, at most: acks pace the backfill at the speed
# the receiver records (a 30 s spool is ~1900 frames; the recorder queues 2000 for everyone).
# Live frames do not count: acks are cumulative, so a live frame is acknowledged only once
# every frame before it is, and the unsent ones before it are the backfill's to send. Were
# they counted, a live stream would fill the window while the recorder held a backfill
# burst, and the gap below it would stay unsent until the spool evicted it.
BACKFILL_WINDOW = 256
# On shutdown, how long the sender goes on backfilling before it says goodbye.
FLUSH_BACKFILL_US = 1_000_000
# On shutdown, how long the sender waits for the receiver to acknowledge the last frames.
FLUSH_WAIT_US = 2_500_000
MISSED_HEARTBEATS = 3  # a receiver silent for this many intervals is gone


class SessionEnded(Exception):
    """The receiver said goodbye."""

    def __init__(self, reason: GoodbyeReason | int, text: str) -> None:
        super().__init__(f"receiver said goodbye: {text or reason}")
        self.reason = reason
        self.text = text


class SourceEnded(Exception):
    """The source will produce no more frames (a video file without loop)."""


# Linux's SIOCOUTQNSD: bytes in a TCP socket's send queue not yet sent. A frame is written
# only while less than UNSENT_LIMIT is waiting there: otherwise a slow link's send buffer
# (megabytes with autotuning) holds seconds of video, the live view drifts behind, and the
# drop-oldest queue and dynamic quality never see the congestion. In-flight data is not
# limited, so a fast path with a long round trip keeps its throughput.
SIOCOUTQNSD = 0x894B
UNSENT_LIMIT = 64 * 1024
LINK_POLL_S = 0.005


def tune_socket(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames go out now


def unsent_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes waiting before the wire: asyncio's buffer plus the kernel's unsent queue."""
    waiting = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            raw = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0")
            waiting += int.from_bytes(raw, "little")
    return waiting


class _StreamCounters:
    def __init__(self, metrics: SenderMetrics, stream: str) -> None:
        self.sent = metrics.frames_sent.labels(stream=stream)
        self.sent_bytes = metrics.bytes_sent.labels(stream=stream)
        self.backfilled = metrics.frames_backfilled.labels(stream=stream)


class Link:
    """The three tasks of an established session; ``run`` raises why the session ended."""

    def __init__(
        self,
        client: StreamClient,
        conn: protocol.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        heartbeat_s: float,
        first_seq: int,
    ) -> None:
        self.client, self.conn = client, conn
        self.backfill_cursor = first_seq - 1  # spooled frames above it may still be unsent
        self.sent: set[int] = set()  # sent in this session and not yet acknowledged
        self.backfill_in_flight: set[int] = set()  # the late ones among them
        self.floor_sent = first_seq
        self.counters = _StreamCounters(client.metrics, client.label)
        self.said_goodbye = False
        self.stale = (
            client.metrics.frames_dropped.labels(stream=client.label),
            client.metrics.frames_spooled.labels(stream=client.label),
        )
        self.max_wait_us = 0  # longest capture-to-send wait of a live frame this interval
        self.started_us = monotonic_us()
        self.dropped_seen = client.queue.dropped
        self.backfilled = 0
        self.reader, self.writer = reader, writer
        self.heartbeat_s = max(heartbeat_s, 0.05)
        self.last_rx_us = monotonic_us()
        self.last_peer_hb: tuple[int, int] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._pump()),
            asyncio.create_task(self._read()),
            asyncio.create_task(self._tick()),
            asyncio.create_task(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if stop.is_set():
            await self._goodbye(GoodbyeReason.SHUTDOWN, "sender stopping")
            return
        failure = _first_failure(done)
        # An exception raised here holds this frame in its traceback: a name in this frame
        # for it (or for the tasks, which keep it) would make a cycle, and the link, its
        # reader and TLS buffers would wait for a full garbage collection to be freed.
        del tasks, done
        if failure is None:
            return
        if isinstance(failure, SourceEnded):
            await self._goodbye(GoodbyeReason.BYE, "source ended")
        try:
            raise failure
        finally:
            del failure

    async def _goodbye(self, reason: GoodbyeReason, text: str) -> None:
        if self.said_goodbye:
            return
        self.said_goodbye = True
        with contextlib.suppress(Exception):
            self.writer.write(self.conn.send(protocol.Goodbye(reason, text)))
            await asyncio.wait_for(self.writer.drain(), timeout=1.0)

    async def _pump(self) -> None:
        """Live frames first; when none is waiting, the spool's unsent frames, as late ones."""
        client = self.client
        while True:
            late = False
            item = client.queue.get_nowait()
            if item is None and (pending := self._peek_backfill()) is not None:
                # Backfill only into an idle link, and with few frames awaiting their acks: it
                # must never queue ahead of live frames, nor outrun the receiver's recorder
                # (whose queue would give the excess up). Until then a live frame may come.
                idle = unsent_bytes(self.writer) == 0
                if idle and len(self.backfill_in_flight) < BACKFILL_WINDOW:
                    item, late = pending, True
                    self.backfill_cursor = pending[0]
                else:
                    try:
                        item = await asyncio.wait_for(client.queue.get(), LINK_POLL_S)
                    except TimeoutError:
                        continue
            if item is None:  # nothing to backfill: wait for the next live frame, no polling
                item = await client.queue.get()
                if item is None:  # capture has stopped: what was captured still goes out
                    await self._flush()
                    raise SourceEnded
            seq, frame = item
            if not late and monotonic_us() - frame.capture_us > MAX_LIVE_AGE_US:
                for counter in self.stale:  # left to the spool: sent later as a late frame
                    counter.inc()
                continue
            await self._send(seq, frame, late=late)

    async def _send(self, seq: int, frame: CapturedFrame, *, late: bool) -> None:
        if self.conn.state is not protocol.State.OPEN:
            # The reader saw the connection end in this same turn of the loop.
            raise ConnectionResetError("the connection closed")
        if not self.client.fits(len(frame.data)):
            # Spooled before this receiver said its limit: skipped in this session; the
            # spool lets it go with its age, and the floor then lets the acks pass it.
            self.sent.add(seq)
            return
        head, payload = self.conn.send_media(
            protocol.Media(seq, frame.capture_us, frame.data, late)
        )
        # One call: the TLS layer seals both into one send(), so the receiver wakes once per
        # frame, not once for the 30-byte head and again for the payload.
        self.writer.writelines((head, payload))
        await self._until_link_ready()
        self.sent.add(seq)
        if not late and frame.capture_us >= self.started_us:  # not an outage's leftovers
            self.max_wait_us = max(self.max_wait_us, monotonic_us() - frame.capture_us)
        self.counters.sent.inc()
        self.counters.sent_bytes.inc(len(payload))
        if late:
            self.backfill_in_flight.add(seq)
            self.counters.backfilled.inc()
            self.backfilled += 1

    async def _flush(self) -> None:
        """The source has ended: send what the spool still holds, then say goodbye. The
        receiver answers with its last acks (once recorded) and its own goodbye, which
        ends the reader; this waits at most FLUSH_WAIT_US for that."""
        deadline = monotonic_us() + FLUSH_BACKFILL_US
        while monotonic_us() < deadline and (item := self._next_backfill()) is not None:
            await self._send(*item, late=True)
        # What did not fit stays in the spool: on disk (AVD_SPOOL_DIR) it is sent next time.
        self.writer.write(self.conn.send(protocol.Goodbye(GoodbyeReason.BYE, "source ended")))
        self.said_goodbye = True
        await asyncio.sleep(FLUSH_WAIT_US / 1e6)

    async def _until_link_ready(self) -> None:
        """Holds the next write while the link has UNSENT_LIMIT waiting; capture goes on."""
        await self.writer.drain()
        # Polled: the kernel signals no event when its unsent queue shrinks below a level.
        while unsent_bytes(self.writer) > UNSENT_LIMIT:  # noqa: ASYNC110
            await asyncio.sleep(LINK_POLL_S)

    def _peek_backfill(self) -> tuple[int, CapturedFrame] | None:
        """The oldest spooled frame not yet sent in this session (the cursor skips sent ones)."""
        while (found := self.client.spool.next_after(self.backfill_cursor)) is not None:
            if found[0] not in self.sent:
                return found
            self.backfill_cursor = found[0]
        return None

    def _next_backfill(self) -> tuple[int, CapturedFrame] | None:
        """Like _peek_backfill, and the frame counts as taken."""
        found = self._peek_backfill()
        if found is not None:
            self.backfill_cursor = found[0]
        return found

    def _on_ack(self, seq: int) -> None:
        self.client.spool.ack(seq)
        self.client.acked_seq = max(self.client.acked_seq, seq)
        self.sent = {s for s in self.sent if s > seq}
        self.backfill_in_flight = {s for s in self.backfill_in_flight if s > seq}

    async def _read(self) -> None:
        while True:
            data = await self.reader.read(65536)
            self.last_rx_us = monotonic_us()
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not None:
                if isinstance(event, protocol.Heartbeat):
                    self._on_heartbeat(event)
                elif isinstance(event, protocol.Ack):
                    self._on_ack(event.seq)
                elif isinstance(event, protocol.Goodbye | protocol.ConnectionClosed):
                    self._peer_ended(event)

    def _peer_ended(self, event: protocol.Goodbye | protocol.ConnectionClosed) -> None:
        if self.said_goodbye:
            raise SourceEnded  # the answer to our goodbye: everything is acknowledged
        if isinstance(event, protocol.Goodbye):
            raise SessionEnded(event.reason, event.text)
        raise ConnectionResetError("the receiver closed the connection")

    def _on_heartbeat(self, hb: protocol.Heartbeat) -> None:
        now = monotonic_us()
        # Any echo of one of ours is a sample: a congested link delivers it late.
        if 0 < hb.echo_us <= now:
            self.client.rtt_us = max(now - hb.echo_us - hb.held_us, 0)
            self.client.metrics.rtt.labels(stream=self.client.label).set(self.client.rtt_us / 1e6)
        self.last_peer_hb = (hb.sent_us, now)
        # Answer at once so the receiver gets a clock-offset sample within one round trip;
        # the receiver never answers ours, so this cannot ping-pong.
        self._send_heartbeat()

    def _send_heartbeat(self) -> None:
        if self.conn.state is not protocol.State.OPEN:
            return  # after our goodbye, only the receiver's last acks are awaited
        now = monotonic_us()
        echo, held = 0, 0
        if self.last_peer_hb is not None:
            echo, held = self.last_peer_hb[0], now - self.last_peer_hb[1]
        self.writer.write(self.conn.send(protocol.Heartbeat(now, echo, held)))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            silent_s = (monotonic_us() - self.last_rx_us) / 1e6
            if silent_s > MISSED_HEARTBEATS * self.heartbeat_s:
                raise TimeoutError(f"the receiver sent nothing for {silent_s:.1f} s")
            self._send_heartbeat()
            self._send_floor()
            self._report_link()

    def _report_link(self) -> None:
        client = self.client
        if client.on_link_report is not None:
            dropped = client.queue.dropped - self.dropped_seen
            client.on_link_report(LinkReport(dropped, self.max_wait_us / 1e6))
        self.dropped_seen = client.queue.dropped
        self.backfilled = 0
        self.max_wait_us = 0

    def _send_floor(self) -> None:
        """Tell the receiver when frames were evicted unsent, so its acks can pass them."""
        floor = self.client.spool.floor()
        if floor > self.floor_sent and self.conn.state is protocol.State.OPEN:
            self.floor_sent = floor
            self.writer.write(self.conn.send(protocol.Floor(floor)))


def _first_failure(done: set[asyncio.Task[Any]]) -> BaseException | None:
    """The exception one of the ``done`` tasks ended with, if any (cancelled ones are not)."""
    for task in done:
        if not task.cancelled() and (exc := task.exception()) is not None:
            return exc
    return None
