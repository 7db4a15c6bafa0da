"""avd and its Python peers, measured one after the other in the same run.

Every system gets the same work: avd's camera-like 640x480 test pattern, JPEG quality 70,
one stream from a sender process to a receiver process on loopback; the receiver decodes
every frame, as a live view would. Per system:

- idle: the receiver's CPU with no sender, over ``idle_s``;
- latency: a sender at 20 fps for ``window_s`` after a 1 s warm-up, from the capture stamp
  (CLOCK_MONOTONIC, before encoding) to the frame decoded in the receiver; the CPU of both
  processes over the same window;
- throughput: a sender as fast as the system takes frames, encode and decode in the loop,
  frames decoded per second over ``throughput_s`` after a 1 s warm-up.

With several rounds, each system is measured once per round, the rounds interleaved; the
latency percentiles are over the frames of all rounds, the other figures are medians.

avd runs exactly as ``avd bench`` runs it: the real ``avd-sender`` daemon (video only, like
the peers) to the bench's probe receiver (the daemon's receiver with its recorder, plus a
decoding sink), then the bench's unthrottled client. TLS 1.3, tokens and recording are on;
the peers have none of them.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from avd import eventloop, procstat
from avd.bench.daemons import (
    Child,
    Workspace,
    child_env,
    start_receiver,
    start_sender,
    wait_for_frames,
)
from avd.bench.phases import unthrottled_stream
from avd.clock import monotonic_us
from avd.stats import percentile

PEERS = ("imagezmq", "netgear")
LABELS = {
    "avd": "avd (TLS 1.3, tokens, recording)",
    "imagezmq": "imagezmq REQ/REP",
    "netgear": "vidgear NetGear REQ/REP",
}
REPO = Path(__file__).resolve().parents[2]
WARM_UP_S = 1.0
Rows = Sequence[tuple[int, int]]  # (capture µs, decoded µs)


@dataclass(frozen=True)
class Durations:
    window_s: float
    throughput_s: float
    idle_s: float


@dataclass
class Figures:
    latency_p50_ms: float
    latency_p99_ms: float
    frames: int  # decoded in the latency window
    throughput_fps: float
    sender_cpu_pct: float
    receiver_cpu_pct: float
    receiver_idle_cpu_pct: float


def latency_ms(rows: Rows, window: tuple[int, int]) -> list[float]:
    """Capture to decoded, in ms, of the frames captured inside ``window`` (µs)."""
    return [
        (decoded - captured) / 1000
        for captured, decoded in rows
        if window[0] <= captured <= window[1]
    ]


def frames_per_second(rows: Rows, window: tuple[int, int]) -> float:
    """Frames decoded inside ``window`` (µs), per second."""
    decoded = sum(window[0] <= d <= window[1] for _, d in rows)
    return decoded * 1e6 / (window[1] - window[0])


@dataclass
class Sample:
    """One round of one system: what ``combine`` pools with the other rounds."""

    latencies_ms: list[float]
    throughput_fps: float
    cpu: dict[str, float]  # sender, receiver (at 20 fps) and idle, % of one core


def sample(
    slow: Rows,
    window: tuple[int, int],
    fast: Rows,
    fast_window: tuple[int, int],
    cpu: dict[str, float],
) -> Sample:
    latencies = latency_ms(slow, window)
    if not latencies:
        raise RuntimeError("no frame was decoded in the latency window")
    return Sample(latencies, frames_per_second(fast, fast_window), cpu)


def combine(samples: Sequence[Sample]) -> Figures:
    """Latency percentiles over every round's frames; medians of the other figures."""
    latencies = [ms for s in samples for ms in s.latencies_ms]
    return Figures(
        latency_p50_ms=percentile(latencies, 0.5),
        latency_p99_ms=percentile(latencies, 0.99),
        frames=len(latencies),
        throughput_fps=statistics.median(s.throughput_fps for s in samples),
        sender_cpu_pct=statistics.median(s.cpu["sender"] for s in samples),
        receiver_cpu_pct=statistics.median(s.cpu["receiver"] for s in samples),
        receiver_idle_cpu_pct=statistics.median(s.cpu["idle"] for s in samples),
    )


def _idle_cpu(pid: int, seconds: float) -> float:
    time.sleep(WARM_UP_S)  # past start-up: imports, the recorder's child, first allocations
    meter = procstat.CpuMeter(pid, tree=True)
    time.sleep(seconds)
    return meter.percent()


def _window(
    receiver_pid: int, sender_pid: int, seconds: float
) -> tuple[tuple[int, int], dict[str, float]]:
    """After the warm-up: a window of ``seconds`` and both processes' CPU over it."""
    time.sleep(WARM_UP_S)
    receiver, sender = procstat.CpuMeter(receiver_pid, tree=True), procstat.CpuMeter(sender_pid)
    start = monotonic_us()
    time.sleep(seconds)
    cpu = {"receiver": receiver.percent(), "sender": sender.percent()}
    return (start, monotonic_us()), cpu


def measure_avd(ws: Workspace, d: Durations) -> Sample:
    rows_path = ws.root / "avd-probe.json"
    probe = start_receiver(ws, ws.root / "avd-recordings", probe=rows_path)
    idle = _idle_cpu(probe.child.pid, d.idle_s)
    sender = start_sender(ws, "bench-cam", probe, audio=False)
    try:
        wait_for_frames(probe, "bench-cam", sender)
        window, cpu = _window(probe.child.pid, sender.pid, d.window_s)
    finally:
        sender.stop()
    fast_window = eventloop.run(unthrottled_stream(ws, probe, d.throughput_s))
    if probe.child.stop() != 0:
        raise RuntimeError("the probe receiver did not stop cleanly")
    video = json.loads(rows_path.read_text())["video"]
    slow = [(row[0], row[2]) for row in video.get("bench-cam", [])]
    fast = [(row[0], row[2]) for row in video.get("bench-tput", [])]
    return sample(slow, window, fast, fast_window, cpu | {"idle": idle})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(ws: Workspace, peer: str, role: str, port: int, *args: str) -> Child:
    argv = [sys.executable, "-m", "tests.peers.workers", peer, role, "--port", str(port), *args]
    child = ws.spawn(f"{peer} {role}", argv, child_env(PYTHONPATH=str(REPO)))
    child.wait_for(r"^ready$")
    return child


def _finish(child: Child, timeout: float) -> None:
    """Waits for a worker to end by itself: the peers may hang, so not forever."""
    try:
        code = child.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        raise RuntimeError(f"{child.name} did not finish within {timeout:g} s") from None
    if code != 0:
        tail = "\n".join(line for _, line in child.lines[-15:])
        raise RuntimeError(f"{child.name} exited with {code}:\n{tail}")


def _peer_run(
    ws: Workspace, peer: str, fps: float, seconds: float, idle_s: float = 0.0
) -> tuple[Rows, tuple[int, int], dict[str, float]]:
    """One receiver and one sender of ``peer``: the rows, the window and the CPU figures."""
    port, rows_path = _free_port(), ws.root / f"{peer}-{fps:g}fps.json"
    receiver = _worker(ws, peer, "receive", port, "--rows", str(rows_path))
    cpu = {"idle": _idle_cpu(receiver.pid, idle_s)} if idle_s else {}
    sender = _worker(
        ws, peer, "send", port, "--fps", str(fps), "--seconds", str(WARM_UP_S + seconds + 0.5)
    )
    window, measured = _window(receiver.pid, sender.pid, seconds)
    _finish(sender, 30)
    _finish(receiver, 30)
    rows = [(int(c), int(d)) for c, d in json.loads(rows_path.read_text())]
    return rows, window, cpu | measured


def measure_peer(ws: Workspace, peer: str, d: Durations) -> Sample:
    slow, window, cpu = _peer_run(ws, peer, 20, d.window_s, d.idle_s)
    fast, fast_window, _ = _peer_run(ws, peer, 0, d.throughput_s)
    return sample(slow, window, fast, fast_window, cpu)


def measure_all(
    ws: Workspace, d: Durations, peers: Sequence[str] = PEERS, rounds: int = 1
) -> dict[str, Figures]:
    """Every system once per round, each round starting one system later: a machine that
    slows down or speeds up during the run weighs on all of them alike."""
    systems = ["avd", *peers]
    samples: dict[str, list[Sample]] = {name: [] for name in systems}
    for r in range(rounds):
        for name in systems[r % len(systems) :] + systems[: r % len(systems)]:
            measured = measure_avd(ws, d) if name == "avd" else measure_peer(ws, name, d)
            samples[name].append(measured)
    return {name: combine(samples[name]) for name in systems}


def as_dict(results: dict[str, Figures]) -> dict[str, dict[str, float]]:
    return {name: asdict(f) for name, f in results.items()}
