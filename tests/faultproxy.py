"""A TCP proxy for tests that makes the network between two real peers misbehave on demand.

``with FaultProxy((host, port)) as proxy:`` listens on 127.0.0.1, port ``proxy.port``, and
forwards every connection to the target. Its asyncio loop runs in a thread of its own, so a
synchronous test can switch faults while traffic flows; each switch takes effect before the
call returns. "up" is client -> target, "down" is target -> client.

- ``delay(s)``: each chunk is held ``s`` seconds after it was read (latency, not a rate cap,
  up to ``buffer_bytes`` in flight per direction);
- ``throttle(bytes_per_s)``: reads at most that fast; what is not read stays in the kernel,
  so the sender's socket buffer fills and its writes block (back-pressure is not hidden);
- ``truncate_after(n)``: forward n more bytes (counted from the call, or from the connection's
  start for later ones), then close both sides;
- ``blackhole(True)``: stop reading and forwarding, keep connections open: a stalled path.
  Bytes held meanwhile are delivered after it ends, as TCP would after retransmitting.
  New connections still open (the kernel accepts them), then stall;
- ``reset()``: RST every current connection (SO_LINGER 0);
- ``refuse(True)``: accept, then close at once;
- ``heal()``: clear every fault.

Throttling is per connection. Buffers are bounded: ``buffer_bytes`` per direction in the proxy
plus ``socket_buffer`` in each kernel socket (small, so a stall shows up quickly).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

Direction = Literal["up", "down", "both"]
READ_SIZE = 16 * 1024
T = TypeVar("T")


def _directions(direction: Direction) -> tuple[str, ...]:
    if direction == "both":
        return ("up", "down")
    if direction in ("up", "down"):
        return (direction,)
    raise ValueError(f"direction must be 'up', 'down' or 'both', got {direction!r}")


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN: SO_LINGER on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class Faults:
    """The faults of one direction; mutated in place on the proxy's loop."""

    delay_s: float = 0.0
    rate: float | None = None  # bytes per second, None = unlimited
    truncate_after: int | None = None
    blackhole: bool = False


@dataclass(frozen=True)
class ProxyStats:
    connections: int  # accepted, refused ones included
    active: int
    refused: int
    resets: int  # connections reset by reset() or by a peer's RST
    bytes_up: int
    bytes_down: int


class _Cut(Exception):
    """A truncation budget ran out: close the connection gracefully."""


class _Pipe:
    """One direction of one connection: a reader task and a writer task, a bounded queue."""

    def __init__(
        self,
        conn: _Conn,
        name: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy, self.name = conn.proxy, name
        self.reader, self.writer = reader, writer
        self.budget = self.faults.truncate_after
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(conn.proxy.queue_slots)
        self._next_read = 0.0

    @property
    def faults(self) -> Faults:
        return self.proxy.faults[self.name]

    async def read_loop(self) -> None:
        while True:
            await self.proxy.gate(self._read_wait)
            rate = self.faults.rate
            # A throttled pipe reads in 20 ms slices so the rate is smooth, not bursty.
            piece = READ_SIZE if rate is None else max(1, min(READ_SIZE, int(rate / 50)))
            data = await self.reader.read(piece)
            now = self.proxy.now()
            if rate is not None:
                self._next_read = max(self._next_read, now) + len(data) / rate
            await self.queue.put((now, data))
            if not data:
                return

    def _read_wait(self) -> float:
        if self.faults.blackhole:
            return math.inf
        return 0.0 if self.faults.rate is None else self._next_read - self.proxy.now()

    async def write_loop(self) -> None:
        while True:
            arrived, data = await self.queue.get()

            def wait(arrived: float = arrived) -> float:
                if self.faults.blackhole:
                    return math.inf
                return arrived + self.faults.delay_s - self.proxy.now()

            await self.proxy.gate(wait)
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()  # a half close travels on as a half close
                return
            await self._deliver(data)

    async def _deliver(self, data: bytes) -> None:
        if self.budget is not None:
            data = data[: self.budget]
            self.budget -= len(data)
        self.writer.write(data)
        self.proxy.count(self.name, len(data))
        await self.writer.drain()
        if self.budget == 0:
            raise _Cut


class _Conn:
    """One proxied connection: the client's side, the target's side, a pipe each way."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.writers = (client[1], upstream[1])
        self.pipes = {
            "up": _Pipe(self, "up", client[0], upstream[1]),
            "down": _Pipe(self, "down", upstream[0], client[1]),
        }
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        """Forward until both directions end, a pipe fails, or ``reset`` cancels the pipes."""
        self.tasks = tasks = [
            asyncio.create_task(coro)
            for pipe in self.pipes.values()
            for coro in (pipe.read_loop(), pipe.write_loop())
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        errors = [t.exception() for t in done if not t.cancelled() and t.exception()]
        if any(not isinstance(e, _Cut) for e in errors):
            self.reset()  # a reset on one side travels on as a reset
        else:
            for writer in self.writers:
                writer.close()

    def reset(self) -> None:
        if not any(w.transport.is_closing() for w in self.writers):
            self.proxy.resets += 1
        for writer in self.writers:
            _rst(writer)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class FaultProxy:
    """A fault-injecting TCP proxy in front of ``target``; see the module docstring."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        buffer_bytes: int = 1024 * 1024,
        socket_buffer: int | None = 64 * 1024,
    ) -> None:
        self.target, self.host = target, host
        self.queue_slots = max(1, buffer_bytes // READ_SIZE)
        self.socket_buffer = socket_buffer
        self.faults = {"up": Faults(), "down": Faults()}
        self.port = 0
        self.connections = self.refused = self.resets = 0
        self._bytes = {"up": 0, "down": 0}
        self._refusing = False
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="faultproxy", daemon=True
        )

    # ---- lifecycle, from the test's thread -----------------------------------------------

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        self.close()

    def start(self) -> FaultProxy:
        self._thread.start()
        self.port = self._run(self._listen())
        return self

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    # ---- faults, from the test's thread --------------------------------------------------

    def delay(self, seconds: float, direction: Direction = "both") -> None:
        self._set(direction, delay_s=seconds)

    def throttle(self, bytes_per_s: float | None, direction: Direction = "both") -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"throttle: bytes_per_s must be positive, got {bytes_per_s}")
        self._set(direction, rate=bytes_per_s)

    def truncate_after(self, n_bytes: int | None, direction: Direction = "both") -> None:
        names = _directions(direction)

        def apply() -> None:
            for conn in self._conns:
                for name in names:
                    conn.pipes[name].budget = n_bytes

        self._set(direction, truncate_after=n_bytes, also=apply)

    def blackhole(self, on: bool = True, direction: Direction = "both") -> None:
        self._set(direction, blackhole=on)

    def reset(self) -> None:
        def apply() -> None:
            for conn in list(self._conns):
                conn.reset()

        self._call(apply)

    def refuse(self, on: bool = True) -> None:
        self._call(lambda: setattr(self, "_refusing", on))

    def heal(self) -> None:
        def apply() -> None:
            self._refusing = False
            self.faults = {"up": Faults(), "down": Faults()}
            for conn in self._conns:
                for pipe in conn.pipes.values():
                    pipe.budget = None

        self._call(apply)

    @property
    def stats(self) -> ProxyStats:
        """The counters now (after ``close``, as they were at the end)."""
        if self._loop.is_closed():
            return self._snapshot()
        return self._call(self._snapshot)

    def _snapshot(self) -> ProxyStats:
        up, down = self._bytes["up"], self._bytes["down"]
        return ProxyStats(self.connections, len(self._conns), self.refused, self.resets, up, down)

    # ---- on the proxy's loop --------------------------------------------------------------

    def now(self) -> float:
        return self._loop.time()

    def count(self, direction: str, n: int) -> None:
        self._bytes[direction] += n

    async def gate(self, seconds_left: Callable[[], float]) -> None:
        """Wait until ``seconds_left()`` is 0 or less, re-asking whenever a fault changes."""
        while (left := seconds_left()) > 0:
            assert self._changed is not None
            with contextlib.suppress(TimeoutError):
                timeout = None if math.isinf(left) else left
                await asyncio.wait_for(self._changed.wait(), timeout)

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    async def _listen(self) -> int:
        self._changed = asyncio.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._size_buffers(sock)  # accepted sockets inherit the listener's buffer sizes
        sock.bind((self.host, 0))
        self._server = await asyncio.start_server(self._on_client, sock=sock, limit=READ_SIZE)
        return int(sock.getsockname()[1])

    def _size_buffers(self, sock: socket.socket) -> None:
        if self.socket_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_buffer)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._refusing:
            self.refused += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            upstream = await self._connect_upstream()
        except OSError:
            _rst(writer)  # the target is down: the client sees its connection reset
            self._handlers.discard(task)
            return
        conn = _Conn(self, (reader, writer), upstream)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            self._handlers.discard(task)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._size_buffers(sock)
            sock.setblocking(False)
            await self._loop.sock_connect(sock, self.target)
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=READ_SIZE)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.reset()
        # Not cancelled: asyncio's stream callback in 3.11 calls exception() on the handler
        # task and would log a cancelled one as an error. Reset pipes end them promptly.
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    # ---- plumbing -------------------------------------------------------------------------

    def _set(
        self, direction: Direction, also: Callable[[], None] | None = None, **values: Any
    ) -> None:
        names = _directions(direction)

        def apply() -> None:
            for name in names:
                for key, value in values.items():
                    setattr(self.faults[name], key, value)
            if also is not None:
                also()

        self._call(apply)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the proxy's loop, wake every waiting pipe, and return its result."""

        async def apply() -> T:
            result = fn()
            self._notify()
            return result

        return self._run(apply())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)
