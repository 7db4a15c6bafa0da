"""Listening sockets, the accept loop, and TLS started only once a peer has sent something.

The receiver accepts plain TCP itself rather than through ``asyncio.start_server``: a
connection then stays a bare socket, costing a file descriptor and nothing else, until the
peer's first bytes are in the kernel's buffer; only then does ``loop.connect_accepted_socket``
give it a TLS transport (hundreds of KiB of buffers). An idle flood is cheap to hold until
the handshake timeout drops it, and nothing is read before TLS takes the socket over. That
last point is why the accepted sockets never get a plain transport first: uvloop starts
reading a new transport as soon as it exists, so a ``start_tls`` after it would find the
peer's ClientHello already consumed. The same code runs on uvloop and on asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("avd.receiver")

# After an accept error (typically out of descriptors): a pause, as asyncio's own servers
# make, so that the loop does not spin on a listening socket that stays readable.
RESOURCE_PAUSE_S = 1.0
# While the errors last, one line this often rather than one a pause (86,400 a day).
RESOURCE_LOG_EVERY_S = 60.0
BACKLOG = 512  # the receiver is built for hundreds of senders reconnecting at once

Accepted = Callable[[socket.socket, object], None]


async def open_listeners(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host``/``port``, as asyncio would make.

    One socket per address ``host`` resolves to ("0.0.0.0", "::", a name; "" is every
    IPv4 and every IPv6 address); IPv6 sockets are IPv6-only, so "0.0.0.0" and "::" can
    both be bound to one port. With port 0, the first socket's port is used for the others,
    so that one port number reaches all of them.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            port = port or sock.getsockname()[1]
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


class Acceptor:
    """Accepts every waiting connection on a listening socket when it is readable."""

    def __init__(self, listener: socket.socket, accepted: Accepted) -> None:
        self._listener = listener
        self._accepted = accepted
        self._loop = asyncio.get_running_loop()
        self._resume: asyncio.TimerHandle | None = None
        # While accepting fails: since when, when it was last logged, and the pauses made.
        self._outage: tuple[float, float, int] | None = None
        self._loop.add_reader(listener.fileno(), self._accept_waiting)

    def _accept_waiting(self) -> None:
        # The whole backlog at once: a burst of reconnecting senders costs one wake-up.
        for _ in range(BACKLOG):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                break
            except OSError as exc:
                # Out of descriptors or memory for now (EMFILE, ENFILE, ENOBUFS, ENOMEM) or
                # something stranger: either way, pausing beats spinning on the error.
                self._pause(exc)
                return
            self._over()
            sock.setblocking(False)
            self._accepted(sock, address)
        self._over()

    def _pause(self, exc: OSError) -> None:
        now, where = time.monotonic(), _address_text(self._listener.getsockname())
        if self._outage is None:
            self._outage = (now, now, 0)
            log.error(
                "cannot accept connections on %s: %s; trying again every %.0f s (said again "
                "once a minute while it lasts)",
                *(where, exc.strerror or exc, RESOURCE_PAUSE_S),
            )
        since, logged, pauses = self._outage
        if now - logged >= RESOURCE_LOG_EVERY_S:
            logged = now
            log.error(
                "still cannot accept connections on %s: %s (for %.0f s, %d tries)",
                *(where, exc.strerror or exc, now - since, pauses + 1),
            )
        self._outage = (since, logged, pauses + 1)
        self._loop.remove_reader(self._listener.fileno())
        self._resume = self._loop.call_later(RESOURCE_PAUSE_S, self._listen_again)

    def _over(self) -> None:
        if self._outage is not None:
            since = self._outage[0]
            self._outage = None
            log.info(
                "accepting connections on %s again after %.1f s",
                _address_text(self._listener.getsockname()),
                time.monotonic() - since,
            )

    def _listen_again(self) -> None:
        self._resume = None
        self._loop.add_reader(self._listener.fileno(), self._accept_waiting)

    def close(self) -> None:
        """Stop accepting and close the listening socket; accepted connections live on."""
        if self._resume is not None:
            self._resume.cancel()
        with contextlib.suppress(OSError, ValueError):
            self._loop.remove_reader(self._listener.fileno())
        self._listener.close()


def _address_text(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]} port {address[1]}"
    return str(address)


async def until_readable(sock: socket.socket) -> None:
    """Waits, reading nothing, until the peer's first bytes (or its FIN) have arrived."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())


class Consumer(Protocol):
    """Where a ``PushProtocol`` delivers a connection's bytes, as they arrive."""

    def data_received(self, data: bytes) -> None: ...

    def connection_ended(self, exc: Exception | None) -> None: ...


class PushProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol whose incoming bytes go to a ``Consumer`` instead of the reader.

    The writer side (``StreamWriter``: write, drain, close, wait_closed) is asyncio's own.
    Reading through a ``StreamReader`` copies every read into its buffer and out again and
    wakes the reading task each time: at a 20 fps stream of 25 KB frames that is 55-65 µs
    of CPU a frame here, against a protocol that handles the bytes where they land.
    Bytes that arrive before a consumer is attached are held and handed over with it.
    """

    def __init__(self, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(reader, loop=loop)
        self._consumer: Consumer | None = None
        self._early: list[bytes] = []
        self._ended = False
        self._end_error: Exception | None = None

    def attach(self, consumer: Consumer) -> None:
        """Deliver everything from now on (and what came before) to ``consumer``."""
        self._consumer = consumer
        early, self._early = self._early, []
        for data in early:
            consumer.data_received(data)
        if self._ended:
            error, self._end_error, self._consumer = self._end_error, None, None
            consumer.connection_ended(error)

    def data_received(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer.data_received(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool:
        self._end(None)
        super().eof_received()
        return False  # close our side too: the session has nothing to say after the peer's end

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._consumer is not None:
            # Let go of it: the consumer's session holds the writer, and so this protocol.
            consumer, self._consumer = self._consumer, None
            consumer.connection_ended(exc)
        else:
            self._end_error = exc


async def start_tls(
    sock: socket.socket, context: ssl.SSLContext, *, handshake_timeout_s: float
) -> tuple[asyncio.StreamWriter, PushProtocol]:
    """The server side of a TLS handshake on an accepted socket: a writer, and the protocol
    whose incoming bytes go to the consumer attached to it (they are held until then).

    The socket belongs to the transport once this returns; if it raises, the caller still
    owns it and closes it (harmless if the transport already did).
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)  # asyncio's writer wants one; it stays empty
    protocol = PushProtocol(reader, loop)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=context, ssl_handshake_timeout=handshake_timeout_s
    )
    return asyncio.StreamWriter(transport, protocol, reader, loop), protocol
