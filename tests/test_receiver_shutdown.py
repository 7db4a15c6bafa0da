"""The receiver's shutdown ends connections that are not yet sessions at once.

A connection still before its hello (a port scan's idle socket, a TLS client that never
says hello) has no session to say goodbye to; shutdown used to wait for it until its
deadline. Here the deadline is 60 s and so is the handshake timeout: a shutdown that waited
for either would take a minute, one that ends them at once takes well under a second.
"""

from __future__ import annotations

import asyncio
import socket
import time

from avd.certs import CertPaths
from avd.media.base import ReceivedFrame, StreamInfo
from avd.metrics import ReceiverMetrics
from avd.receiver import Receiver
from avd.tls import sender_context

from .conftest import Credentials, receiver_settings

DEADLINE_S = 60.0


class _NoSink:
    """Nothing to record: no session here gets as far as a frame (a unit-test stand-in)."""

    def stream_started(self, info: StreamInfo) -> None:
        raise AssertionError("no stream may start")

    def frame(self, info: StreamInfo, frame: ReceivedFrame) -> None:
        raise AssertionError("no frame may arrive")

    def stream_ended(self, info: StreamInfo) -> None:
        raise AssertionError("no stream may end")

    def close(self) -> None:
        pass


def test_shutdown_ends_connections_before_their_hello_at_once(
    pki: CertPaths, creds: Credentials
) -> None:
    async def scenario() -> tuple[float, bytes]:
        receiver = Receiver(
            receiver_settings(pki, creds.tokens_file, handshake_timeout_s=DEADLINE_S),
            _NoSink(),
            ReceiverMetrics(),
        )
        listening = await receiver.start()
        loop = asyncio.get_running_loop()
        idle = socket.create_connection(("127.0.0.1", listening.video_port))
        idle.setblocking(False)
        context = sender_context(ca=pki.ca_cert)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listening.audio_port, ssl=context, server_hostname="localhost"
        )  # TLS is up; no hello follows
        async with asyncio.timeout(10):
            while len(receiver._establishing) < 2:  # noqa: ASYNC110 - the receiver's own state
                await asyncio.sleep(0.02)
        started = time.monotonic()
        await receiver.shutdown(deadline_s=DEADLINE_S)
        took = time.monotonic() - started
        seen = await asyncio.wait_for(reader.read(), 10)  # the TLS client sees its end
        writer.close()
        try:
            closed = await asyncio.wait_for(loop.sock_recv(idle, 1), 10)
        except ConnectionResetError:
            closed = b""
        idle.close()
        assert closed == b"", "the idle socket was not closed"
        return took, seen

    took, seen = asyncio.run(scenario())
    assert took < DEADLINE_S / 2, f"shutdown waited {took:.1f} s for connections with no session"
    assert seen == b""  # nothing was said to a peer that never said hello
