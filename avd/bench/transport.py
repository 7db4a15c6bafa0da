"""The bare TLS transport at 20 fps: a frame-sized message from one process to another.

The other floor of the latency, beside the codec's (``avd.bench.codec``): avd's TLS settings
and certificates, the daemons' event loop, TCP_NODELAY, and nothing else on the way (no
capture thread, no protocol, no session, no recording). What the measured latency has beyond
the codec at 20 fps and this is avd's own. A child process (``receiver_main``) accepts one
connection and notes when each whole message is in; the bench's process sends one every
50 ms, stamped just before its write. CLOCK_MONOTONIC is system-wide, so the two stamps
compare directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from avd import eventloop
from avd.bench.daemons import Workspace, child_env
from avd.bench.plan import VGA
from avd.clock import monotonic_us
from avd.link import tune_socket
from avd.stats import percentile
from avd.tls import receiver_context, sender_context

STAMP = struct.Struct("!q")
WARM_UP = 5  # the first messages also warm the connection's buffers: not counted
READY = r"transport receiver port=(\d+)"


@dataclass(frozen=True)
class Transport:
    p50_ms: float
    p99_ms: float
    messages: int
    size: int  # bytes a message


def receiver_main(argv: Sequence[str]) -> int:
    """``cert key count size``: take ``count`` messages of ``size`` bytes over one TLS
    connection, then print their latencies (µs) as one JSON line."""
    cert, key, count, size = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    latencies = eventloop.run(_receive(cert, key, count, size))
    print(json.dumps(latencies), flush=True)
    return 0


async def _receive(cert: Path, key: Path, count: int, size: int) -> list[int]:
    latencies: list[int] = []
    done = asyncio.Event()

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(count):
                message = await reader.readexactly(size)
                latencies.append(monotonic_us() - STAMP.unpack_from(message)[0])
        finally:
            writer.close()
            done.set()

    context = receiver_context(cert=cert, key=key)
    server = await asyncio.start_server(take, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    print(f"transport receiver port={port}", flush=True)
    async with server:
        await asyncio.wait_for(done.wait(), timeout=60 + count / VGA.fps)
    return latencies


async def _send(ws: Workspace, port: int, count: int, size: int) -> None:
    context = sender_context(ca=ws.pki.ca_cert)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    tune_socket(writer)  # as the sender's links do: TCP_NODELAY
    body = os.urandom(size - STAMP.size)  # JPEG-like: incompressible
    loop = asyncio.get_running_loop()
    start, period = loop.time(), 1 / VGA.fps
    for n in range(count):
        await asyncio.sleep(max(start + (n + 1) * period - loop.time(), 0))
        writer.writelines((STAMP.pack(monotonic_us()), body))
        await writer.drain()
    await reader.read()  # the receiver closes once it has them all
    writer.close()


def measure_transport(ws: Workspace, count: int, size: int) -> Transport:
    """``count`` messages of ``size`` bytes at 20 fps, after WARM_UP more; p50 and p99."""
    code = (
        "import sys; from avd.bench.transport import receiver_main; "
        "sys.exit(receiver_main(sys.argv[1:]))"
    )
    total = count + WARM_UP
    argv = [sys.executable, "-c", code, str(ws.pki.receiver_cert), str(ws.pki.receiver_key)]
    child = ws.spawn("transport receiver", [*argv, str(total), str(size)], child_env())
    _, match = child.wait_for(READY)
    eventloop.run(_send(ws, int(match.group(1)), total, size))
    if child.wait() != 0:
        tail = "\n".join(line for _, line in child.lines[-15:])
        raise RuntimeError(f"the transport receiver failed:\n{tail}")
    latencies = [us / 1000 for us in json.loads(child.lines[-1][1])[WARM_UP:]]
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return Transport(p50, p99, len(latencies), size)
