"""StreamClient's retry loop: scripted sessions (a unit test), then a real TLS receiver on
loopback that welcomes the client and drops it, as a killed receiver daemon would."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time

import pytest

from avd import protocol
from avd.backoff import Backoff, FailureKind
from avd.certs import CertPaths
from avd.clock import monotonic_us
from avd.errors import LocalProtocolError
from avd.link import SessionEnded
from avd.media.base import CapturedFrame, StreamKind, VideoFormat
from avd.metrics import SenderMetrics
from avd.protocol import GoodbyeReason, Role
from avd.queues import DropOldestQueue
from avd.spool import Spool
from avd.stream_client import Endpoint, StreamClient
from avd.tls import receiver_context, sender_context
from avd.tokens import Token


def make_client(
    loop: asyncio.AbstractEventLoop, endpoint: Endpoint, backoff: Backoff
) -> StreamClient:
    return StreamClient(
        kind=StreamKind.VIDEO,
        endpoint=endpoint,
        sender_id="cam1",
        token=Token("t" * 43),
        media_format=VideoFormat(640, 480, 20, 70),
        queue=DropOldestQueue[tuple[int, CapturedFrame]](4, loop),
        spool=Spool(max_bytes=1 << 20, max_age_us=10**9),
        metrics=SenderMetrics(),
        backoff=backoff,
    )


def test_an_unexpected_error_in_a_session_is_logged_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> int:
        client = make_client(
            asyncio.get_running_loop(),
            Endpoint("127.0.0.1", 9, "localhost", ssl.create_default_context(), 1.0),
            Backoff(first_s=0.01, cap_s=0.02),
        )
        stop = asyncio.Event()
        attempts = 0

        async def session(_: asyncio.Event) -> None:
            nonlocal attempts
            attempts += 1
            if attempts >= 3:
                stop.set()
            raise LocalProtocolError("cannot send Media as sender in state closed")

        client._session = session  # type: ignore[method-assign,assignment]
        await asyncio.wait_for(client.run(stop), timeout=5)
        return attempts

    caplog.set_level(logging.ERROR, "avd.sender")
    assert asyncio.run(scenario()) == 3  # retried, not crashed
    # The traceback once: the same error again within a minute is not logged whole again.
    bugs = [r for r in caplog.records if "unexpected error; reconnecting" in r.getMessage()]
    assert len(bugs) == 1
    assert bugs[0].exc_info is not None


# ---- reconnect pace after a welcomed session ------------------------------------------


class RecordingBackoff(Backoff):
    """The real policy, with the delays it gave kept for the test to read."""

    def __init__(self) -> None:
        super().__init__(first_s=0.01, cap_s=10.0, rng=random.Random(1))
        self.delays: list[float] = []

    def next_delay(self, failure: FailureKind) -> float:
        delay = super().next_delay(failure)
        self.delays.append(delay)
        return delay


def delays_after_welcomed_sessions_ending_with(end: BaseException, sessions: int) -> list[float]:
    """Runs a client whose every session is welcomed, then ends by raising ``end``."""

    async def scenario() -> list[float]:
        backoff = RecordingBackoff()
        endpoint = Endpoint("127.0.0.1", 9, "localhost", ssl.create_default_context(), 1.0)
        client = make_client(asyncio.get_running_loop(), endpoint, backoff)
        stop = asyncio.Event()
        count = 0

        async def session(_: asyncio.Event) -> None:
            nonlocal count
            count += 1
            client._established = True  # as _session does once the welcome came
            if count > sessions:
                stop.set()
                return
            raise end

        client._session = session  # type: ignore[method-assign,assignment]
        await asyncio.wait_for(client.run(stop), timeout=10)
        return backoff.delays

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    "end",
    [
        ConnectionResetError("the receiver closed the connection"),
        TimeoutError("the receiver sent nothing for 3.1 s"),
        SessionEnded(GoodbyeReason.SHUTDOWN, "shutdown"),
    ],
    ids=["dropped", "silent", "shutdown"],
)
def test_a_receiver_that_went_away_is_retried_within_first_s_every_time(
    end: BaseException,
) -> None:
    delays = delays_after_welcomed_sessions_ending_with(end, sessions=5)
    assert len(delays) == 5
    assert max(delays) <= 0.01, delays  # never escalated past first_s


@pytest.mark.parametrize(
    "reason",
    [GoodbyeReason.REPLACED, GoodbyeReason.OVERLOADED, GoodbyeReason.PROTOCOL_ERROR],
    ids=lambda reason: reason.name,
)
def test_a_receiver_that_turns_us_away_is_retried_ever_later(reason: GoodbyeReason) -> None:
    delays = delays_after_welcomed_sessions_ending_with(SessionEnded(reason, ""), sessions=5)
    assert len(delays) == 5
    assert delays[-1] > 0.08, delays  # 0.16 s base by the fifth: the escalation went on


# ---- the same, over real TLS on loopback -----------------------------------------------


class DroppingReceiver:
    """A receiver on loopback that welcomes each session and drops its connection (no
    goodbye, like a killed daemon) once the first frame arrives, ``drops`` times."""

    def __init__(self, drops: int) -> None:
        self.drops = drops
        self.welcomed: list[float] = []  # when each session's hello was answered
        self.dropped: list[float] = []  # when each dropped session was dropped
        self.changed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = protocol.Connection(Role.RECEIVER)
        try:
            await self._until(reader, conn, protocol.Hello)
            writer.write(conn.send(protocol.Welcome(len(self.welcomed) + 1, 1000, 1 << 20)))
            self._note(self.welcomed)
            await self._until(reader, conn, protocol.Media)
            if len(self.dropped) < self.drops:
                # Abort on odd sessions (an RST), close on even ones (a FIN): a killed
                # daemon's kernel sends either, depending on what was left unread.
                if len(self.dropped) % 2:
                    writer.close()
                else:
                    writer.transport.abort()
                self._note(self.dropped)
                return
            await reader.read()  # the last session stays until the sender stops
        except (OSError, EOFError):
            pass  # the sender went away: not under test
        finally:
            writer.close()

    def _note(self, times: list[float]) -> None:
        times.append(time.monotonic())
        self.changed.set()

    @staticmethod
    async def _until(
        reader: asyncio.StreamReader, conn: protocol.Connection, wanted: type[protocol.Event]
    ) -> None:
        while True:
            while (event := conn.next_event()) is not None:
                if isinstance(event, wanted):
                    return
            data = await reader.read(65536)
            if not data:
                raise EOFError("the sender closed the connection")
            conn.receive_data(data)

    async def wait_for_welcomes(self, count: int, limit_s: float) -> None:
        async with asyncio.timeout(limit_s):
            while len(self.welcomed) < count:
                self.changed.clear()
                await self.changed.wait()


async def stream_through_drops(pki: CertPaths, drops: int, backoff: Backoff) -> DroppingReceiver:
    """A StreamClient against a real TLS receiver that drops it ``drops`` times, until it is
    welcomed once more; returns the receiver, with its times."""
    receiver = DroppingReceiver(drops)
    context = receiver_context(cert=pki.receiver_cert, key=pki.receiver_key)
    server = await asyncio.start_server(receiver.serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    endpoint = Endpoint("127.0.0.1", port, "localhost", sender_context(ca=pki.ca_cert), 5.0)
    client = make_client(asyncio.get_running_loop(), endpoint, backoff)
    client.spool.add(0, CapturedFrame(monotonic_us(), b"\xff\xd8frame"))  # sent every session
    stop = asyncio.Event()
    running = asyncio.create_task(client.run(stop))
    try:
        await receiver.wait_for_welcomes(drops + 1, limit_s=15)
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=10)
        server.close()
        await server.wait_closed()
    return receiver


def test_a_receiver_dropped_three_times_in_a_row_is_rejoined_within_a_second_each_time(
    pki: CertPaths,
) -> None:
    """The bench's reconnect phase, on real TLS: without resetting the escalation after a
    welcomed session, the third drop would be retried after 1 to 2 s."""
    drops = 3

    receiver = asyncio.run(stream_through_drops(pki, drops, Backoff()))  # as the daemon
    gaps = [
        welcomed - dropped
        for dropped, welcomed in zip(receiver.dropped, receiver.welcomed[1:], strict=True)
    ]
    assert len(gaps) == drops
    # Backoff's first retry is 0.25-0.5 s; the rest is a TLS handshake and a hello on a
    # busy machine. Escalating (0.5-1 s, then 1-2 s) would exceed the bound by the third.
    assert max(gaps) < 1.0, gaps
