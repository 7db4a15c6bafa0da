"""The JPEG floor and the bandwidth table, measured in the bench's own process.

The floor is one encode plus one decode of the sender's camera-like test pattern at 640x480
q70: no live frame can be faster, so the latency and throughput targets are ratios of it,
from the same run. The bandwidth rows are offline: test-pattern frames encoded, not sent.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from avd.bench.plan import VGA
from avd.loadgen import camera_like_frames
from avd.media.base import AudioFormat, VideoFormat
from avd.media.video import camera_like_images, encode_jpeg
from avd.stats import percentile


@dataclass(frozen=True)
class Codec:
    encode_fps: float
    decode_fps: float
    jpeg_bytes: float
    # One encode then one decode every 50 ms, as a 20 fps stream does them: the codec alone,
    # with the caches and the core as cold as a live stream leaves them (not part of the JSON).
    paced_p50_ms: float = 0.0
    paced_p99_ms: float = 0.0

    @property
    def floor_ms(self) -> float:
        return 1000 / self.encode_fps + 1000 / self.decode_fps

    def fastest(self, other: Codec) -> Codec:
        """The higher of each rate: a floor is the codec at its best in the run. Measured
        once, a slow minute of this shared machine (rates 30 % low have been seen) made the
        floor high and the targets on it easy."""
        return replace(
            self,
            encode_fps=max(self.encode_fps, other.encode_fps),
            decode_fps=max(self.decode_fps, other.decode_fps),
        )


def _rate(work: Any, count: int, rounds: int = 3) -> float:
    """Calls per second of ``work(i)``: the median of ``rounds`` timed runs of ``count``."""
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(count):
            work(i)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def _paced(images: list[Any], count: int, period_s: float) -> list[float]:
    """ms of one encode plus one decode, once per ``period_s``."""
    shown = None  # shown until the next replaces it, as ProbeSink does (see there why)
    times = []
    for i in range(count):
        time.sleep(period_s)
        started = time.perf_counter()
        jpeg = encode_jpeg(images[i % len(images)], VGA.quality)
        shown = None
        shown = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        times.append((time.perf_counter() - started) * 1000)
    del shown
    return times


def measure_codec(count: int, paced: int = 0) -> Codec:
    """Rates in a tight loop over ``count`` frames; ``paced`` frames at 20 fps if not 0."""
    images = camera_like_images(VGA, 8)
    jpegs = [np.frombuffer(encode_jpeg(image, VGA.quality), np.uint8) for image in images]
    encode = _rate(lambda i: encode_jpeg(images[i % 8], VGA.quality), count)
    decode = _rate(lambda i: cv2.imdecode(jpegs[i % 8], cv2.IMREAD_COLOR), count)
    times = _paced(images, paced, 1 / VGA.fps) if paced else [0.0]
    return Codec(
        encode,
        decode,
        statistics.fmean(len(j) for j in jpegs),
        percentile(times, 0.5),
        percentile(times, 0.99),
    )


def bandwidth_rows() -> list[tuple[str, float, float]]:
    """(setting, payload kbit/s, kbit/s with avd's 25-byte framing) of encoded test frames."""
    from avd.media.tone import ToneSource  # noqa: PLC0415

    rows = []
    for w, h, fps, q in ((320, 240, 15, 60), (640, 480, 20, 70), (1280, 720, 30, 80)):
        size = statistics.fmean(len(f) for f in camera_like_frames(VideoFormat(w, h, fps, q), 12))
        rows.append((f"video {w}x{h} {fps} fps q{q}", size * fps * 8e-3, (size + 25) * fps * 8e-3))
    audio = AudioFormat(44100, 1, 2, 1024)
    chunk = len(ToneSource(audio).samples(0))
    per_s = audio.rate / audio.chunk
    rows.append(("audio 44.1 kHz mono 16-bit", chunk * per_s * 8e-3, (chunk + 25) * per_s * 8e-3))
    return rows
