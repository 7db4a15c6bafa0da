"""Scale: ``avd.loadgen`` processes against the receiver daemon, in steps of more senders.

Each step starts enough generator processes for N pre-encoded 20 fps senders, measures the
daemon's CPU, memory and received rate, then checks that every frame sent was counted, none
rejected and none missing from the recordings (counted packet by packet with PyAV). Each
step first deletes the recordings before it, so the ramp needs the room of its largest step,
not of all of them (over 3 GB by 400 senders, in a temporary folder that may be RAM), and
the last step's are there to look at with ``--keep``. A step whose recordings would not fit
is not run, rather than failed for a full disk. The ramp stops at the first step that fails
or does not fit. A step that failed while the generators themselves ran
late (``GENERATOR_LAG_BAR_MS``) did not offer the load it names: the full run marks it void
and runs it once more.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avd import procstat
from avd.bench.daemons import Child, Receiving, Workspace, child_env, start_receiver
from avd.bench.plan import VGA, Plan, format_ms, progress
from avd.demo import Samples, histogram_quantile, latency_buckets, scrape, total
from avd.loadgen import LoadConfig

SENDERS_PER_LOADGEN = 250  # one generator process stays near a third of a core at 250 x 20 fps
# A generator whose frames went out this late behind their slots (p99) did not send N x 20
# frames/s on time: the machine stalled under it (another tenant, or the host), and a
# failure then says nothing sure about the receiver. The same bar the receiver is held to.
GENERATOR_LAG_BAR_MS = 50.0
# How long a step's senders stream, beyond its measured window: connecting, the settling
# second before it and stopping after (about 2 s at 400 senders here), with room to spare.
STEP_OVERHEAD_S = 5.0


@dataclass
class Step:
    senders: int
    problems: list[str] = field(default_factory=list)
    received_fps: float = 0.0
    p99_ms: float | None = None
    receiver_cpu_pct: float = 0.0
    rss_bytes: int = 0
    rss_idle_bytes: int = 0  # the same daemon's before its first step, with no sender
    loadgen_cpu_pct: float = 0.0  # all generator processes together
    loadgen_lag_ms: float = 0.0  # the worst generator's p99 lateness behind its schedule
    void: bool = False  # failed while the generators ran late: run once more
    not_run: str = ""  # why the step was not run (no room for its recordings)

    @property
    def passed(self) -> bool:
        return not self.problems and not self.not_run

    @property
    def generators_kept_up(self) -> bool:
        return self.loadgen_lag_ms < GENERATOR_LAG_BAR_MS

    @property
    def rss_per_sender_bytes(self) -> float:
        if not self.rss_bytes:  # not measured: the step was not run
            return 0.0
        return (self.rss_bytes - self.rss_idle_bytes) / self.senders


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
        children.append(ws.spawn(f"loadgen {k}", argv, child_env()))
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


def recording_bytes(n: int, plan: Plan, frame_bytes: float) -> float:
    """About how much a step of ``n`` senders records: every frame it sends."""
    return n * VGA.fps * frame_bytes * (plan.step_s + STEP_OVERHEAD_S)


def free_bytes(path: Path) -> int:
    """Free space for ``path``, which may not exist yet (the recorder makes its folder)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def clear_recordings(record_dir: Path) -> None:
    """Delete every finished segment under ``record_dir``: the steps before were counted.

    The folders stay: the recorder makes a sender's folder once. A segment the recorder still
    had open would only lose its name (the writer keeps its file until it closes it), but the
    sessions of the steps before have all ended, and their segments with them.
    """
    for path in record_dir.rglob("*.mkv"):
        path.unlink(missing_ok=True)


def run_step(
    ws: Workspace, daemon: Receiving, n: int, plan: Plan, record_dir: Path, *, rss_idle_bytes: int
) -> Step:
    """One step of ``n`` senders; ``rss_idle_bytes``: the daemon's memory with none."""
    step = Step(n, rss_idle_bytes=rss_idle_bytes)
    before, recorded_before = scrape(daemon.url), recorded_frames(record_dir)
    generators = start_loadgens(ws, daemon, n)
    try:
        for g in generators:
            _, match = g.wait_for(r"loadgen connected=\d+ failed=(\d+)", timeout=30 + n / 10)
            if int(match.group(1)):
                step.problems.append(f"{match.group(1)} senders could not connect")
        time.sleep(1.0)  # every session past its first heartbeat: latency is measured
        start = scrape(daemon.url)
        meters = [procstat.CpuMeter(c.pid, tree=True) for c in (daemon.child, *generators)]
        time.sleep(plan.step_s)
        cpu = [m.percent() for m in meters]
        end, elapsed = scrape(daemon.url), meters[0].elapsed_s
        step.rss_bytes = procstat.rss_bytes(daemon.child.pid, tree=True)
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
        step.problems.append(f"p99 latency at or over 50 ms ({format_ms(step.p99_ms)})")
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


def _attempt(
    ws: Workspace,
    daemon: Receiving,
    n: int,
    plan: Plan,
    record_dir: Path,
    *,
    rss_idle_bytes: int,
    frame_bytes: float,
) -> list[Step]:
    """One step of ``n`` senders if its recordings fit; in the full run, again if void."""
    clear_recordings(record_dir)
    need, free = recording_bytes(n, plan, frame_bytes), free_bytes(record_dir)
    if need > free:
        reason = (
            f"not run: {n} senders record about {need / 1e9:.1f} GB and {record_dir.parent} "
            f"has {free / 1e9:.1f} GB free (set TMPDIR, or --keep a folder on a larger disk)"
        )
        progress(reason)
        return [Step(n, rss_idle_bytes=rss_idle_bytes, not_run=reason)]
    step = run_step(ws, daemon, n, plan, record_dir, rss_idle_bytes=rss_idle_bytes)
    if step.passed or step.generators_kept_up or plan.quick:
        return [step]
    step.void = True
    progress(
        f"{n} senders again: the load generators ran {step.loadgen_lag_ms:.0f} ms behind "
        "their schedule (p99), so the machine stalled under the step..."
    )
    clear_recordings(record_dir)
    return [step, run_step(ws, daemon, n, plan, record_dir, rss_idle_bytes=rss_idle_bytes)]


def ramp(
    ws: Workspace, daemon: Receiving, plan: Plan, record_dir: Path, *, frame_bytes: float
) -> tuple[list[Step], Receiving]:
    """Steps of more senders until one fails; the full run then tries halfway, once.

    ``frame_bytes``: the mean JPEG size the load generators send, to tell whether a step's
    recordings fit. Returns the steps (a void one followed by its second run, or one not run)
    and the daemon now running: the halfway step gets a daemon started afresh, because
    memory the allocator kept from the larger, failed step is not the halfway step's.
    """
    steps: list[Step] = []
    idle = procstat.rss_bytes(daemon.child.pid, tree=True)
    passed = 0
    for n in plan.steps:
        progress(f"{n} senders at 20 fps...")
        steps += _attempt(
            ws, daemon, n, plan, record_dir, rss_idle_bytes=idle, frame_bytes=frame_bytes
        )
        if not steps[-1].passed:
            break
        passed = n
    if not plan.quick and passed and not steps[-1].passed:
        middle = (passed + steps[-1].senders) // 2 // 10 * 10
        if passed < middle < steps[-1].senders:
            daemon.child.stop()
            daemon = start_receiver(ws, record_dir, (daemon.video_port, daemon.audio_port))
            time.sleep(1.0)  # as before the ramp: started, idle
            idle = procstat.rss_bytes(daemon.child.pid, tree=True)
            progress(f"{middle} senders at 20 fps (a receiver started afresh)...")
            steps += _attempt(
                ws, daemon, middle, plan, record_dir, rss_idle_bytes=idle, frame_bytes=frame_bytes
            )
    return steps, daemon
