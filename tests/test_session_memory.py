"""A connection that ends, however it ends, is freed at once on both sides: no reference
cycle keeps its session, reader and TLS buffers alive until a full garbage collection.

Found with a reset storm against the real receiver: its memory grew by about 5 KB per
session that sent frames, for good, with glibc or jemalloc, while its Python heap stayed
flat. A connection lost with an error left its exception in the stream's reader; the
closing code awaited it again, caught it, and the exception's traceback then held the
closing frame, which held the session: a cycle, freed only by the collector's full pass,
which runs rarely in a long-lived daemon. Memory freed that late mostly stays with the
process. These tests run with the collector off, so a cycle keeps its objects for good,
and then list what a full collection would have had to free.

Real TLS on loopback with certificates from avd's own code; the sink and the dropping
receiver are stand-ins for this one module's test.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from avd.backoff import Backoff
from avd.certs import CertPaths
from avd.clock import monotonic_us
from avd.loadgen import camera_like_frames
from avd.media.base import ReceivedFrame, StreamInfo, StreamKind, VideoFormat
from avd.metrics import ReceiverMetrics
from avd.protocol import Connection, Hello, Media, Role, Welcome
from avd.receiver import Receiver
from avd.session import Session
from avd.tls import sender_context

from .conftest import Credentials, receiver_settings
from .test_stream_client import stream_through_drops

VGA = VideoFormat(640, 480, 20, 70)
T = TypeVar("T")
# What a connection's cycle would hold: found among a full collection's garbage, it was
# kept by a cycle, not freed when its connection ended.
CONNECTION_TYPES = {"Session", "Link", "StreamReader", "StreamWriter", "MemoryBIO", "SSLObject"}


class _CountingSink:
    """Takes every frame; counts them (a stand-in for the recorder and the speaker)."""

    def __init__(self) -> None:
        self.frames = 0

    def stream_started(self, info: StreamInfo) -> None:
        pass

    def frame(self, info: StreamInfo, frame: ReceivedFrame) -> None:
        self.frames += 1

    def stream_ended(self, info: StreamInfo) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def collector_off() -> Iterator[Callable[[], list[str]]]:
    """The garbage collector off for the test; yields a function that runs a full
    collection and returns the type names of the connection objects it had to free."""
    gc.collect()
    gc.disable()

    def cyclic_garbage() -> list[str]:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            return sorted(n for o in gc.garbage if (n := type(o).__name__) in CONNECTION_TYPES)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()

    try:
        yield cyclic_garbage
    finally:
        gc.enable()


async def _eventually(check: Callable[[], T], limit_s: float = 10.0) -> T:
    async with asyncio.timeout(limit_s):
        while not (value := check()):  # noqa: ASYNC110 - the receiver's state has no event
            await asyncio.sleep(0.01)
    return value


async def _one_session(
    receiver: Receiver, port: int, pki: CertPaths, token: str, sink: _CountingSink, end: str
) -> weakref.ref[Session]:
    """A sender's session by hand: hello, three frames, then ``end`` ("reset" or "close")."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=sender_context(ca=pki.ca_cert), server_hostname="localhost"
    )
    conn = Connection(Role.SENDER)
    writer.write(conn.send(Hello("cam1", StreamKind.VIDEO, VGA, token.encode())))
    while not isinstance(conn.next_event(), Welcome):
        conn.receive_data(await reader.read(65536))
    before, jpeg = sink.frames, camera_like_frames(VGA, 1)[0]
    for seq in range(3):
        writer.write(b"".join(conn.send_media(Media(seq, monotonic_us(), jpeg, False))))
    await _eventually(lambda: sink.frames == before + 3)
    session = weakref.ref(receiver.sessions[("cam1", StreamKind.VIDEO)])
    if end == "reset":  # an RST: the receiver's reader gets ConnectionResetError
        sock: socket.socket = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()
    await _eventually(lambda: ("cam1", StreamKind.VIDEO) not in receiver.sessions)
    await _eventually(lambda: not receiver._handlers)  # the session's task has returned
    return session


@pytest.mark.parametrize("end", ["reset", "close"])
def test_a_receivers_session_is_freed_as_soon_as_its_connection_ends(
    pki: CertPaths, creds: Credentials, collector_off: Callable[[], list[str]], end: str
) -> None:
    token = creds.add("cam1")

    async def scenario() -> list[weakref.ref[Session]]:
        sink = _CountingSink()
        receiver = Receiver(receiver_settings(pki, creds.tokens_file), sink, ReceiverMetrics())
        listening = await receiver.start()
        try:
            return [
                await _one_session(receiver, listening.video_port, pki, token, sink, end)
                for _ in range(3)
            ]
        finally:
            await receiver.shutdown(deadline_s=5)

    sessions = asyncio.run(scenario())
    alive = sum(session() is not None for session in sessions)
    assert (alive, collector_off()) == (0, [])


def test_a_senders_dropped_connections_are_freed_as_soon_as_they_end(
    pki: CertPaths, collector_off: Callable[[], list[str]]
) -> None:
    """The sender's side: a receiver that drops it three times, by RST and by FIN."""
    drops = 3

    asyncio.run(stream_through_drops(pki, drops, Backoff(first_s=0.01, cap_s=0.02)))
    assert collector_off() == []
