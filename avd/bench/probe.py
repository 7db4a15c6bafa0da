"""The probe receiver: the daemon's own receiving code, plus a sink that decodes on arrival.

It runs as a child process (``probe_main``), started by ``avd.bench.daemons`` like the
receiver daemon and with the same settings, so that the sender's capture stamps and the
probe's decode times compare directly (CLOCK_MONOTONIC is system-wide): latency is exact per
frame, not interpolated between histogram buckets. ``analyse_probe`` turns the rows it
writes at the end into the latency, audio latency and throughput figures.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avd import eventloop
from avd.clock import monotonic_us
from avd.media.base import ReceivedFrame, StreamInfo, StreamKind
from avd.stats import percentile


class ProbeSink:
    """A live view's stand-in: decodes each JPEG on arrival and notes the times, per sender.

    It decodes on the receiver's event loop, where sinks are called: fine for the one or two
    streams the bench sends it. (A worker thread was tried: waiting for the GIL after each
    decode while the loop was busy made it slower, 320 against 600 frames/s here.)
    Video rows are (capture µs, arrival µs, decoded µs, decoded ok, µs in ``cv2.imdecode``);
    audio rows (capture µs, arrival µs).
    """

    def __init__(self) -> None:
        self.video: dict[str, list[tuple[int, int, int, bool, int]]] = {}
        self.audio: dict[str, list[tuple[int, int]]] = {}
        self._showing: dict[str, Any] = {}

    def stream_started(self, info: StreamInfo) -> None:
        pass

    def frame(self, info: StreamInfo, frame: ReceivedFrame) -> None:
        if info.kind is StreamKind.VIDEO:
            # Shown until the next one replaces it, as on a screen with one frame buffer: the
            # picture shown is let go just before the next is decoded, so that the decoder
            # writes into the memory it just left, warm in the caches, as the floor's tight
            # loop does. (Keeping two pictures, 1.8 MB, made imdecode 0.86 against 0.76 ms in
            # the unthrottled run, and the throughput 11 to 26 % lower, in 3 interleaved
            # pairs.) keep_freed_memory() keeps glibc from handing that memory back to the
            # kernel meanwhile, which doubled imdecode's time when it did (2.0 against 0.9 ms).
            self._showing.pop(info.sender_id, None)
            started = monotonic_us()
            image = cv2.imdecode(np.frombuffer(frame.data, np.uint8), cv2.IMREAD_COLOR)
            done = monotonic_us()
            row = (frame.capture_us, frame.arrival_us, done, image is not None, done - started)
            self.video.setdefault(info.sender_id, []).append(row)
            self._showing[info.sender_id] = image
        else:
            self.audio.setdefault(info.sender_id, []).append((frame.capture_us, frame.arrival_us))

    def stream_ended(self, info: StreamInfo) -> None:
        pass

    def close(self) -> None:
        pass


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_FREED_BYTES = 32 << 20
MAP_APART_BYTES = 4 << 20


def keep_freed_memory() -> bool:
    """Keeps glibc from handing freed memory back to the kernel: True if it could.

    The probe's decoded pictures (0.9 MB each) otherwise landed on pages the allocator had
    just returned, so every decode faulted some 20 to 40 fresh pages in (perf: all in the
    decoder's writes), which the bench's codec timings in a process of their own never do:
    the decode's p99 was 1.52 against 1.14 ms with this (4 interleaved pairs of 300 frames).
    A live view that reuses its picture buffer pays no such faults either. Up to 32 MiB of
    freed memory stays mapped, pictures up to 4 MiB come from the heap; not glibc: no-op.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    return bool(
        mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) and mallopt(_M_MMAP_THRESHOLD, MAP_APART_BYTES)
    )


def probe_main(argv: Sequence[str]) -> int:
    """The probe receiver: the daemon's receiver and sinks plus a ``ProbeSink``.

    Settings come from the environment as for ``avd-receiver``; on SIGTERM it shuts down
    like the daemon and writes the probe's rows as JSON to ``argv[0]``.
    """
    from avd.cli import budget_open_files, build_receiver_sinks  # noqa: PLC0415
    from avd.config import ReceiverSettings, load_settings  # noqa: PLC0415
    from avd.logs import setup_logging  # noqa: PLC0415

    keep_freed_memory()
    setup_logging(role="avd-bench-probe", log_format="text", level="WARNING")
    settings = budget_open_files(load_settings(ReceiverSettings))
    # The live view first, as the daemon puts its speaker first: the recorder's hand-off is
    # not on the path to the screen.
    probe = ProbeSink()
    eventloop.run(
        _serve_probe(settings, [probe, *build_receiver_sinks(settings)]), settings.event_loop
    )
    Path(argv[0]).write_text(json.dumps({"video": probe.video, "audio": probe.audio}))
    return 0


async def _serve_probe(settings: Any, sinks: list[Any]) -> None:
    from avd.daemon import install_signal_handlers  # noqa: PLC0415
    from avd.media.fanout import FanoutSink  # noqa: PLC0415
    from avd.metrics import ReceiverMetrics, serve  # noqa: PLC0415
    from avd.receiver import Receiver  # noqa: PLC0415

    metrics, sink = ReceiverMetrics(), FanoutSink(sinks)
    receiver = Receiver(settings, sink, metrics)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    listening = await receiver.start()
    stop_metrics, port = serve(metrics.registry, "127.0.0.1", 0)
    print(
        f"probe receiver video={listening.video_port} audio={listening.audio_port} "
        f"metrics=http://127.0.0.1:{port}/metrics",
        flush=True,
    )
    await stop.wait()
    await receiver.shutdown()
    await asyncio.to_thread(sink.close)
    stop_metrics()


def analyse_probe(
    rows: dict[str, Any], window: tuple[int, int], throughput_window: tuple[int, int]
) -> dict[str, float]:
    def within(row: Sequence[Any], at: int, bounds: tuple[int, int]) -> bool:
        return bool(bounds[0] <= row[at] <= bounds[1])

    cam = [r for r in rows["video"].get("bench-cam", []) if within(r, 1, window)]
    tone = [r for r in rows["audio"].get("bench-cam", []) if within(r, 1, window)]
    fast = [r for r in rows["video"].get("bench-tput", []) if within(r, 2, throughput_window)]
    if not (cam and tone and fast):
        raise RuntimeError("the probe receiver got no frames in a measuring window")
    end_to_end = [(decoded - capture) / 1000 for capture, _, decoded, *_ in cam]
    return {
        "latency_p50_ms": percentile(end_to_end, 0.5),
        "latency_p99_ms": percentile(end_to_end, 0.99),
        "frames": len(cam),
        "transport_p50_ms": percentile([(a - c) / 1000 for c, a, *_ in cam], 0.5),
        "decode_p50_ms": percentile([(d - a) / 1000 for _, a, d, *_ in cam], 0.5),
        "imdecode_p50_ms": percentile([r[4] / 1000 for r in cam], 0.5),
        "audio_latency_p99_ms": percentile([(a - c) / 1000 for c, a in tone], 0.99),
        "chunks": len(tone),
        "throughput_fps": len(fast) * 1e6 / (throughput_window[1] - throughput_window[0]),
        "throughput_imdecode_p50_ms": percentile([r[4] / 1000 for r in fast], 0.5),
        "undecodable": sum(not r[3] for r in cam + fast),
    }
