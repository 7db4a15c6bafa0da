"""What an ``avd bench`` run does (quick or full), and the little all of its parts share."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from avd.media.base import VideoFormat

VGA = VideoFormat(640, 480, 20, 70)  # the sender's default: what the figures are for
MIB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    quick: bool
    window_s: float  # latency window, during which the idle receiver's CPU is measured too
    throughput_s: float
    cpu_s: float
    step_s: float
    steps: tuple[int, ...]
    reconnect_tries: int
    codec_frames: int
    paced_codec_frames: int  # at 20 fps: 2 s quick, 10 s full
    transport_messages: int  # the bare TLS transport, at 20 fps too


QUICK = Plan(True, 4.0, 3.0, 4.0, 2.5, (25, 100, 200), 1, 150, 40, 40)
FULL = Plan(
    False, 15.0, 8.0, 10.0, 5.0, (25, 50, 100, 200, 300, 400, 600, 800, 1000), 3, 600, 200, 200
)


def progress(text: str) -> None:
    print(f"avd bench: {text}", file=sys.stderr, flush=True)


def format_ms(value: float | None) -> str:
    """A latency in a problem or a table cell; "n/a" when the daemon measured none."""
    return "n/a" if value is None else f"{value:.1f} ms"
