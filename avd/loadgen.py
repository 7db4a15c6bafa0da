"""A light load generator for ``avd bench``: many video senders from one process.

Each simulated sender is one real TLS session (avd's sender TLS policy, the receiver's CA,
host-name check) speaking the real protocol (``avd.protocol.Connection``): hello with its own
token, welcome, then JPEG frames at a steady rate, heartbeats answered at once (so the
receiver can estimate the clock offset and measure latency), and a goodbye at the end. What
makes it light: the frames are encoded once, before the run, from the sender's own test
pattern (camera-like 640x480 JPEGs of about 24 KiB), and one pacing task sends for every
session, staggered evenly over the frame period as independent cameras would be.

A frame is stamped with its send time as its capture time. Like the real sender's
drop-oldest queue, a frame that finds its session backed up by more than
``MAX_BUFFERED_FRAMES`` is skipped, and its sequence number with it: the receiver sees a gap.

Run as its own process (``python -m avd.loadgen CONFIG.json``) so that the generator and the
receiver do not share a GIL: it prints ``loadgen connected=N failed=M`` once every session is
up (or has failed), streams until SIGTERM, then prints ``loadgen report {json}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from avd import eventloop, protocol
from avd.clock import monotonic_us
from avd.errors import RemoteProtocolError
from avd.media.base import StreamKind, VideoFormat
from avd.protocol import GoodbyeReason, Role
from avd.stats import percentile
from avd.streams import close_stream
from avd.tls import sender_context

MAX_BUFFERED_FRAMES = 4  # the real sender's video queue (AVD_VIDEO_QUEUE_FRAMES) holds 4
CONNECT_CONCURRENCY = 16  # handshakes in flight at once: a camera fleet does not start in 1 ms
HANDSHAKE_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 15.0  # at the end, for a backed-up receiver to take what was written


def camera_like_frames(fmt: VideoFormat, count: int = 16) -> list[bytes]:
    """``count`` different JPEGs of the sender's test pattern, as its camera would send them."""
    from avd.media.video import camera_like_images, encode_jpeg  # noqa: PLC0415 - loads cv2

    return [encode_jpeg(image, fmt.quality) for image in camera_like_images(fmt, count)]


def source_address(index: int) -> str:
    """A distinct loopback address per simulated camera (127.1.0.1, 127.1.0.2, ...).

    The whole of 127/8 reaches the loopback interface on Linux; one address per camera keeps
    the receiver's per-address limit (AVD_MAX_CONNECTIONS_PER_IP) as it is in production.
    """
    return f"127.1.{index // 250}.{index % 250 + 1}"


@dataclass(frozen=True)
class LoadConfig:
    host: str
    port: int
    server_name: str
    ca_file: str
    senders: list[tuple[str, str]] = field(repr=False)  # (sender id, token): never shown
    width: int = 640
    height: int = 480
    fps: int = 20
    quality: int = 70
    first_index: int = 0  # numbers the source addresses across several generator processes
    distinct_sources: bool = True

    @property
    def video_format(self) -> VideoFormat:
        return VideoFormat(self.width, self.height, self.fps, self.quality)

    def save(self, path: Path) -> None:
        """As JSON readable by its owner only: it holds the tokens."""
        path.touch(mode=0o600)
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> LoadConfig:
        raw = json.loads(path.read_text())
        raw["senders"] = [(str(s), str(t)) for s, t in raw["senders"]]
        return cls(**raw)


@dataclass
class LoadReport:
    connected: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # distinct failure texts, a few
    sent: dict[str, int] = field(default_factory=dict)  # frames written, per sender id
    skipped: int = 0  # frames not sent because their session was backed up
    closed_early: int = 0  # sessions the receiver ended before the generator stopped
    unflushed: int = 0  # sessions whose written frames had not all left at the end
    lag_p99_ms: float = 0.0  # how late after its slot a frame went out: the generator's health
    lag_max_ms: float = 0.0


class _Session:
    """One simulated camera's established session."""

    def __init__(
        self,
        sender_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: protocol.Connection,
    ) -> None:
        self.sender_id = sender_id
        self.reader, self.writer, self.conn = reader, writer, conn
        self.seq = 0
        self.sent = 0
        self.closed = False

    def send_frame(self, data: bytes, limit_bytes: int) -> bool:
        """Write one frame now; False (and a gap in seq) if the session is backed up."""
        seq, self.seq = self.seq, self.seq + 1
        if self.writer.transport.get_write_buffer_size() > limit_bytes:
            return False
        head, payload = self.conn.send_media(protocol.Media(seq, monotonic_us(), data))
        self.writer.writelines((head, payload))  # one send(), as the sender's link does
        self.sent += 1
        return True

    async def read_loop(self) -> None:
        """Answer heartbeats at once (the receiver's clock-offset estimate needs the echo)."""
        try:
            while not self.closed:
                data = await self.reader.read(65536)
                if not data:  # at EOF read() returns at once: it must end the loop
                    break
                arrival = monotonic_us()
                self.conn.receive_data(data)
                while (event := self.conn.next_event()) is not None:
                    if isinstance(event, protocol.Heartbeat):
                        now = monotonic_us()
                        reply = protocol.Heartbeat(now, event.sent_us, now - arrival)
                        self.writer.write(self.conn.send(reply))
                    elif isinstance(event, protocol.Goodbye | protocol.ConnectionClosed):
                        self.closed = True
                        break
        except (OSError, ssl.SSLError, RemoteProtocolError):
            pass
        self.closed = True

    async def goodbye(self) -> bool:
        """Send what is buffered, then a goodbye; False if the buffer did not empty in time.

        ``drain()`` only waits for the low-water mark: frames still buffered when the
        process exits would be lost, and counted as lost by the receiver, so wait them out.
        """
        deadline = monotonic_us() + int(FLUSH_TIMEOUT_S * 1e6)
        transport = self.writer.transport
        while transport.get_write_buffer_size() and not self.closed:
            if monotonic_us() > deadline:
                break
            await asyncio.sleep(0.01)
        flushed = not transport.get_write_buffer_size()
        with contextlib.suppress(Exception):
            if not self.closed:
                self.writer.write(self.conn.send(protocol.Goodbye(GoodbyeReason.BYE, "done")))
                await asyncio.wait_for(self.writer.drain(), timeout=2.0)
        await close_stream(self.writer, timeout_s=2.0)
        return flushed


async def _open_session(
    config: LoadConfig, index: int, context: ssl.SSLContext, slots: asyncio.Semaphore
) -> _Session:
    sender_id = config.senders[index][0]
    local = (source_address(config.first_index + index), 0) if config.distinct_sources else None
    async with slots:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                config.host,
                config.port,
                ssl=context,
                server_hostname=config.server_name,
                local_addr=local,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
            ),
            timeout=HANDSHAKE_TIMEOUT_S + 1,
        )
        conn = protocol.Connection(Role.SENDER)
        try:
            await _hello(conn, reader, writer, config.senders[index], config.video_format)
        except BaseException:
            writer.close()
            raise
    return _Session(sender_id, reader, writer, conn)


async def _hello(
    conn: protocol.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    sender: tuple[str, str],
    fmt: VideoFormat,
) -> None:
    sender_id, token = sender
    writer.write(conn.send(protocol.Hello(sender_id, StreamKind.VIDEO, fmt, token.encode())))
    while (event := conn.next_event()) is None:
        data = await asyncio.wait_for(reader.read(4096), timeout=HANDSHAKE_TIMEOUT_S)
        conn.receive_data(data)
    if not isinstance(event, protocol.Welcome):
        raise ConnectionRefusedError(f"{sender_id}: the receiver answered {type(event).__name__}")


async def connect_all(config: LoadConfig, report: LoadReport) -> list[_Session]:
    context = sender_context(ca=Path(config.ca_file))
    slots = asyncio.Semaphore(CONNECT_CONCURRENCY)
    attempts = [_open_session(config, i, context, slots) for i in range(len(config.senders))]
    sessions: list[_Session] = []
    for outcome in await asyncio.gather(*attempts, return_exceptions=True):
        if isinstance(outcome, _Session):
            sessions.append(outcome)
        elif isinstance(outcome, Exception):
            report.failed += 1
            text = f"{type(outcome).__name__}: {outcome}"
            if text not in report.errors and len(report.errors) < 5:
                report.errors.append(text)
        else:
            raise outcome
    report.connected = len(sessions)
    return sessions


async def _pace(
    sessions: Sequence[_Session], frames: Sequence[bytes], fps: int, stop: asyncio.Event
) -> tuple[int, list[int]]:
    """Send for every session, staggered over the period, until ``stop``: (skipped, lags µs)."""
    count, period_us = len(sessions), 1_000_000 / fps
    limit = MAX_BUFFERED_FRAMES * max(len(f) for f in frames)
    start_us, slot, skipped, lags = monotonic_us() + 10_000, 0, 0, []
    while not stop.is_set():
        frame_round, which = divmod(slot, count)
        due_us = start_us + int((frame_round + which / count) * period_us)
        now = monotonic_us()
        if due_us > now + 500:  # the event loop's timer granularity is about 1 ms
            await asyncio.sleep((due_us - now) / 1e6)
            continue
        session = sessions[which]
        if not session.closed:
            lags.append(max(now - due_us, 0))
            data = frames[(frame_round + which) % len(frames)]
            skipped += not session.send_frame(data, limit)
        slot += 1
    return skipped, lags


async def run_load(
    config: LoadConfig,
    frames: Sequence[bytes],
    stop: asyncio.Event,
    on_connected: Callable[[LoadReport], None] | None = None,
) -> LoadReport:
    """Connect every sender, stream until ``stop`` is set, say goodbye; what happened."""
    report = LoadReport()
    sessions = await connect_all(config, report)
    if on_connected is not None:
        on_connected(report)
    readers = [asyncio.create_task(s.read_loop()) for s in sessions]
    try:
        if sessions:
            report.skipped, lags = await _pace(sessions, frames, config.fps, stop)
            report.lag_p99_ms = percentile(lags, 0.99) / 1000 if lags else 0.0
            report.lag_max_ms = max(lags, default=0) / 1000
    finally:
        report.closed_early = sum(s.closed for s in sessions)
        flushed = await asyncio.gather(*(s.goodbye() for s in sessions))
        report.unflushed = flushed.count(False)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    report.sent = {s.sender_id: s.sent for s in sessions}
    return report


async def _serve(config: LoadConfig) -> LoadReport:
    frames = await asyncio.to_thread(camera_like_frames, config.video_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def connected(report: LoadReport) -> None:
        print(f"loadgen connected={report.connected} failed={report.failed}", flush=True)
        for error in report.errors:
            print(f"loadgen error: {error}", file=sys.stderr, flush=True)

    return await run_load(config, frames, stop, connected)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m avd.loadgen CONFIG.json", file=sys.stderr)
        return 2
    report = eventloop.run(_serve(LoadConfig.load(Path(args[0]))))
    print("loadgen report " + json.dumps(asdict(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
