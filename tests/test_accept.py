"""avd.accept on both event loops: real sockets on loopback, real TLS with avd's certificates.

The race these tests are for: uvloop starts reading a transport as soon as it exists, so a
receiver that made a plain transport and then called ``start_tls`` lost the ClientHello of
a sender that spoke at once, and the handshake hung until its timeout. Every handshake here
is from a client that sends its ClientHello the moment it connects, many times over.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from avd import accept, eventloop
from avd.certs import CertPaths
from avd.eventloop import EventLoopName
from avd.tls import receiver_context, sender_context

LOOPS: list[EventLoopName] = ["asyncio", "uvloop"]


def on(loop: EventLoopName, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    eventloop.run(main(), loop)


def _client_context(pki: CertPaths) -> ssl.SSLContext:
    return sender_context(ca=pki.ca_cert)


def _tls_client(port: int, context: ssl.SSLContext, payload: bytes) -> bytes:
    """A blocking TLS client (run in a thread): the ClientHello leaves as soon as it connects."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(payload)
        return tls.recv(len(payload))


class _Collector:
    """A consumer that notes what a PushProtocol hands it, in order."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ended: list[Exception | None] = []
        self.done = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        assert not self.ended, "bytes after the end"
        self.chunks.append(data)

    def connection_ended(self, exc: Exception | None) -> None:
        self.ended.append(exc)
        self.done.set()


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_starts_on_an_accepted_socket_without_losing_the_client_hello(
    loop: EventLoopName, pki: CertPaths
) -> None:
    server_context = receiver_context(cert=pki.receiver_cert, key=pki.receiver_key)
    client_context = _client_context(pki)

    async def echo_once(sock: socket.socket) -> None:
        await accept.until_readable(sock)
        writer, incoming = await accept.start_tls(sock, server_context, handshake_timeout_s=5)
        received = _Collector()
        incoming.attach(received)
        while len(b"".join(received.chunks)) < 5:  # noqa: ASYNC110 - a test's plain poll
            await asyncio.sleep(0.005)
        writer.write(b"".join(received.chunks))
        await writer.drain()
        writer.close()

    async def main() -> None:
        (listener,) = await accept.open_listeners("127.0.0.1", 0)
        port = listener.getsockname()[1]
        handlers: list[asyncio.Task[None]] = []
        acceptor = accept.Acceptor(
            listener, lambda sock, _: handlers.append(asyncio.create_task(echo_once(sock)))
        )
        for n in range(40):
            payload = f"hi{n:03d}".encode()
            echoed = await asyncio.wait_for(
                asyncio.to_thread(_tls_client, port, client_context, payload), 10
            )
            assert echoed == payload
        await asyncio.gather(*handlers)
        acceptor.close()

    on(loop, main)


def _tls_send_and_close(port: int, context: ssl.SSLContext, payload: bytes) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(payload)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("attach_after", ["bytes", "end"])
def test_a_push_protocol_hands_every_byte_then_the_end_to_its_consumer(
    loop: EventLoopName, pki: CertPaths, attach_after: str
) -> None:
    """Bytes that came before the consumer was attached (here all of them, and the end
    too when it is attached late) come first, in order; nothing after the end; the end
    once. The protocol lets go of its consumer at the end."""
    server_context = receiver_context(cert=pki.receiver_cert, key=pki.receiver_key)
    payload = bytes(range(256)) * 400  # 100 KiB: several TLS records and reads

    async def main() -> None:
        (listener,) = await accept.open_listeners("127.0.0.1", 0)
        port = listener.getsockname()[1]
        accepted: asyncio.Queue[socket.socket] = asyncio.Queue()
        acceptor = accept.Acceptor(listener, lambda sock, _: accepted.put_nowait(sock))
        client = asyncio.create_task(
            asyncio.to_thread(_tls_send_and_close, port, _client_context(pki), payload)
        )
        sock = await accepted.get()
        await accept.until_readable(sock)
        writer, push = await accept.start_tls(sock, server_context, handshake_timeout_s=5)
        await client
        collector = _Collector()
        if attach_after == "end":
            await asyncio.sleep(0.3)  # the client has closed: the end is in too
        push.attach(collector)
        await asyncio.wait_for(collector.done.wait(), 10)
        assert b"".join(collector.chunks) == payload
        assert collector.ended == [None]
        assert push._consumer is None  # no cycle through the session
        writer.close()
        acceptor.close()

    on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_until_readable_waits_for_the_first_bytes_and_reads_none(loop: EventLoopName) -> None:
    async def main() -> None:
        (listener,) = await accept.open_listeners("127.0.0.1", 0)
        accepted: asyncio.Queue[socket.socket] = asyncio.Queue()
        acceptor = accept.Acceptor(listener, lambda sock, _: accepted.put_nowait(sock))
        with socket.create_connection(listener.getsockname()) as client:
            server_side = await asyncio.wait_for(accepted.get(), 5)
            waiting = asyncio.create_task(accept.until_readable(server_side))
            await asyncio.sleep(0.2)
            assert not waiting.done(), "readable before the peer sent anything"
            client.sendall(b"hello")
            await asyncio.wait_for(waiting, 5)
            assert server_side.recv(5, socket.MSG_PEEK) == b"hello", "bytes were consumed"
            server_side.close()
        acceptor.close()

    on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_burst_of_connections_is_accepted_and_close_stops_accepting(
    loop: EventLoopName,
) -> None:
    async def main() -> None:
        (listener,) = await accept.open_listeners("127.0.0.1", 0)
        address = listener.getsockname()
        accepted: list[tuple[socket.socket, object]] = []
        acceptor = accept.Acceptor(listener, lambda sock, peer: accepted.append((sock, peer)))
        clients = [socket.create_connection(address) for _ in range(100)]
        for _ in range(100):
            if len(accepted) == 100:
                break
            await asyncio.sleep(0.02)
        assert len(accepted) == 100
        ports = {peer[1] for _, peer in accepted if isinstance(peer, tuple)}
        assert ports == {c.getsockname()[1] for c in clients}
        assert all(not sock.getblocking() for sock, _ in accepted)
        acceptor.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()
        for sock, _ in accepted:
            sock.close()
        for client in clients:
            client.close()

    on(loop, main)


def test_listeners_on_ipv6_are_ipv6_only() -> None:
    async def main() -> None:
        (listener,) = await accept.open_listeners("::1", 0)
        with listener:
            assert listener.family == socket.AF_INET6
            assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1

    on("asyncio", main)


def test_every_address_listens_on_the_one_port_the_kernel_picked() -> None:
    """A name with an IPv4 and an IPv6 address (as "" has: every address of both families;
    here two loopback ones, so that nothing listens beyond this machine)."""

    async def both_loopbacks(host: str | None, port: int, **_: object) -> list[Any]:
        assert host == "both-loopbacks"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
        ]

    async def main() -> None:
        asyncio.get_running_loop().getaddrinfo = both_loopbacks  # type: ignore[method-assign,assignment]
        listeners = await accept.open_listeners("both-loopbacks", 0)
        try:
            assert [sock.family for sock in listeners] == [socket.AF_INET, socket.AF_INET6]
            (port,) = {sock.getsockname()[1] for sock in listeners}
            for host in ("127.0.0.1", "::1"):
                socket.create_connection((host, port), timeout=5).close()
        finally:
            for sock in listeners:
                sock.close()

    on("asyncio", main)


def test_a_port_in_use_is_an_error_and_leaves_nothing_open() -> None:
    async def main() -> None:
        (taken,) = await accept.open_listeners("127.0.0.1", 0)
        with taken, pytest.raises(OSError) as caught:
            await accept.open_listeners("127.0.0.1", taken.getsockname()[1])
        assert caught.value.errno == errno.EADDRINUSE

    on("asyncio", main)


class _RunsOutOfDescriptors:
    """A listening socket whose next ``accept`` fails as when the process hits its fd limit."""

    def __init__(self, real: socket.socket, failures: int = 1) -> None:
        self.real, self.failures = real, failures
        self.calls: list[tuple[float, bool]] = []  # (when, failed)

    def fileno(self) -> int:
        return self.real.fileno()

    def getsockname(self) -> object:
        return self.real.getsockname()

    def accept(self) -> tuple[socket.socket, object]:
        self.calls.append((time.monotonic(), self.failures > 0))
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def close(self) -> None:
        self.real.close()


def _accept_one_after(loop: EventLoopName, failures: int) -> list[tuple[float, bool]]:
    """One connection to a listener whose first ``failures`` accepts fail with EMFILE; the
    listener's accept calls, (when, failed)."""
    calls: list[tuple[float, bool]] = []

    async def main() -> None:
        (real,) = await accept.open_listeners("127.0.0.1", 0)
        listener = _RunsOutOfDescriptors(real, failures)
        accepted: asyncio.Queue[socket.socket] = asyncio.Queue()
        acceptor = accept.Acceptor(listener, lambda sock, _: accepted.put_nowait(sock))  # type: ignore[arg-type]
        with socket.create_connection(real.getsockname()):
            sock = await asyncio.wait_for(accepted.get(), 20)
            sock.close()
        acceptor.close()
        calls.extend(listener.calls)

    on(loop, main)
    return calls


@pytest.mark.parametrize("loop", LOOPS)
def test_an_accept_error_pauses_and_is_logged_then_accepting_resumes(
    loop: EventLoopName, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accept, "RESOURCE_PAUSE_S", 0.2)
    with caplog.at_level(logging.ERROR, logger="avd.receiver"):
        calls = _accept_one_after(loop, failures=1)
    # Not one retry during the pause (a lower bound: a slow machine cannot fail it).
    (failed_at, failed), (retried_at, _) = calls[:2]
    assert failed
    assert retried_at - failed_at >= 0.19
    (record,) = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert "Too many open files" in record.getMessage()
    assert "127.0.0.1 port" in record.getMessage()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_lasting_accept_error_is_logged_once_a_while_then_its_end(
    loop: EventLoopName, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Out of descriptors for hours was an error line every second. Now: the first error,
    # one line per RESOURCE_LOG_EVERY_S while it lasts, and one when accepting works again.
    monkeypatch.setattr(accept, "RESOURCE_PAUSE_S", 0.02)
    monkeypatch.setattr(accept, "RESOURCE_LOG_EVERY_S", 0.5)
    failures = 30
    with caplog.at_level(logging.INFO, logger="avd.receiver"):
        calls = _accept_one_after(loop, failures)
    assert [failed for _, failed in calls[: failures + 1]] == [True] * failures + [False]
    lasted = calls[failures - 1][0] - calls[0][0]  # at least 29 pauses of 0.02 s
    messages = [r.getMessage() for r in caplog.records]
    first = [m for m in messages if m.startswith("cannot accept")]
    again = [m for m in messages if m.startswith("still cannot accept")]
    over = [m for m in messages if m.startswith("accepting connections on 127.0.0.1 port")]
    assert len(first) == 1
    assert 1 <= len(again) <= lasted / 0.5 + 1  # not one a pause (29)
    assert all("Too many open files" in m and "tries)" in m for m in again)
    assert len(over) == 1
    assert "again after" in over[0]
