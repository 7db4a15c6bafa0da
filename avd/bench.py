"""``avd bench``: latency, throughput, CPU, memory, reconnection and scale on this machine.

Everything runs on localhost through the daemons' own code: TLS 1.3, token authentication,
recording on. Each figure says what it measured (``NOTES``); the table puts it next to its
target, computed from the same run where the target is a ratio (the JPEG floor):

- JPEG encode/decode of the sender's camera-like test pattern (640x480 q70) in this process;
  their per-frame sum is the floor no live frame can beat.
- Latency and throughput: the real ``avd-sender`` (test sources) and an in-process
  ``StreamClient`` stream to a *probe receiver*: ``avd.receiver.Receiver`` with the daemon's
  recorder, plus a sink that decodes every JPEG on arrival (``cv2.imdecode``, as a live view
  would) and notes the time. CLOCK_MONOTONIC is system-wide, so capture stamps from the
  sender process and decode times in the probe compare directly: exact per-frame figures,
  not the daemon histogram's interpolated ones (which are shown too, as a cross-check).
- CPU, memory, scale and reconnection: the real ``avd-receiver`` daemon, measured from
  /proc (``avd.procstat``), counted through its Prometheus endpoint, its recordings counted
  packet by packet; scale uses ``avd.loadgen`` processes of pre-encoded senders.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avd import procstat
from avd.certs import CertPaths, init_certs
from avd.clock import monotonic_us
from avd.demo import Samples, histogram_quantile, latency_buckets, scrape, total
from avd.loadgen import LoadConfig, camera_like_frames
from avd.media.base import (
    AudioFormat,
    CapturedFrame,
    ReceivedFrame,
    StreamInfo,
    StreamKind,
    VideoFormat,
)
from avd.media.video import camera_like_images, encode_jpeg
from avd.queues import DropOldestQueue
from avd.spool import Spool
from avd.tokens import hash_token, new_token

VGA = VideoFormat(640, 480, 20, 70)
KEYS = (
    "encode_fps", "decode_fps", "floor_ms", "latency_p50_ms", "latency_p99_ms",
    "throughput_fps", "audio_latency_p99_ms", "max_senders", "sender_cpu_pct",
    "receiver_cpu_pct", "receiver_idle_cpu_pct", "reconnect_s", "receiver_rss_per_sender_mb",
)  # fmt: skip
LISTENING = r"video=(\d+) audio=(\d+) metrics=(http://\S+)"
SENDERS_PER_LOADGEN = 250  # one generator process stays near a third of a core at 250 x 20 fps
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


QUICK = Plan(True, 4.0, 3.0, 4.0, 2.5, (25, 100, 200), 1, 150)
FULL = Plan(False, 15.0, 8.0, 10.0, 5.0, (25, 50, 100, 200, 300, 400, 600, 800, 1000), 3, 600)


def progress(text: str) -> None:
    print(f"avd bench: {text}", file=sys.stderr, flush=True)


# ---- JPEG floor and bandwidth (in this process) ---------------------------------------


@dataclass(frozen=True)
class Codec:
    encode_fps: float
    decode_fps: float
    jpeg_bytes: float

    @property
    def floor_ms(self) -> float:
        return 1000 / self.encode_fps + 1000 / self.decode_fps


def _rate(work: Any, count: int, rounds: int = 3) -> float:
    """Calls per second of ``work(i)``: the median of ``rounds`` timed runs of ``count``."""
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(count):
            work(i)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def measure_codec(count: int) -> Codec:
    images = camera_like_images(VGA, 8)
    jpegs = [np.frombuffer(encode_jpeg(image, VGA.quality), np.uint8) for image in images]
    encode = _rate(lambda i: encode_jpeg(images[i % 8], VGA.quality), count)
    decode = _rate(lambda i: cv2.imdecode(jpegs[i % 8], cv2.IMREAD_COLOR), count)
    return Codec(encode, decode, statistics.fmean(len(j) for j in jpegs))


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


# ---- processes --------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> Any:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when the bench dies, however
    it dies (even SIGKILL): no daemon or generator outlives the run. ``prctl`` is looked up
    here, in the parent: between fork and exec the child should only make the call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A subprocess whose output lines are kept, each with the monotonic time it was read."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_terminate_with_parent(),  # noqa: PLW1509 - one C call, see above
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def wait_for(self, pattern: str, timeout: float = 30.0) -> tuple[float, re.Match[str]]:
        """(when it was read, match) of the first output line matching ``pattern``."""
        regex, deadline, seen = re.compile(pattern), time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            lines = self.lines[seen:]
            for when, line in lines:
                if match := regex.search(line):
                    return when, match
            seen += len(lines)
            if self.proc.poll() is not None and not lines:
                break
            time.sleep(0.005)
        tail = "\n".join(line for _, line in self.lines[-15:])
        raise RuntimeError(f"{self.name} did not print {pattern!r}:\n{tail}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(2)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVD_")}
    return env | {"AVD_LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1"} | settings


def _script(name: str) -> list[str]:
    """The console script an operator runs, next to this Python; else its entry point."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    entry = "receiver_main" if name == "avd-receiver" else "sender_main"
    return [sys.executable, "-c", f"import sys; from avd.cli import {entry}; sys.exit({entry}())"]


@dataclass
class Workspace:
    root: Path
    pki: CertPaths
    tokens_file: Path
    tokens: dict[str, str] = field(repr=False)
    children: list[Child] = field(default_factory=list)  # killed at the end, whatever happens

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, env)
        self.children.append(child)
        return child

    def token_file(self, sender_id: str) -> Path:
        path = self.root / f"{sender_id}.token"
        path.touch(mode=0o600)
        path.write_text(self.tokens[sender_id] + "\n")
        return path


def make_workspace(root: Path, load_senders: int) -> Workspace:
    pki = init_certs(root / "certs", ["localhost", "127.0.0.1"], days=2)
    ids = ["bench-cam", "bench-tput", "bench-cpu"] + [f"load-{i}" for i in range(load_senders)]
    tokens = {sender_id: new_token() for sender_id in ids}
    path = root / "tokens"
    path.touch(mode=0o600)  # one write: add_token's fsync per line would take seconds here
    path.write_text("".join(f"{i} {hash_token(t)}\n" for i, t in tokens.items()))
    return Workspace(root, pki, path, tokens)


@dataclass
class Receiving:
    """A receiver (the daemon or the probe) that has logged where it listens."""

    child: Child
    video_port: int
    audio_port: int
    url: str
    ready_at: float  # when its "listening" line was read

    def received(self, sender_id: str | None = None, stream: str = "video") -> float:
        labels = {"stream": stream} | ({"sender": sender_id} if sender_id else {})
        return total(scrape(self.url), "avd_frames_received_total", **labels)


def start_receiver(
    ws: Workspace, record_dir: Path, ports: tuple[int, int] = (0, 0), probe: Path | None = None
) -> Receiving:
    env = _env(
        AVD_BIND="127.0.0.1", AVD_VIDEO_PORT=str(ports[0]), AVD_AUDIO_PORT=str(ports[1]),
        AVD_TLS_CERT=str(ws.pki.receiver_cert), AVD_TLS_KEY=str(ws.pki.receiver_key),
        AVD_TOKENS_FILE=str(ws.tokens_file), AVD_METRICS_ADDR="127.0.0.1:0",
        AVD_RECORD_DIR=str(record_dir), AVD_MIN_FREE_GB="0", AVD_PLAYBACK="none",
        AVD_LOG_LEVEL="INFO",
    )  # fmt: skip
    if probe is None:
        child = ws.spawn("avd-receiver", _script("avd-receiver"), env)
    else:
        code = "import sys; from avd.bench import probe_main; sys.exit(probe_main(sys.argv[1:]))"
        child = ws.spawn("probe receiver", [sys.executable, "-c", code, str(probe)], env)
    when, match = child.wait_for(LISTENING)
    return Receiving(child, int(match.group(1)), int(match.group(2)), match.group(3), when)


def start_sender(ws: Workspace, sender_id: str, to: Receiving, audio: bool) -> Child:
    env = _env(
        AVD_RECEIVER_HOST="127.0.0.1", AVD_TLS_SERVER_NAME="localhost",
        AVD_VIDEO_PORT=str(to.video_port), AVD_AUDIO_PORT=str(to.audio_port),
        AVD_TLS_CA=str(ws.pki.ca_cert), AVD_SENDER_ID=sender_id,
        AVD_TOKEN_FILE=str(ws.token_file(sender_id)), AVD_VIDEO_SOURCE="test",
        AVD_AUDIO_SOURCE="test" if audio else "none", AVD_WIDTH=str(VGA.width),
        AVD_HEIGHT=str(VGA.height), AVD_FPS=str(VGA.fps), AVD_JPEG_QUALITY=str(VGA.quality),
    )  # fmt: skip
    return ws.spawn(f"avd-sender {sender_id}", _script("avd-sender"), env)


def wait_for_frames(to: Receiving, sender_id: str, sender: Child, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while to.received(sender_id) == 0:
        if time.monotonic() > deadline or sender.proc.poll() is not None:
            tail = "\n".join(line for _, line in sender.lines[-15:])
            raise RuntimeError(f"no frames from {sender_id} reached the receiver:\n{tail}")
        time.sleep(0.05)


# ---- the probe receiver (a child process) ----------------------------------------------


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
            started = monotonic_us()
            image = cv2.imdecode(np.frombuffer(frame.data, np.uint8), cv2.IMREAD_COLOR)
            done = monotonic_us()
            row = (frame.capture_us, frame.arrival_us, done, image is not None, done - started)
            self.video.setdefault(info.sender_id, []).append(row)
            # Shown until the next one replaces it, as on a screen. Freeing each 0.9 MB picture
            # before decoding the next lets glibc hand the memory back to the kernel and fault
            # it in again, which doubled imdecode's time here (2.0 ms against 0.9 ms).
            self._showing[info.sender_id] = image
        else:
            self.audio.setdefault(info.sender_id, []).append((frame.capture_us, frame.arrival_us))

    def stream_ended(self, info: StreamInfo) -> None:
        pass

    def close(self) -> None:
        pass


def probe_main(argv: Sequence[str]) -> int:
    """The probe receiver: the daemon's receiver and sinks plus a ``ProbeSink``.

    Settings come from the environment as for ``avd-receiver``; on SIGTERM it shuts down
    like the daemon and writes the probe's rows as JSON to ``argv[0]``.
    """
    from avd.cli import build_receiver_sinks  # noqa: PLC0415
    from avd.config import ReceiverSettings, load_settings  # noqa: PLC0415
    from avd.logs import setup_logging  # noqa: PLC0415

    settings = load_settings(ReceiverSettings)
    setup_logging(role="avd-bench-probe", log_format="text", level="WARNING")
    probe = ProbeSink()
    asyncio.run(_serve_probe(settings, [*build_receiver_sinks(settings), probe]))
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


# ---- one unthrottled stream (in this process) -------------------------------------------


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


# ---- phases against the probe and the daemon ---------------------------------------------


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
    receiver_cpu, sender_cpu = procstat.CpuMeter(daemon.child.pid), procstat.CpuMeter(sender.pid)
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


# ---- scale: loadgen processes against the daemon ----------------------------------------


@dataclass
class Step:
    senders: int
    problems: list[str] = field(default_factory=list)
    received_fps: float = 0.0
    p99_ms: float | None = None
    receiver_cpu_pct: float = 0.0
    rss_bytes: int = 0
    loadgen_cpu_pct: float = 0.0  # all generator processes together
    loadgen_lag_ms: float = 0.0  # the worst generator's p99 lateness behind its schedule

    @property
    def passed(self) -> bool:
        return not self.problems


def start_loadgens(ws: Workspace, daemon: Receiving, n: int) -> list[Child]:
    processes = math.ceil(n / SENDERS_PER_LOADGEN)
    share = math.ceil(n / processes)
    children = []
    for k, first in enumerate(range(0, n, share)):
        ids = [f"load-{i}" for i in range(first, min(n, first + share))]
        config = LoadConfig(
            "127.0.0.1", daemon.video_port, "localhost", str(ws.pki.ca_cert),
            senders=[(i, ws.tokens[i]) for i in ids], first_index=first,
        )  # fmt: skip
        path = ws.root / f"load-{n}-{k}.json"
        config.save(path)
        argv = [sys.executable, "-m", "avd.loadgen", str(path)]
        children.append(ws.spawn(f"loadgen {k}", argv, _env()))
    return children


def finish_loadgen(child: Child) -> dict[str, Any]:
    child.stop(timeout=30)
    _, match = child.wait_for(r"loadgen report (.*)", timeout=1)
    report: dict[str, Any] = json.loads(match.group(1))
    return report


def _delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def _wait_counted(daemon: Receiving, before: Samples, sent: int) -> Samples:
    """The daemon's metrics once it has counted ``sent`` more frames, or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        after = scrape(daemon.url)
        counted = _delta(after, before, "avd_frames_received_total", stream="video")
        if counted >= sent or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def _video_packets(path: Path) -> int:
    import av  # noqa: PLC0415 - PyAV loads slowly
    import av.error  # noqa: PLC0415

    count = 0
    try:
        with av.open(str(path)) as container:
            video = [s for s in container.streams if s.type == "video"]
            count += sum(1 for packet in container.demux(*video) if packet.size)
    except av.error.FFmpegError:
        pass  # a segment still being written ends mid-packet: what was read counts
    return count


def recorded_frames(record_dir: Path) -> int:
    """Video packets in every segment under ``record_dir`` (open ones up to where they are)."""
    return sum(_video_packets(path) for path in record_dir.rglob("*.mkv"))


def _wait_recorded(record_dir: Path, before: int, expected: int) -> int:
    """How many video packets were added since ``before``, once ``expected`` or settled.

    Counted over every segment, not only new ones: a sender back within the recorder's grace
    may go on in the segment it had.
    """
    count, settled_at = -1, time.monotonic()
    while True:
        added = recorded_frames(record_dir) - before
        if added >= expected or (added == count and time.monotonic() - settled_at > 1):
            return added
        if added != count:
            count, settled_at = added, time.monotonic()
        time.sleep(0.25)


def run_step(ws: Workspace, daemon: Receiving, n: int, plan: Plan, record_dir: Path) -> Step:
    step, before, recorded_before = Step(n), scrape(daemon.url), recorded_frames(record_dir)
    generators = start_loadgens(ws, daemon, n)
    try:
        for g in generators:
            _, match = g.wait_for(r"loadgen connected=\d+ failed=(\d+)", timeout=30 + n / 10)
            if int(match.group(1)):
                step.problems.append(f"{match.group(1)} senders could not connect")
        time.sleep(1.0)  # every session past its first heartbeat: latency is measured
        start = scrape(daemon.url)
        meters = [procstat.CpuMeter(c.pid) for c in (daemon.child, *generators)]
        time.sleep(plan.step_s)
        cpu = [m.percent() for m in meters]
        end, elapsed = scrape(daemon.url), meters[0].elapsed_s
        step.rss_bytes = procstat.rss_bytes(daemon.child.pid)
    finally:
        reports = [finish_loadgen(g) for g in generators]
    step.receiver_cpu_pct, step.loadgen_cpu_pct = cpu[0], sum(cpu[1:])
    step.loadgen_lag_ms = max(r["lag_p99_ms"] for r in reports)
    step.received_fps = _delta(end, start, "avd_frames_received_total", stream="video") / elapsed
    _judge(step, start, end, reports)
    sent = sum(sum(r["sent"].values()) for r in reports)
    after = _wait_counted(daemon, before, sent)
    missing = sent - _delta(after, before, "avd_frames_received_total", stream="video")
    rejected = _delta(after, before, "avd_frames_rejected_total")
    unrecorded = sent - _wait_recorded(record_dir, recorded_before, sent)
    for count, what in (
        (missing, "frames sent but not counted by the receiver"),
        (rejected, "frames rejected"),
        (unrecorded, "frames missing from the recordings"),
    ):
        if count > 0:
            step.problems.append(f"{count:.0f} {what}")
    return step


def _judge(step: Step, start: Samples, end: Samples, reports: list[dict[str, Any]]) -> None:
    buckets = latency_buckets(start, end, "video")
    p99 = histogram_quantile(0.99, buckets)
    step.p99_ms = None if p99 is None else p99 * 1000
    observed = buckets[-1][1] if buckets else 0
    within = sum(count for bound, count in buckets if bound == 0.05)  # a bucket boundary
    if not observed or within < 0.99 * observed:
        step.problems.append(f"p99 latency at or over 50 ms ({_ms(step.p99_ms)})")
    wanted = step.senders * VGA.fps
    if step.received_fps < 0.95 * wanted:
        step.problems.append(f"received {step.received_fps:.0f} frames/s of {wanted}")
    for key, what in (
        ("skipped", "frames skipped: sessions backed up"),
        ("closed_early", "sessions closed by the receiver"),
        ("unflushed", "sessions still backed up 15 s after the end"),
    ):
        if count := sum(r[key] for r in reports):
            step.problems.append(f"{count} {what}")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def ramp(ws: Workspace, daemon: Receiving, plan: Plan, record_dir: Path) -> list[Step]:
    """Steps of more senders until one fails; the full run then tries halfway, once."""
    steps: list[Step] = []
    for n in plan.steps:
        progress(f"{n} senders at 20 fps...")
        steps.append(run_step(ws, daemon, n, plan, record_dir))
        if not steps[-1].passed:
            break
    if not plan.quick and len(steps) > 1 and not steps[-1].passed:
        low, high = steps[-2].senders, steps[-1].senders
        middle = (low + high) // 2 // 10 * 10
        if low < middle < high:
            progress(f"{middle} senders at 20 fps...")
            steps.append(run_step(ws, daemon, middle, plan, record_dir))
    return steps


# ---- the whole run ---------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


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
        "latency_p50_ms": _percentile(end_to_end, 0.5),
        "latency_p99_ms": _percentile(end_to_end, 0.99),
        "frames": len(cam),
        "transport_p50_ms": _percentile([(a - c) / 1000 for c, a, *_ in cam], 0.5),
        "decode_p50_ms": _percentile([(d - a) / 1000 for _, a, d, *_ in cam], 0.5),
        "imdecode_p50_ms": _percentile([r[4] / 1000 for r in cam], 0.5),
        "audio_latency_p99_ms": _percentile([(a - c) / 1000 for c, a in tone], 0.99),
        "chunks": len(tone),
        "throughput_fps": len(fast) * 1e6 / (throughput_window[1] - throughput_window[0]),
        "undecodable": sum(not r[3] for r in cam + fast),
    }


@dataclass
class Outcome:
    figures: dict[str, float]
    probe: dict[str, float]
    cpu: CpuFigures
    reconnects: list[float]
    steps: list[Step]
    bandwidth: list[tuple[str, float, float]]
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)  # other tenants of the machine


def run(plan: Plan, root: Path) -> Outcome:
    load_before = os.getloadavg()
    progress("JPEG encode and decode of the 640x480 q70 test pattern...")
    codec = measure_codec(plan.codec_frames)
    bandwidth = bandwidth_rows()
    ws = make_workspace(root, max(plan.steps))
    try:
        outcome = _run_daemons(plan, ws, codec, bandwidth)
    finally:
        for n, child in enumerate(ws.children):
            child.kill()
            name = re.sub(r"\W+", "-", child.name)
            log = "".join(f"{line}\n" for _, line in child.lines)
            (ws.root / f"{n:02d}-{name}.log").write_text(log)  # kept with --keep
    outcome.load_before = load_before
    return outcome


def _run_daemons(
    plan: Plan, ws: Workspace, codec: Codec, bandwidth: list[tuple[str, float, float]]
) -> Outcome:
    progress("starting a probe receiver and the avd-receiver daemon (TLS, tokens, recording)...")
    rows_path, record_dir = ws.root / "probe.json", ws.root / "recordings"
    probe = start_receiver(ws, ws.root / "probe-recordings", probe=rows_path)
    daemon = start_receiver(ws, record_dir)
    time.sleep(1.0)  # the daemon is idle from here to the CPU run
    idle = procstat.CpuMeter(daemon.child.pid)
    progress(f"latency: avd-sender, 640x480 20 fps and a tone, {plan.window_s:g} s...")
    window = latency_phase(ws, probe, plan)
    progress(f"throughput: one unthrottled stream, {plan.throughput_s:g} s...")
    meters = procstat.CpuMeter(os.getpid()), procstat.CpuMeter(probe.child.pid)
    fast_window = asyncio.run(unthrottled_stream(ws, probe, plan.throughput_s))
    sides = [m.percent() for m in meters]
    idle_cpu = idle.percent()
    probe.child.stop()
    measured = analyse_probe(json.loads(rows_path.read_text()), window, fast_window)
    measured["sender_side_cpu_pct"], measured["receiver_side_cpu_pct"] = sides
    progress(f"CPU: avd-sender to avd-receiver, {plan.cpu_s:g} s...")
    sender, cpu = cpu_phase(ws, daemon, plan)
    progress("reconnection: avd-receiver killed (-9) and started again...")
    daemon, reconnects = reconnect_phase(ws, daemon, record_dir, plan.reconnect_tries)
    sender.stop()
    time.sleep(0.5)  # the session has ended: the baseline holds no sender
    baseline = procstat.rss_bytes(daemon.child.pid)
    steps = ramp(ws, daemon, plan, record_dir)
    daemon.child.stop()
    passed = [s for s in steps if s.passed]
    best = max(passed, key=lambda s: s.senders) if passed else steps[0]
    figures = {
        "encode_fps": codec.encode_fps,
        "decode_fps": codec.decode_fps,
        "floor_ms": codec.floor_ms,
        "latency_p50_ms": measured["latency_p50_ms"],
        "latency_p99_ms": measured["latency_p99_ms"],
        "throughput_fps": measured["throughput_fps"],
        "audio_latency_p99_ms": measured["audio_latency_p99_ms"],
        "max_senders": best.senders if passed else 0,
        "sender_cpu_pct": cpu.sender_pct,
        "receiver_cpu_pct": cpu.receiver_pct,
        "receiver_idle_cpu_pct": idle_cpu,
        "reconnect_s": max(reconnects),
        "receiver_rss_per_sender_mb": (best.rss_bytes - baseline) / best.senders / MIB,
    }
    return Outcome(figures, measured, cpu, reconnects, steps, bandwidth)


# ---- the report ------------------------------------------------------------------------


def _targets(f: dict[str, float], quick: bool) -> dict[str, tuple[str, bool]]:
    floor, slowest = f["floor_ms"], min(f["encode_fps"], f["decode_fps"])
    cap = " (the --quick cap)" if quick else ""
    return {
        "latency_p99_ms": (f"<= {2 * floor:.2f} ms (2x floor)", f["latency_p99_ms"] <= 2 * floor),
        "throughput_fps": (
            f">= {0.9 * slowest:.0f} fps (90% of min(encode, decode))",
            f["throughput_fps"] >= 0.9 * slowest,
        ),
        "max_senders": (f">= 200{cap}", f["max_senders"] >= 200),
        "sender_cpu_pct": ("<= 5 % of a core", f["sender_cpu_pct"] <= 5),
        "receiver_idle_cpu_pct": ("< 0.5 % of a core", f["receiver_idle_cpu_pct"] < 0.5),
        "reconnect_s": ("<= 1 s", f["reconnect_s"] <= 1),
        "receiver_rss_per_sender_mb": ("<= 2 MiB", f["receiver_rss_per_sender_mb"] <= 2),
    }


ROWS = (  # key, label, format of the value with its unit
    ("encode_fps", "JPEG encode 640x480 q70", "{:.0f} fps"),
    ("decode_fps", "JPEG decode 640x480 q70", "{:.0f} fps"),
    ("floor_ms", "floor: encode + decode", "{:.2f} ms"),
    ("latency_p50_ms", "latency p50, 20 fps", "{:.2f} ms"),
    ("latency_p99_ms", "latency p99, 20 fps", "{:.2f} ms"),
    ("throughput_fps", "throughput, one stream", "{:.0f} fps"),
    ("audio_latency_p99_ms", "audio latency p99", "{:.2f} ms"),
    ("max_senders", "senders on one receiver", "{:.0f}"),
    ("sender_cpu_pct", "sender CPU, 640x480 20 fps", "{:.2f} %"),
    ("receiver_cpu_pct", "receiver CPU per stream", "{:.2f} %"),
    ("receiver_idle_cpu_pct", "receiver CPU, idle", "{:.2f} %"),
    ("reconnect_s", "reconnection", "{:.2f} s"),
    ("receiver_rss_per_sender_mb", "receiver memory/sender", "{:.2f} MiB"),
)


NOTES = """\
What was measured:
  JPEG         cv2 encode and decode of the sender's camera-like test pattern, in this process
               (median of 3 runs); floor = one encode + one decode, per frame.
  latency      avd-sender (test pattern 640x480 20 fps q70, capture stamped before encode) ->
               TLS -> the receiver's code (avd.receiver with its recorder) -> decoded there with
               cv2.imdecode on arrival: capture stamp to decoded, exact per frame ({frames} frames;
               p50 of capture to arrival {transport:.2f} ms, of arrival to decoded {decode:.2f} ms,
               of which imdecode {imdecode:.2f} ms). The daemon's own histogram (capture to
               arrival, clock offset corrected, interpolated between buckets) said p50 {hist50},
               p99 {hist99} in the CPU run.
  throughput   one in-process StreamClient: the encoder runs as fast as the stream takes frames
               (no drops), the probe receiver decodes each one; frames decoded per second.
               CPU meanwhile: sender side {tput_tx:.0f} %, receiver side {tput_rx:.0f} % of a core.
  audio        the sender's test tone ({chunks} chunks of 1024 at 44.1 kHz): arrival minus the
               chunk's stamp, which the tone source gives the instant the chunk is complete, so
               the chunk's own 23.2 ms is not in the figure.
  CPU          /proc/<pid>/stat of the avd-sender process (video only, test pattern: drawing a
               frame ~0.2 ms is in it) and of the avd-receiver daemon with that one stream;
               idle: the daemon with no sender, recording on, during the latency and
               throughput runs (which go to the probe receiver).
  reconnection avd-receiver killed with SIGKILL and started again on the same ports: its
               "listening" log line to the first frame its metrics count: worst of {tries}
               ({tries_s} s).
  senders      avd.loadgen processes: N TLS sessions, each with its own token and loopback
               address, pre-encoded test-pattern frames at 20 fps. A step passes with every
               frame counted, none rejected, none missing from the recordings, at least 95 %
               of N x 20 frames/s received and p99 capture-to-arrival under 50 ms (the daemon's
               histogram has a 50 ms bucket boundary). Memory: VmRSS growth over the idle
               daemon, divided by N, at the largest step that passed."""


def render(o: Outcome, plan: Plan, seconds: float) -> str:
    targets = _targets(o.figures, plan.quick)
    load = ", ".join(f"{x:.2f}" for x in o.load_before)
    lines = [
        f"avd bench{' --quick' if plan.quick else ''}: {os.cpu_count()} cores, {seconds:.0f} s; "
        f"load average before the run {load} (others' work skews the figures)",
        "",
        f"{'figure':26} {'measured':>14}   {'target':44} met",
    ]
    for key, label, unit in ROWS:
        target, met = targets.get(key, ("", True))
        shown = unit.format(o.figures[key])
        verdict = ("yes" if met else "NO") if target else ""
        lines.append(f"{label:26} {shown:>14}   {target:44} {verdict}")
    c, p = o.cpu, o.probe
    lines += ["", NOTES.format(
        frames=int(p["frames"]), transport=p["transport_p50_ms"], decode=p["decode_p50_ms"],
        imdecode=p["imdecode_p50_ms"], hist50=_ms(c.histogram_p50_ms),
        hist99=_ms(c.histogram_p99_ms), chunks=int(p["chunks"]), tries=len(o.reconnects),
        tries_s=", ".join(f"{t:.2f}" for t in o.reconnects),
        tput_tx=p["sender_side_cpu_pct"], tput_rx=p["receiver_side_cpu_pct"],
    )]  # fmt: skip
    lines += ["", _steps_table(o.steps), "", _bandwidth_table(o.bandwidth)]
    return "\n".join(lines)


def _steps_table(steps: list[Step]) -> str:
    lines = [
        "senders  frames/s  p99 arrival  receiver CPU  per stream  RSS MiB  loadgen CPU  result",
    ]
    for s in steps:
        result = "pass" if s.passed else "FAIL: " + "; ".join(s.problems)
        lines.append(
            f"{s.senders:7}  {s.received_fps:8.0f}  {_ms(s.p99_ms):>11}  "
            f"{s.receiver_cpu_pct:10.1f} %  {s.receiver_cpu_pct / s.senders:8.2f} %  "
            f"{s.rss_bytes / MIB:7.0f}  {s.loadgen_cpu_pct:9.1f} %  {result}"
        )
    return "\n".join(lines)


def _bandwidth_table(rows: list[tuple[str, float, float]]) -> str:
    lines = [
        "Bandwidth (offline: test-pattern frames encoded here, not sent; TLS records add",
        "about 22 bytes per 16 KiB more):",
        f"  {'setting':32} {'payload kbit/s':>15} {'with avd framing':>17}",
    ]
    lines += [f"  {name:32} {payload:15.0f} {framed:17.0f}" for name, payload, framed in rows]
    return "\n".join(lines)


def as_json(figures: dict[str, float]) -> str:
    values = {k: round(figures[k], 3) for k in KEYS}
    values["max_senders"] = int(figures["max_senders"])
    return json.dumps(values)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="avd bench",
        description="Measure latency, throughput, CPU, memory, reconnection and scale on this "
        "machine, through the real daemons (TLS, tokens, recording), against the targets.",
    )
    parser.add_argument("--quick", action="store_true", help="under a minute; caps the scale")
    parser.add_argument("--json", action="store_true", help="end with the figures as JSON")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    plan, started = (QUICK if args.quick else FULL), time.monotonic()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # so that cleanup runs
    try:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            outcome = run(plan, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="avd-bench-") as workdir:
                outcome = run(plan, Path(workdir))
    except (RuntimeError, OSError) as exc:
        print(f"avd bench: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(render(outcome, plan, time.monotonic() - started))
    if args.json:
        print(as_json(outcome.figures))
    return 0
