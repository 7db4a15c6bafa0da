"""The sender daemon: sources on their threads, one reconnecting client per stream.

Built once from ``SenderSettings``: the TLS context, the token (from a file, a systemd
credential or the environment), the sources, and a drop-oldest queue per stream sized
from the settings. ``run`` streams until ``stop`` is set, then says goodbye, stops the
capture threads and returns.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path

from avd.backoff import Backoff
from avd.capture import CaptureThread
from avd.clock import monotonic_us
from avd.config import SenderSettings, credentials_directory, join_host_port
from avd.diskspool import current_boot_id, open_disk_spool
from avd.errors import ConfigError
from avd.logthrottle import LogThrottle
from avd.media.base import CapturedFrame, MediaSource, StreamKind
from avd.media.specs import is_mic_spec
from avd.metrics import SenderMetrics
from avd.quality import FrameDecimator, LinkReport, QualityController
from avd.queues import DropOldestQueue
from avd.spool import Spool
from avd.stream_client import Endpoint, StreamClient
from avd.tls import key_permission_problems, sender_context
from avd.tokens import Token, read_sender_token

log = logging.getLogger("avd.sender")


class SpoolLossLog:
    """Frames the spool evicted before an acknowledgement covered them are lost: the log
    says so, not only ``avd_frames_lost_total``. The first loss is logged at once; later ones
    at most once per ``interval_s``, with the count since, so a long outage writes a line a
    minute, not one a frame (the metric counts every frame)."""

    def __init__(self, stream: str, spool_seconds: float, interval_s: float = 60.0) -> None:
        self.stream, self.spool_seconds = stream, spool_seconds
        self._throttle = LogThrottle(interval_s)
        self._unlogged = 0

    def note(self, frames: int, now_s: float) -> None:
        self._unlogged += frames
        if not self._unlogged or self._throttle.admit("lost", self.stream, now_s) is None:
            return
        one = self._unlogged == 1
        log.warning(
            "%s: %d %s left the spool before the receiver acknowledged %s: lost (the spool "
            "keeps %g s of frames, AVD_SPOOL_SECONDS, within its size caps)",
            self.stream,
            self._unlogged,
            "frame" if one else "frames",
            "it" if one else "them",
            self.spool_seconds,
        )
        self._unlogged = 0


def load_token(settings: SenderSettings) -> Token:
    return read_sender_token(
        token_file=settings.token_file,
        credentials_directory=credentials_directory(),
        token_env=settings.token.get_secret_value() if settings.token else None,
    )


def build_sources(settings: SenderSettings) -> list[MediaSource]:
    """The configured sources; ConfigError naming the variable if a spec is unusable."""
    from avd.media.video import open_video_source  # noqa: PLC0415 - cv2 loads slowly

    sources: list[MediaSource] = []
    try:
        video = open_video_source(settings.video_source, settings.video_format, settings.video_loop)
    except ValueError as exc:
        raise ConfigError(f"AVD_VIDEO_SOURCE: {exc}") from None
    if video is not None:
        sources.append(video)
    spec = settings.audio_source
    try:
        if is_mic_spec(spec):
            from avd.media.mic import open_mic_source  # noqa: PLC0415 - PyAudio loads slowly

            audio: MediaSource | None = open_mic_source(spec, settings.audio_format)
        else:
            from avd.media.tone import open_file_audio_source  # noqa: PLC0415

            audio = open_file_audio_source(spec, settings.audio_format, settings.audio_loop)
    except ValueError as exc:
        raise ConfigError(f"AVD_AUDIO_SOURCE: {exc}") from None
    if audio is not None:
        sources.append(audio)
    return sources  # not empty: the settings refuse two sources of none


class DynamicQuality:
    """Applies QualityController's decisions to a video source and its frame decimator."""

    def __init__(
        self, source: MediaSource, settings: SenderSettings, metrics: SenderMetrics
    ) -> None:
        fmt = settings.video_format
        self.source = source
        self.controller = QualityController(
            quality=fmt.quality,
            fps=fmt.fps,
            min_quality=settings.min_jpeg_quality,
            min_fps=settings.min_fps,
        )
        self.decimator = FrameDecimator(fmt.fps)
        self.metrics = metrics
        metrics.jpeg_quality.set(fmt.quality)
        metrics.target_fps.set(fmt.fps)

    def report(self, report: LinkReport) -> None:
        before = self.controller.state
        after = self.controller.observe(report, time.monotonic())
        if after is None:
            return
        if hasattr(self.source, "quality"):
            self.source.quality = after.quality
        self.decimator.fps = after.fps
        self.metrics.jpeg_quality.set(after.quality)
        self.metrics.target_fps.set(after.fps)
        worse = (after.quality, after.fps) < (before.quality, before.fps)
        self.metrics.quality_changes.labels(direction="down" if worse else "up").inc()
        log.info(
            "link %s: video %d fps at JPEG quality %d (was %d fps, quality %d)",
            "congested" if worse else "recovered",
            after.fps,
            after.quality,
            before.fps,
            before.quality,
        )


class Sender:
    def __init__(self, settings: SenderSettings, metrics: SenderMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or SenderMetrics()
        self.token = load_token(settings)
        self.ssl_context = sender_context(
            ca=settings.tls_ca,
            cert=settings.tls_cert,
            key=settings.tls_key,
            allow_tls12=settings.allow_tls12,
        )
        for variable, path, what in (
            ("AVD_TLS_KEY", settings.tls_key, "private key"),
            ("AVD_TOKEN_FILE", settings.token_file, "token"),
        ):
            for problem in key_permission_problems(path, what) if path else []:
                log.warning("%s: %s", variable, problem)
        self.sources = build_sources(settings)
        self.clients: list[StreamClient] = []
        # By stream, once its spool is closed: frames left unacknowledged, and the folder
        # they were kept in (None: without AVD_SPOOL_DIR they went with the process).
        self._left_at_exit: dict[str, tuple[int, Path | None]] = {}
        self.captures: list[CaptureThread] = []
        # (monotonic µs, video frames sent) at the last status_line: its fps is measured.
        self._sent_mark: tuple[int, float] | None = None

    def _queue_capacity(self, kind: StreamKind) -> int:
        s = self.settings
        if kind is StreamKind.VIDEO:
            return s.video_queue_frames
        return max(1, s.audio_queue_ms * 1000 // s.audio_format.chunk_duration_us)

    def _port(self, kind: StreamKind) -> int:
        s = self.settings
        return s.video_port if kind is StreamKind.VIDEO else s.audio_port

    def _wire(self, loop: asyncio.AbstractEventLoop, source: MediaSource) -> None:
        s = self.settings
        queue: DropOldestQueue[tuple[int, CapturedFrame]] = DropOldestQueue(
            self._queue_capacity(source.kind), loop
        )
        label = source.kind.label
        max_age_us = int(s.spool_seconds * 1e6)
        disk = None
        if s.spool_dir is not None:  # overflow beyond the memory cap goes to video/ or audio/
            disk = open_disk_spool(
                s.spool_dir,
                label,
                max_bytes=s.spool_disk_max_mb * 1024 * 1024,
                max_age_us=max_age_us,
                now_us=monotonic_us(),
                boot_id=current_boot_id(),
            )
        spool = Spool(max_bytes=s.spool_max_mb * 1024 * 1024, max_age_us=max_age_us, disk=disk)
        m = self.metrics
        captured, dropped = (
            m.frames_captured.labels(stream=label),
            m.frames_dropped.labels(stream=label),
        )
        lost = m.frames_lost.labels(stream=label)
        losses = SpoolLossLog(label, s.spool_seconds)
        spooled = m.frames_spooled.labels(stream=label)
        m.spool_frames.labels(stream=label).set_function(lambda: len(spool))
        m.spool_bytes.labels(stream=label).set_function(lambda: spool.bytes)
        seqs = itertools.count(spool.next_seq_hint())  # above frames read back from disk
        dynamic = None
        if source.kind is StreamKind.VIDEO and s.dynamic_quality:
            dynamic = DynamicQuality(source, s, m)

        def deliver(frame: CapturedFrame) -> None:
            if dynamic is not None and not dynamic.decimator.keep(frame.capture_us):
                return  # the frame rate is lowered while the link is congested
            # Numbered at capture; kept in the spool until acknowledged, so a frame the live
            # queue drops is sent later as a late frame instead of being lost.
            captured.inc()
            if not client.fits(len(frame.data)):
                return  # the receiver would refuse it: not spooled, never resent
            seq = next(seqs)
            if evicted_unacked := spool.add(seq, frame):
                lost.inc(evicted_unacked)
                losses.note(evicted_unacked, time.monotonic())
            evicted = queue.put((seq, frame))
            dropped.inc(evicted)
            spooled.inc(evicted)  # still in the spool: sent later as a late frame

        self.captures.append(CaptureThread(source, deliver, queue.close))
        endpoint = Endpoint(
            host=s.receiver_host,
            port=self._port(source.kind),
            server_name=s.server_name,
            ssl_context=self.ssl_context,
            handshake_timeout_s=s.handshake_timeout_s,
        )
        client = StreamClient(
            kind=source.kind,
            endpoint=endpoint,
            sender_id=s.sender_id,
            token=self.token,
            media_format=source.format,
            queue=queue,
            spool=spool,
            metrics=self.metrics,
            backoff=Backoff(first_s=0.5, cap_s=s.reconnect_max_s),
            on_link_report=dynamic.report if dynamic else None,
        )
        self.clients.append(client)

    def status_line(self) -> str:
        """One line for ``systemctl status``: what streams where and how fast, or why not."""
        streaming = [c for c in self.clients if c.state == "streaming"]
        parts = [f"{c.label}: {c.state}" for c in self.clients if c.state != "streaming"]
        fps = self._video_fps_since_last_call()
        if streaming:
            ports = "/".join(str(c.endpoint.port) for c in streaming)
            where = join_host_port(self.settings.receiver_host, ports)
            text = f"streaming {'+'.join(c.label for c in streaming)} to {where}"
            if fps is not None and any(c.kind is StreamKind.VIDEO for c in streaming):
                text += f", {fps:.1f} fps"
            parts.insert(0, text)
        errors = [c.error for c in self.captures if c.error]
        return "; ".join(parts + errors)

    def _video_fps_since_last_call(self) -> float | None:
        """Video frames sent per second since the previous call; None on the first call."""
        sent = self.metrics.registry.get_sample_value(
            "avd_frames_sent_total", {"stream": StreamKind.VIDEO.label}
        )
        now = monotonic_us()
        previous, self._sent_mark = self._sent_mark, (now, sent or 0.0)
        if previous is None or now <= previous[0]:
            return None
        return (self._sent_mark[1] - previous[1]) * 1e6 / (now - previous[0])

    def summary(self) -> list[str]:
        """One line per stream for the log at exit: what happened to the frames captured."""
        registry = self.metrics.registry
        lines = []
        for client in self.clients:
            counts = {
                name: int(
                    registry.get_sample_value(f"avd_frames_{name}_total", {"stream": client.label})
                    or 0
                )
                for name in ("captured", "sent", "backfilled", "dropped", "lost", "oversized")
            }
            left, kept_in = self._left_at_exit.get(client.label, (len(client.spool), None))
            fate = ""
            if left and kept_in is not None:
                fate = f" (kept in {kept_in}: sent after the next start)"
            elif left:
                fate = " (gone with this process: AVD_SPOOL_DIR would keep them)"
            lines.append(
                f"{client.label}: captured={counts['captured']} sent={counts['sent']} "
                f"backfilled={counts['backfilled']} dropped-live={counts['dropped']} "
                f"lost={counts['lost']} unacknowledged={left}{fate}"
                + (f" oversized={counts['oversized']}" if counts["oversized"] else "")
            )
        return lines

    def all_open(self) -> bool:
        return all(c.opened.is_set() for c in self.captures)

    def stop_capture(self) -> None:
        """Stop the sources (blocking: call from a thread); the streams then flush and end."""
        for capture in self.captures:
            capture.stop()

    async def run(self, abort: asyncio.Event) -> None:
        """Streams until every source has ended (see stop_capture), or ``abort`` is set."""
        loop = asyncio.get_running_loop()
        for source in self.sources:
            self._wire(loop, source)
        for capture in self.captures:
            capture.start()
        try:
            await asyncio.gather(*(client.run(abort) for client in self.clients))
        finally:
            for capture in self.captures:
                await asyncio.to_thread(capture.stop)
            for client in self.clients:  # unacknowledged frames in memory go to disk, if set
                spool = client.spool
                held, lost_before = len(spool), spool.lost
                kept_in = await asyncio.to_thread(spool.close)
                self._left_at_exit[client.label] = (held - (spool.lost - lost_before), kept_in)


def describe(settings: SenderSettings) -> str:
    """The start line's summary: where to, and each source with its format (none: off)."""
    where = join_host_port(settings.receiver_host, f"{settings.video_port}/{settings.audio_port}")
    video, audio = f"video={settings.video_source}", f"audio={settings.audio_source}"
    if settings.video_source != "none":
        video += f" {settings.width}x{settings.height}@{settings.fps} q{settings.jpeg_quality}"
    if settings.audio_source != "none":
        audio += f" {settings.audio_rate} Hz"
    return f"sender {settings.sender_id} -> {where}, {video}, {audio}"
