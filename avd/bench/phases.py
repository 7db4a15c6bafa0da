"""The measuring phases against one or two senders: latency, throughput, CPU, reconnection.

Latency and throughput go to the probe receiver (``avd.bench.probe``): the real
``avd-sender`` with a tone for latency, then an in-process ``StreamClient`` fed by an
encoder that runs exactly as fast as the stream takes frames. CPU and reconnection go to
the ``avd-receiver`` daemon, measured from /proc and through its metrics.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avd import procstat
from avd.bench.daemons import (
    Child,
    Receiving,
    Workspace,
    start_receiver,
    start_sender,
    wait_for_frames,
)
from avd.bench.plan import MIB, VGA, Plan
from avd.clock import monotonic_us
from avd.demo import histogram_quantile, latency_buckets, scrape
from avd.media.base import CapturedFrame, StreamKind, VideoFormat
from avd.media.video import camera_like_images, encode_jpeg
from avd.queues import DropOldestQueue
from avd.spool import Spool


class _ConsumerPaced(DropOldestQueue[tuple[int, CapturedFrame]]):
    """The sender's queue, with one credit back to the encoder per frame the client takes:
    the encoder runs exactly as fast as the link and the receiver allow, and drops nothing."""

    def __init__(self, capacity: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(capacity, loop)
        self.credits = threading.Semaphore(capacity)

    def get_nowait(self) -> tuple[int, CapturedFrame] | None:  # get() takes through it too
        item = super().get_nowait()
        if item is not None:
            self.credits.release()
        return item


def _encode_flat_out(
    queue: _ConsumerPaced, spool: Spool, images: list[Any], stop: threading.Event
) -> None:
    n = 0
    while not stop.is_set():
        if not queue.credits.acquire(timeout=0.1):
            continue
        capture_us = monotonic_us()  # as the test pattern stamps: drawn, not yet encoded
        frame = CapturedFrame(capture_us, encode_jpeg(images[n % len(images)], VGA.quality))
        spool.add(n, frame)  # as the sender's capture thread does, until acknowledged
        queue.put((n, frame))
        n += 1


def _default_spool() -> Spool:
    from avd.config import SenderSettings  # noqa: PLC0415

    fields = SenderSettings.model_fields
    return Spool(
        max_bytes=int(fields["spool_max_mb"].default) * MIB,
        max_age_us=int(float(fields["spool_seconds"].default) * 1e6),
    )


async def unthrottled_stream(ws: Workspace, to: Receiving, seconds: float) -> tuple[int, int]:
    """Stream as fast as encode, link and receiver go; the measured window, in µs."""
    from avd.backoff import Backoff  # noqa: PLC0415
    from avd.metrics import SenderMetrics  # noqa: PLC0415
    from avd.stream_client import Endpoint, StreamClient  # noqa: PLC0415
    from avd.tls import sender_context  # noqa: PLC0415
    from avd.tokens import Token  # noqa: PLC0415

    queue, spool = _ConsumerPaced(2, asyncio.get_running_loop()), _default_spool()
    client = StreamClient(
        kind=StreamKind.VIDEO,
        endpoint=Endpoint(
            "127.0.0.1", to.video_port, "localhost", sender_context(ca=ws.pki.ca_cert), 5.0
        ),
        sender_id="bench-tput",
        token=Token(ws.tokens["bench-tput"]),
        media_format=VideoFormat(640, 480, 120, 70),  # 120: the most a hello may announce
        queue=queue,
        spool=spool,
        metrics=SenderMetrics(),
        backoff=Backoff(),
    )
    stop, halt = asyncio.Event(), threading.Event()
    images = camera_like_images(VGA, 8)
    work = (queue, spool, images, halt)
    encoder = threading.Thread(target=_encode_flat_out, args=work, daemon=True)
    encoder.start()
    streaming = asyncio.create_task(client.run(stop))
    try:
        while not client.connected:  # noqa: ASYNC110 - the client exposes a flag, not an event
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # warm-up: first frames, caches, the recorder's first segment
        window = monotonic_us()
        await asyncio.sleep(seconds)
        return window, monotonic_us()
    finally:
        stop.set()
        halt.set()
        queue.close()
        await streaming
        encoder.join()


def latency_phase(ws: Workspace, probe: Receiving, plan: Plan) -> tuple[int, int]:
    """The real sender (video and a tone) to the probe; the measured window, in µs."""
    sender = start_sender(ws, "bench-cam", probe, audio=True)
    try:
        wait_for_frames(probe, "bench-cam", sender)
        time.sleep(1.0)  # past the first frames and the recorder's first segment
        window = monotonic_us()
        time.sleep(plan.window_s)
        return window, monotonic_us()
    finally:
        sender.stop()


@dataclass
class CpuFigures:
    sender_pct: float
    receiver_pct: float
    histogram_p50_ms: float | None  # the daemon's own capture-to-arrival histogram
    histogram_p99_ms: float | None


def cpu_phase(ws: Workspace, daemon: Receiving, plan: Plan) -> tuple[Child, CpuFigures]:
    """The real sender, video only, to the daemon: both processes' CPU. The sender stays up."""
    sender = start_sender(ws, "bench-cpu", daemon, audio=False)
    wait_for_frames(daemon, "bench-cpu", sender)
    time.sleep(1.0)
    before = scrape(daemon.url)
    receiver_cpu = procstat.CpuMeter(daemon.child.pid, tree=True)  # with its recorder
    sender_cpu = procstat.CpuMeter(sender.pid)
    time.sleep(plan.cpu_s)
    figures = CpuFigures(sender_cpu.percent(), receiver_cpu.percent(), None, None)
    buckets = latency_buckets(before, scrape(daemon.url), "video")
    p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
    figures.histogram_p50_ms = None if p50 is None else p50 * 1000
    figures.histogram_p99_ms = None if p99 is None else p99 * 1000
    return sender, figures


def reconnect_phase(
    ws: Workspace, daemon: Receiving, record_dir: Path, tries: int
) -> tuple[Receiving, list[float]]:
    """kill -9 the daemon, start it again on the same ports: its "listening" line to the
    first frame of the still-running sender that its metrics count, per try."""
    times = []
    for _ in range(tries):
        daemon.child.kill()
        daemon = start_receiver(ws, record_dir, (daemon.video_port, daemon.audio_port))
        while daemon.received("bench-cpu") == 0:
            if time.monotonic() - daemon.ready_at > 30:
                raise RuntimeError("the sender did not reconnect within 30 s of the restart")
            time.sleep(0.005)
        times.append(time.monotonic() - daemon.ready_at)
    return daemon, times
