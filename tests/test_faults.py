"""Network faults between a real sender and a real receiver, through the fault proxy.

Whatever the path does (stall, reset, delay), the sender's capture never blocks, its
memory stays bounded, and it streams again as soon as the path returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from .conftest import (
    Daemon,
    Launcher,
    ReceiverHandle,
    metric,
    scrape,
    sender_metrics_url,
    wait_until,
)
from .faultproxy import FaultProxy
from .procwatch import rss_kb

pytestmark = pytest.mark.slow


@dataclass
class Path_:
    receiver: ReceiverHandle
    proxy: FaultProxy
    sender: Daemon
    sender_url: str

    def sent(self) -> float:
        return metric(scrape(self.sender_url), "avd_frames_sent_total", stream="video")

    def captured(self) -> float:
        return metric(scrape(self.sender_url), "avd_frames_captured_total", stream="video")

    def received(self) -> float:
        return metric(self.receiver.metrics(), "avd_frames_received_total", stream="video")


@contextmanager
def proxied_path(launch: Launcher) -> Iterator[Path_]:
    receiver = launch.receiver()
    with FaultProxy(("127.0.0.1", receiver.video_port), buffer_bytes=64 * 1024) as proxy:
        sender = launch.sender(receiver, AVD_VIDEO_PORT=str(proxy.port), AVD_AUDIO_SOURCE="none")
        url = sender_metrics_url(sender)
        path = Path_(receiver, proxy, sender, url)
        wait_until(lambda: path.received() > 10)
        yield path


def _capture_rate(path: Path_, seconds: float) -> float:
    before = path.captured()
    time.sleep(seconds)
    return (path.captured() - before) / seconds


def test_a_stalled_path_never_blocks_capture_and_streaming_resumes(launch: Launcher) -> None:
    with proxied_path(launch) as path:
        rss_before = rss_kb(path.sender.proc.pid)
        path.proxy.blackhole(True)
        # Capture goes on at full rate while nothing gets through.
        assert _capture_rate(path, 3) >= 15
        # The sender notices the silent receiver (three missed heartbeats) and reconnects,
        # in vain while the path is down; its memory stays bounded by the queue and spool.
        path.sender.wait_for_log(r"sent nothing for|did not answer|no answer", timeout=10)
        assert _capture_rate(path, 2) >= 15
        path.proxy.heal()
        healed = time.monotonic()
        before = path.received()
        wait_until(lambda: path.received() > before + 20, 15)
        assert time.monotonic() - healed < 12
        assert rss_kb(path.sender.proc.pid) - rss_before < 64 * 1024  # the spool's cap
    assert path.sender.stop() == 0


def test_a_reset_path_reconnects_at_once(launch: Launcher) -> None:
    with proxied_path(launch) as path:
        for _ in range(3):
            path.proxy.reset()
            before = path.received()
            reset_at = time.monotonic()
            wait_until(lambda before=before: path.received() > before + 10, 10)
            assert time.monotonic() - reset_at < 5
        assert metric(scrape(path.sender_url), "avd_reconnects_total", stream="video") >= 3
    assert path.sender.stop() == 0


def test_a_delayed_path_keeps_streaming_at_full_rate(launch: Launcher) -> None:
    with proxied_path(launch) as path:
        path.proxy.delay(0.2)
        time.sleep(1)
        before = path.received()
        time.sleep(4)
        assert (path.received() - before) / 4 >= 15
        rtt = metric(scrape(path.sender_url), "avd_rtt_seconds", stream="video")
        assert rtt >= 0.2  # the delay is seen where it should be
    assert path.sender.stop() == 0
