"""The fault proxy on its own, in front of a plain echo server and a byte sink on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from .conftest import wait_until
from .faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the proxy may reset or cut the connection
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _Sink(socketserver.BaseRequestHandler):
    """Reads as fast as it can and counts, so only the proxy limits the rate."""

    def handle(self) -> None:
        server = self.server
        assert isinstance(server, SinkServer)
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                with server.lock:
                    server.received += len(data)


class SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Sink)
        self.lock = threading.Lock()
        self.received = 0


def _serve(server: socketserver.TCPServer) -> Iterator[tuple[str, int]]:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield ("127.0.0.1", server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    yield from _serve(server)


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    server = SinkServer()
    for _ in _serve(server):
        yield server


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(echo) as p:
        yield p


def _connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    started = time.monotonic()
    sock.sendall(payload)
    assert _recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - started


def _fill(sock: socket.socket, limit: int = 16 * 1024 * 1024) -> int:
    """Send without blocking until the socket's buffer is full; how many bytes went."""
    sock.setblocking(False)
    block, sent = b"x" * 65536, 0
    try:
        while sent < limit:
            sent += sock.send(block)
    except BlockingIOError:
        pass
    return sent


def _fill_until_stuck(sock: socket.socket, within_s: float = 6.0) -> int:
    """Fill until two fills 0.3 s apart find no room: the bytes the path absorbed."""
    total, zeros, deadline = 0, 0, time.monotonic() + within_s
    while zeros < 2:
        assert time.monotonic() < deadline, f"still absorbing after {total} bytes"
        sent = _fill(sock)
        total += sent
        zeros = zeros + 1 if sent == 0 else 0
        time.sleep(0.3)
    return total


def test_forwards_both_ways_and_counts(proxy: FaultProxy) -> None:
    payload = os.urandom(200_000)
    with _connect(proxy) as sock:
        sock.sendall(payload)
        assert _recv_exactly(sock, len(payload)) == payload
        stats = proxy.stats
        assert (stats.connections, stats.active) == (1, 1)
        assert stats.bytes_up == stats.bytes_down == len(payload)
        # A half close reaches the echo server, whose close comes back as an EOF.
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
    wait_until(lambda: proxy.stats.active == 0, 5)


def test_delay_holds_each_direction_and_pipelines(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _round_trip(sock) < 0.25
        proxy.delay(0.3, "up")
        assert 0.3 <= _round_trip(sock) < 3
        proxy.delay(0.3)
        assert 0.6 <= _round_trip(sock) < 3
        # Latency, not a rate cap: ten messages sent 50 ms apart do not queue behind each other.
        started = time.monotonic()
        for i in range(10):
            sock.sendall(b"%d;" % i)
            time.sleep(0.05)
        expected = b"".join(b"%d;" % i for i in range(10))
        assert _recv_exactly(sock, len(expected)) == expected
        assert time.monotonic() - started < 0.5 + 0.6 + 1.5
        proxy.heal()
        assert _round_trip(sock) < 0.25


def test_heal_wakes_data_held_by_a_long_delay(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.delay(60)
        sock.sendall(b"held")
        time.sleep(0.3)
        proxy.heal()
        sock.settimeout(3)
        assert _recv_exactly(sock, 4) == b"held"


def test_throttle_limits_the_rate(sink: SinkServer) -> None:
    rate = 50_000
    with FaultProxy(("127.0.0.1", sink.server_address[1])) as proxy, _connect(proxy) as sock:
        proxy.throttle(rate, "up")
        sender = threading.Thread(target=lambda: _send_quietly(sock, b"x" * 2_000_000))
        sender.start()
        time.sleep(0.5)  # past the first slice
        with sink.lock:
            start_bytes, started = sink.received, time.monotonic()
        time.sleep(2)
        with sink.lock:
            got, elapsed = sink.received - start_bytes, time.monotonic() - started
        measured = got / elapsed
        assert 0.5 * rate < measured < 1.5 * rate, f"{measured:.0f} B/s through a {rate} B/s cap"
        proxy.heal()
        sender.join(10)
        assert not sender.is_alive()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the test closed the socket first
        sock.sendall(data)


def test_a_throttled_proxy_fills_the_senders_socket_buffer(sink: SinkServer) -> None:
    with FaultProxy(("127.0.0.1", sink.server_address[1])) as proxy, _connect(proxy) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        proxy.throttle(10_000)
        first = _fill(sock)
        # Kernel buffers on both hops plus the proxy's reader: well under a megabyte.
        assert 0 < first < 1_000_000, first
        time.sleep(2)
        later = _fill(sock)
        # 20 kB drained, but loopback TCP reopens its window a 64 kB segment at a time.
        assert 0 < later < 20_000 + 200_000, f"{later} bytes fit after 2 s at 10 kB/s"


def test_truncate_after_cuts_the_stream_then_closes(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.truncate_after(1000, "down")
        sock.sendall(b"y" * 5000)
        data = _recv_exactly(sock, 5000)
        assert data == b"y" * 1000
    with _connect(proxy) as sock:  # a later connection counts from its start
        sock.sendall(b"z" * 1500)
        assert _recv_exactly(sock, 1500) == b"z" * 1000
    proxy.heal()
    with _connect(proxy) as sock:
        sock.sendall(b"w" * 1500)
        assert _recv_exactly(sock, 1500) == b"w" * 1500


def test_truncate_upstream_closes_both_sides(sink: SinkServer) -> None:
    with FaultProxy(("127.0.0.1", sink.server_address[1])) as proxy, _connect(proxy) as sock:
        proxy.truncate_after(100, "up")
        sock.sendall(b"u" * 400)
        assert sock.recv(10) == b""
        wait_until(lambda: proxy.stats.active == 0, 5)
    # The sink's own thread counts what it reads: on a busy machine, after the proxy is done.
    wait_until(lambda: sink.received >= 100, 5)
    assert proxy.stats.bytes_up == sink.received == 100


def test_reset_sends_an_rst(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        _round_trip(sock)
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    assert proxy.stats.resets == 1
    wait_until(lambda: proxy.stats.active == 0, 5)
    with _connect(proxy) as sock:  # new connections are not affected
        _round_trip(sock)


def test_blackhole_stalls_without_closing_then_delivers(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        _round_trip(sock)
        proxy.blackhole(True)
        sock.sendall(b"into the void")
        sock.settimeout(1)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # neither data nor EOF: the path stalls
        stalled = _fill_until_stuck(sock)
        # Kernel buffers on both hops plus the proxy's reader, and nothing keeps absorbing.
        assert 0 < stalled < 1_000_000, stalled
        proxy.blackhole(False)
        sock.setblocking(True)
        sock.settimeout(5)
        expected = len(b"into the void") + stalled
        assert len(_recv_exactly(sock, expected)) == expected


def test_blackhole_one_direction(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.blackhole(True, "down")
        sock.sendall(b"one way")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        wait_until(lambda: proxy.stats.bytes_up == 7, 5)  # the echo server got it
        assert proxy.stats.bytes_down == 0
        proxy.heal()
        sock.settimeout(5)
        assert _recv_exactly(sock, 7) == b"one way"


def test_refuse_accepts_then_closes(proxy: FaultProxy) -> None:
    proxy.refuse(True)
    with _connect(proxy) as sock:
        assert sock.recv(10) == b""
    proxy.refuse(False)
    with _connect(proxy) as sock:
        _round_trip(sock)
    stats = proxy.stats
    assert (stats.connections, stats.refused) == (2, 1)


def test_a_target_that_is_down_resets_the_client() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        # The proxy accepts, finds the target down and resets: the reset may reach the
        # client before its connect() returns (seen in CI) or at its first read.
        with (
            FaultProxy(("127.0.0.1", port)) as proxy,
            pytest.raises(ConnectionResetError),
            _connect(proxy) as sock,
        ):
            sock.recv(10)


def test_close_ends_open_connections_and_the_thread(echo: tuple[str, int]) -> None:
    threads = threading.active_count()
    proxy = FaultProxy(echo).start()
    sock = _connect(proxy)
    _round_trip(sock)
    proxy.close()
    proxy.close()  # idempotent
    with pytest.raises(ConnectionResetError):
        sock.recv(10)
    sock.close()
    # close() joins the proxy's own thread before it returns ...
    assert "faultproxy" not in {t.name for t in threading.enumerate()}
    # ... while the echo server's handler for the cut connection ends on its own time.
    wait_until(lambda: threading.active_count() == threads, timeout=5)


def test_bad_arguments(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="direction"):
        proxy.delay(1, "sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bytes_per_s"):
        proxy.throttle(0)
