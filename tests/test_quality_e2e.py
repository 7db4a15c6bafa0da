"""Dynamic quality through a throttled link: real daemons, the fault-injection proxy."""

from __future__ import annotations

import time

import pytest

from avd.demo import histogram_quantile, latency_buckets

from .conftest import Launcher, metric, scrape, sender_metrics_url, wait_until
from .faultproxy import FaultProxy

pytestmark = pytest.mark.slow

# A 640x480 q70 test pattern at 20 fps needs ~480 kB/s; this link carries a third of it.
LINK_BYTES_PER_S = 160_000


def test_a_link_too_slow_for_the_stream_lowers_quality_and_latency_stays_bounded(
    launch: Launcher,
) -> None:
    handle = launch.receiver()
    with FaultProxy(("127.0.0.1", handle.video_port), buffer_bytes=64 * 1024) as proxy:
        proxy.throttle(LINK_BYTES_PER_S, "up")
        sender = launch.sender(handle, AVD_VIDEO_PORT=str(proxy.port), AVD_AUDIO_SOURCE="none")
        url = sender_metrics_url(sender)
        wait_until(
            lambda: metric(scrape(url), "avd_quality_changes_total", direction="down") >= 2, 30
        )
        sender.wait_for_log(r"link congested: video \d+ fps at JPEG quality \d+")
        first = handle.metrics()
        time.sleep(4)
        before = handle.metrics()
        time.sleep(4)
        after = handle.metrics()
        earlier = histogram_quantile(0.5, latency_buckets(first, before, "video"))
        p50 = histogram_quantile(0.5, latency_buckets(before, after, "video"))
        p99 = histogram_quantile(0.99, latency_buckets(before, after, "video"))
        frames = metric(after, "avd_frames_received_total", stream="video") - metric(
            before, "avd_frames_received_total", stream="video"
        )
        sent = scrape(url)
        # Bounded, and not drifting: live frames are at most ~1 s old when sent, then wait
        # for the link's own buffers; the median does not grow from one window to the next.
        assert p99 is not None
        assert p50 is not None
        assert earlier is not None
        assert p99 < 4.0, f"p99 latency {p99:.2f} s on a throttled link"
        assert p50 <= earlier + 0.5, f"latency drifting: median {earlier:.2f} s then {p50:.2f} s"
        assert frames / 4 >= 4, f"only {frames / 4:.1f} frames/s get through"
        assert metric(sent, "avd_jpeg_quality") < 70 or metric(sent, "avd_target_fps") < 20
        # When the link recovers, so does the stream, step by step.
        proxy.heal()
        wait_until(
            lambda: metric(scrape(url), "avd_quality_changes_total", direction="up") >= 1, 40
        )
    assert sender.stop() == 0
