"""Prometheus metrics of both daemons (prometheus-client).

Each daemon builds its own ``CollectorRegistry`` rather than using the library's global
one, so tests can run several daemons in one process and see only their own numbers.
``serve`` starts the exporter on ``AVD_METRICS_ADDR`` and returns a stop function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Latency buckets fine enough for p50/p99 of a loopback link (~1 ms) and coarse enough for
# the internet (hundreds of ms); the demo and bench interpolate quantiles from them.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 30.0,
)  # fmt: skip


class ReceiverMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_received = Counter(
            "avd_frames_received", "Media frames accepted", ["sender", "stream"], registry=r
        )
        self.bytes_received = Counter(
            "avd_bytes_received", "Media payload bytes accepted", ["sender", "stream"], registry=r
        )
        self.frame_latency = Histogram(
            "avd_frame_latency_seconds",
            "Capture to arrival, corrected by the estimated clock offset",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "avd_auth_failures", "Hellos refused for a bad token or sender id", registry=r
        )
        self.handshake_failures = Counter(
            "avd_handshake_failures",
            "Connections that ended before a session opened, other than for a wrong token",
            ["reason"],
            registry=r,
        )
        self.auth_lockouts = Counter(
            "avd_auth_lockouts",
            "Addresses locked out after repeated authentication failures",
            registry=r,
        )
        self.locked_out_connections = Counter(
            "avd_auth_locked_out_connections",
            "Connections refused unread because their address is locked out",
            registry=r,
        )
        self.tls_cert_expiry = Gauge(
            "avd_tls_cert_expiry_seconds",
            "Seconds until the receiver's certificate expires",
            registry=r,
        )
        self.connections_active = Gauge(
            "avd_connections_active", "Authenticated sessions open", ["stream"], registry=r
        )
        self.frames_rejected = Counter(
            "avd_frames_rejected", "Media frames refused by validation", ["reason"], registry=r
        )
        self.frames_late = Counter(
            "avd_frames_late",
            "Late frames received (from a sender's spool)",
            ["sender", "stream"],
            registry=r,
        )
        self.acks_sent = Counter("avd_acks_sent", "Acknowledgements sent", ["stream"], registry=r)
        self.rtt = Gauge(
            "avd_rtt_seconds", "Heartbeat round-trip time", ["sender", "stream"], registry=r
        )
        self.av_skew = Gauge(
            "avd_av_skew_seconds",
            "Video capture-to-arrival delay minus audio's, smoothed; positive: video lags",
            ["sender"],
            registry=r,
        )
        for stream in ("video", "audio"):
            self.connections_active.labels(stream=stream)
            self.frame_latency.labels(stream=stream)
        self.auth_failures.inc(0)
        self.auth_lockouts.inc(0)
        self.locked_out_connections.inc(0)


class SenderMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_sent = Counter("avd_frames_sent", "Media frames sent", ["stream"], registry=r)
        self.bytes_sent = Counter(
            "avd_bytes_sent", "Media payload bytes sent", ["stream"], registry=r
        )
        self.frames_dropped = Counter(
            "avd_frames_dropped",
            "Frames the live queue dropped (network slow or away); the spool still has them",
            ["stream"],
            registry=r,
        )
        self.frames_spooled = Counter(
            "avd_frames_spooled",
            "Frames held back from the live stream (slow or absent link), to be backfilled",
            ["stream"],
            registry=r,
        )
        self.frames_backfilled = Counter(
            "avd_frames_backfilled",
            "Spooled frames sent late, behind the live stream",
            ["stream"],
            registry=r,
        )
        self.frames_lost = Counter(
            "avd_frames_lost",
            "Frames evicted from the spool before the receiver acknowledged them",
            ["stream"],
            registry=r,
        )
        self.frames_oversized = Counter(
            "avd_frames_oversized",
            "Frames larger than the receiver takes (AVD_MAX_VIDEO_FRAME_KB), never sent",
            ["stream"],
            registry=r,
        )
        self.jpeg_quality = Gauge(
            "avd_jpeg_quality", "JPEG quality in use (dynamic quality)", registry=r
        )
        self.target_fps = Gauge(
            "avd_target_fps", "Video frame rate in use (dynamic quality)", registry=r
        )
        self.quality_changes = Counter(
            "avd_quality_changes",
            "Dynamic quality steps, down when the link is congested, up when it recovers",
            ["direction"],
            registry=r,
        )
        self.spool_frames = Gauge(
            "avd_spool_frames", "Frames held until acknowledged", ["stream"], registry=r
        )
        self.spool_bytes = Gauge(
            "avd_spool_bytes", "Bytes held until acknowledged", ["stream"], registry=r
        )
        self.frames_captured = Counter(
            "avd_frames_captured", "Frames captured from the sources", ["stream"], registry=r
        )
        self.reconnects = Counter(
            "avd_reconnects", "Connection attempts after the first", ["stream"], registry=r
        )
        self.connected = Gauge(
            "avd_connected", "1 while the stream's session is established", ["stream"], registry=r
        )
        self.rtt = Gauge("avd_rtt_seconds", "Heartbeat round-trip time", ["stream"], registry=r)
        for stream in ("video", "audio"):
            for metric in (
                self.frames_sent,
                self.frames_dropped,
                self.frames_spooled,
                self.frames_backfilled,
                self.frames_lost,
                self.frames_oversized,
                self.reconnects,
                self.connected,
            ):
                metric.labels(stream=stream)


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[Callable[[], None], int]:
    """Serve ``/metrics`` on host:port in a thread; returns a stop function and the port."""
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)

    return stop, int(server.server_port)


class RecorderCollector:
    """The recorder's own counters, read at scrape time: what happened to each frame."""

    OUTCOMES = ("written", "duplicate", "dropped", "not_recorded", "late_dropped", "out_of_order")

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        frames = CounterMetricFamily(
            "avd_recorder_frames",
            "Frames the recorder finished with, by outcome (dropped: its queue was full)",
            labels=["sender", "outcome"],
        )
        paused = GaugeMetricFamily(
            "avd_recording_paused", "1 while recording is paused (disk full)", labels=["sender"]
        )
        for sender, s in self._stats().items():
            counts = {
                "written": s.video_frames + s.audio_chunks,
                "duplicate": s.duplicates,
                "dropped": s.dropped,
                "not_recorded": s.not_recorded,
                "late_dropped": s.late_dropped,
                "out_of_order": s.out_of_order,
            }
            for outcome in self.OUTCOMES:
                frames.add_metric([sender, outcome], counts[outcome])
            paused.add_metric([sender], 1 if s.paused else 0)
        yield frames
        yield paused
