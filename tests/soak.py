"""``python -m tests.soak``: several real senders streaming for minutes through repeated faults.

A command, not a unit test (``tests/test_soak.py`` runs it briefly so it keeps working). It
starts one real avd-receiver (recording, no playback) and N real avd-senders (test sources,
video and audio); each sender's two streams go through a ``FaultProxy`` of their own, so a
fault hits one sender. Every 10-20 s a random healthy sender gets the next fault of a shuffled
cycle: a reset, a 5-10 s stall, a 200 ms delay, a video throttle, a short refusal. Every
``--restart-every`` seconds the receiver is SIGKILLed and started again on the same ports.
Every 5 s it samples each daemon's RSS, open descriptors and counters.

At the end it heals every path, waits until every frame captured by a cut-off is finished
(``captured - spooled >= cut-off``), stops the daemons with SIGTERM and reads every recorded
packet's stamped sequence number with PyAV. The report gives, per sender and stream, frames
captured / sent / received / backfilled / lost (spool eviction) / recorded, the frames below
the cut-off missing from the recordings or recorded twice; per daemon, RSS at start, end and
max, its growth per minute and its descriptors; then a verdict. Exit 0 if the verdict is
good, 1 if not; ``--json`` prints the summary as JSON on the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avd.certs import SHORT_LIVED_DAYS, init_certs

from .conftest import (
    Credentials,
    Daemon,
    ReceiverHandle,
    metric,
    receiver_env,
    scrape,
    sender_env,
    start_receiver,
)
from .faultproxy import FaultProxy
from .procwatch import open_fds, rss_kb

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
STREAMS = ("video", "audio")
FAULTS = ("reset", "stall", "delay", "throttle", "refuse")
SAMPLE_EVERY_S = 5.0
# Memory growth is measured after a warm-up. A sender's buffers reach their usual peaks within
# two minutes of faults. A receiver's RSS climbs for about six minutes after each start (25-min
# run: 73 MiB at start, 90 at 6 min, 90.4 at 19 min): its duplicate index fills for 120 s, and
# every sender's backfill of an outage lands on top.
SENDER_WARMUP_S = 120.0
RECEIVER_WARMUP_S = 360.0  # from each start of the receiver: a restart warms up again
MIN_JUDGED_S = 60.0  # a slope over less time than this after the warm-up is shown, not judged
# A stall or throttle may still push a sender's buffers to a new peak (about 1 MiB a step): a
# healthy 3-minute run reads up to ~2 MiB/min, a 25-minute one 0.3 at most. A leak keeps
# climbing: run longer (--restart-every 0 for the receiver) to tell a slow one from a peak.
MAX_GROWTH_MB_MIN = 3.0
SPOOL_SECONDS = 30.0  # the senders' default AVD_SPOOL_SECONDS: a longer outage may lose frames
THROTTLE_BYTES_PER_S = 100_000  # well under a 640x480 q70 stream at 20 fps
SENDER_COUNTERS = {
    name: f"avd_frames_{name}_total"
    for name in ("captured", "sent", "dropped", "backfilled", "lost")
} | {"reconnects": "avd_reconnects_total"}
RECEIVER_COUNTERS = ("received", "late")


@dataclass(frozen=True)
class Options:
    minutes: float
    senders: int
    restart_every_s: float
    max_growth_mb_min: float
    seed: int
    keep: bool
    json: bool


@dataclass
class Peer:
    """One sender daemon and the two proxies its streams go through."""

    sender_id: str
    daemon: Daemon
    metrics_url: str
    proxies: tuple[FaultProxy, FaultProxy]  # video, audio
    fault: str | None = None
    heal_at: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    longest_outage_s: float = 0.0
    last: Samples = field(default_factory=dict)


@dataclass
class Point:
    t: float
    incarnation: int
    rss_kb: int
    fds: int


class Soak:
    """The daemons, the proxies, the fault schedule and what was sampled."""

    def __init__(self, opts: Options, root: Path) -> None:
        self.opts, self.root = opts, root
        self.rng = random.Random(opts.seed)
        self.pki = init_certs(root / "pki", ["localhost", "127.0.0.1"], days=SHORT_LIVED_DAYS)
        self.creds = Credentials(root / "tokens")
        self.record_dir = root / "recordings"
        (root / "logs").mkdir()
        self.receiver: ReceiverHandle | None = None
        self.incarnation = 0
        self.peers: list[Peer] = []
        self.series: dict[str, list[Point]] = defaultdict(list)
        self.received_before: Counter[tuple[str, str, str]] = Counter()  # earlier incarnations
        self.receiver_last: Samples = {}
        self.restarts: list[dict[str, float]] = []
        self.findings: list[str] = []  # failures seen during the run
        self.t0 = time.monotonic()
        self._fault_cycle: list[str] = []

    # ---- daemons -----------------------------------------------------------------------

    def start(self) -> None:
        sender_ids = [f"soak{n}" for n in range(1, self.opts.senders + 1)]
        for sender_id in sender_ids:  # the receiver reads the tokens file at start
            self.creds.add(sender_id)
        self._start_receiver(video_port=0, audio_port=0)
        self.peers = [self._start_peer(sender_id) for sender_id in sender_ids]
        self._wait_until_all_stream()
        self.t0 = time.monotonic()

    def _wait_until_all_stream(self, timeout: float = 30.0) -> None:
        """Time starts once every stream is received: the first samples are steady ones."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._scrape_receiver()
            counts = self._receiver_counts()
            silent = [
                (p.sender_id, s)
                for p, s in _pairs(self)
                if not counts[(p.sender_id, s, "received")]
            ]
            if not silent:
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"soak: no frames from {silent} within {timeout:.0f} s; --keep keeps the logs"
        )

    def _start_receiver(self, video_port: int, audio_port: int) -> ReceiverHandle:
        self.incarnation += 1
        env = receiver_env(
            self.pki, self.creds.tokens_file,
            AVD_VIDEO_PORT=str(video_port), AVD_AUDIO_PORT=str(audio_port),
            AVD_RECORD_DIR=str(self.record_dir), AVD_LOG_LEVEL="INFO",
        )  # fmt: skip
        log = self.root / "logs" / f"receiver-{self.incarnation}.log"
        self.receiver = start_receiver(env, log)
        return self.receiver

    def _start_peer(self, sender_id: str) -> Peer:
        assert self.receiver is not None
        token = self.creds.tokens[sender_id]
        target = "127.0.0.1"
        proxies = (
            FaultProxy((target, self.receiver.video_port), buffer_bytes=256 * 1024).start(),
            FaultProxy((target, self.receiver.audio_port), buffer_bytes=256 * 1024).start(),
        )
        env = sender_env(
            self.pki, self.receiver, sender_id, token,
            AVD_VIDEO_PORT=str(proxies[0].port), AVD_AUDIO_PORT=str(proxies[1].port),
            AVD_LOG_LEVEL="INFO",
        )  # fmt: skip
        daemon = Daemon("sender", env, self.root / "logs" / f"{sender_id}.log")
        url = daemon.wait_for_log(r"metrics=(http://\S+)").group(1)
        return Peer(sender_id, daemon, url, proxies)

    def restart_receiver(self, now: float) -> None:
        """SIGKILL the receiver and start it again on the same ports (the proxies' targets)."""
        assert self.receiver is not None
        old = self.receiver
        self._scrape_receiver()  # its counters up to the kill
        for key, value in self._receiver_counts().items():
            self.received_before[key] += value
        self.receiver_last = {}
        old.daemon.kill()
        killed = time.monotonic()
        self._start_receiver(old.video_port, old.audio_port)
        downtime = time.monotonic() - killed
        self.restarts.append({"at_s": now - self.t0, "downtime_s": downtime})
        for peer in self.peers:
            peer.longest_outage_s = max(peer.longest_outage_s, downtime)

    # ---- faults ------------------------------------------------------------------------

    def inject_fault(self, now: float) -> None:
        healthy = [p for p in self.peers if p.fault is None and p.daemon.proc.poll() is None]
        if not healthy:
            return
        if not self._fault_cycle:  # every kind once per cycle, in a new order each time
            self._fault_cycle = self.rng.sample(FAULTS, len(FAULTS))
        peer, kind = self.rng.choice(healthy), self._fault_cycle.pop()
        duration = self._apply(peer, kind)
        peer.faults[kind] += 1
        if kind in ("stall", "refuse"):
            peer.longest_outage_s = max(peer.longest_outage_s, duration)
        if duration > 0:
            peer.fault, peer.heal_at = kind, now + duration

    def _apply(self, peer: Peer, kind: str) -> float:
        """Start fault ``kind`` on ``peer``'s paths; how long it lasts (0: instantaneous)."""
        both, uniform = peer.proxies, self.rng.uniform
        for proxy in both:
            if kind == "stall":
                proxy.blackhole(True)
            elif kind == "delay":
                proxy.delay(0.2)
            elif kind == "refuse":
                proxy.refuse(True)  # before the reset: the reconnections meet the refusal
            if kind in ("reset", "refuse"):
                proxy.reset()
        if kind == "throttle":
            both[0].throttle(THROTTLE_BYTES_PER_S)  # video only: audio fits any sane link
        durations = {"reset": (0.0, 0.0), "stall": (5, 10), "refuse": (2, 4)}
        return uniform(*durations.get(kind, (10, 20)))

    def heal_due(self, now: float, everything: bool = False) -> None:
        for peer in self.peers:
            if peer.fault is not None and (everything or now >= peer.heal_at):
                for proxy in peer.proxies:
                    proxy.heal()
                peer.fault = None

    # ---- sampling ----------------------------------------------------------------------

    def sample(self, now: float) -> None:
        """Memory and descriptors of every daemon, then their counters."""
        t = now - self.t0
        assert self.receiver is not None
        if self.receiver.daemon.proc.poll() is not None:
            code = self.receiver.daemon.proc.returncode
            self.findings.append(f"receiver exited by itself ({code}) at {t:.0f} s")
            self.restart_receiver(now)
        self._watch("receiver", self.receiver.daemon, t, self.incarnation)
        for peer in self.peers:
            self._watch(peer.sender_id, peer.daemon, t, 1)
        self.scrape_all()

    def scrape_all(self) -> None:
        self._scrape_receiver()
        for peer in self.peers:
            if peer.daemon.proc.poll() is None:
                with contextlib.suppress(OSError, urllib.error.URLError):
                    peer.last = scrape(peer.metrics_url)

    def _watch(self, name: str, daemon: Daemon, t: float, incarnation: int) -> bool:
        """Note ``daemon``'s memory and descriptors; False if it is gone."""
        try:
            point = Point(t, incarnation, rss_kb(daemon.proc.pid), open_fds(daemon.proc.pid))
        except (OSError, RuntimeError):
            return False
        self.series[name].append(point)
        return True

    def _scrape_receiver(self) -> None:
        assert self.receiver is not None
        with contextlib.suppress(OSError, urllib.error.URLError):
            self.receiver_last = self.receiver.metrics()

    def _receiver_counts(self) -> Counter[tuple[str, str, str]]:
        counts: Counter[tuple[str, str, str]] = Counter()
        for peer in self.peers:
            for stream in STREAMS:
                for name in RECEIVER_COUNTERS:
                    value = metric(
                        self.receiver_last, f"avd_frames_{name}_total",
                        sender=peer.sender_id, stream=stream,
                    )  # fmt: skip
                    counts[(peer.sender_id, stream, name)] = int(value)
        return counts

    def received(self) -> Counter[tuple[str, str, str]]:
        """Receiver counters summed over its incarnations (each up to its last scrape)."""
        return self.received_before + self._receiver_counts()

    # ---- the run -----------------------------------------------------------------------

    def run(self) -> None:
        duration = self.opts.minutes * 60
        end = self.t0 + duration
        restarts = restart_times(duration, self.opts.restart_every_s)
        next_fault = self.t0 + self.rng.uniform(5, 10)
        next_sample = self.t0
        while (now := time.monotonic()) < end:
            self.heal_due(now)
            if restarts and now - self.t0 >= restarts[0]:
                restarts.pop(0)
                self.restart_receiver(now)
            elif now >= next_fault:
                self.inject_fault(now)
                next_fault = now + self.rng.uniform(10, 20)
            if now >= next_sample:
                self.sample(now)
                next_sample += SAMPLE_EVERY_S
            time.sleep(0.2)
        self.heal_due(time.monotonic(), everything=True)

    def settle(self, timeout: float = 60.0) -> tuple[dict[tuple[str, str], int], float]:
        """Cut-offs (captured per sender and stream) every frame below which is finished.

        The spool holds exactly the frames not yet acknowledged (recorded, found recorded,
        or given up), so once ``captured - spooled`` reaches the cut-off, all below it are.
        """
        time.sleep(3)  # the reconnections after the last heal
        self.scrape_all()
        cutoffs = {
            (p.sender_id, s): int(metric(p.last, "avd_frames_captured_total", stream=s))
            for p in self.peers
            for s in STREAMS
        }
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            self.scrape_all()
            if all(self._finished_below(p, s, cutoffs[(p.sender_id, s)]) for p, s in _pairs(self)):
                break
            time.sleep(1)
        else:
            self.findings.append(f"spools not drained within {timeout:.0f} s")
        self.sample(time.monotonic())  # one more point: memory at the end
        return cutoffs, time.monotonic() - started

    @staticmethod
    def _finished_below(peer: Peer, stream: str, cutoff: int) -> bool:
        if peer.daemon.proc.poll() is not None:
            return True  # a dead sender finishes nothing more (and is a finding already)
        captured = metric(peer.last, "avd_frames_captured_total", stream=stream)
        return captured - metric(peer.last, "avd_spool_frames", stream=stream) >= cutoff

    def stop(self) -> dict[str, int | None]:
        """Scrape and SIGTERM every sender at once, then the receiver (closing the segments)."""
        for peer in self.peers:
            with contextlib.suppress(OSError, urllib.error.URLError):
                peer.last = scrape(peer.metrics_url)  # the counters as the sender stops
            if peer.daemon.proc.poll() is None:
                peer.daemon.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, daemon in self.daemons():
            if name == "receiver":
                self._scrape_receiver()  # the senders' last frames are in
                daemon.proc.send_signal(signal.SIGTERM)
            try:  # one SIGTERM each: a second one may find the signal handlers gone
                codes[name] = daemon.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # a hung daemon is a finding, not a crash
                codes[name] = None
            daemon.kill()  # closes its log file; kills it only if it hung
        return codes

    def write_samples(self, path: Path) -> None:
        """Every RSS/descriptor sample as CSV, to look at a growth more closely."""
        rows = ["process,incarnation,t_s,rss_kb,fds"]
        for name, points in self.series.items():
            rows += [f"{name},{p.incarnation},{p.t:.1f},{p.rss_kb},{p.fds}" for p in points]
        path.write_text("\n".join(rows) + "\n")

    def log_errors(self) -> dict[str, list[str]]:
        """ERROR lines and tracebacks in each daemon's logs (every receiver incarnation)."""
        found: dict[str, list[str]] = {}
        for path in sorted((self.root / "logs").glob("*.log")):
            name = "receiver" if path.stem.startswith("receiver") else path.stem
            for line in path.read_text(errors="replace").splitlines():
                if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                    found.setdefault(name, []).append(f"{path.name}: {line[:200]}")
        return found

    def daemons(self) -> Iterator[tuple[str, Daemon]]:
        for peer in self.peers:
            yield peer.sender_id, peer.daemon
        if self.receiver is not None:
            yield "receiver", self.receiver.daemon

    def close(self) -> None:
        for _, daemon in self.daemons():
            daemon.kill()
        for peer in self.peers:
            for proxy in peer.proxies:
                proxy.close()


def _pairs(soak: Soak) -> Iterator[tuple[Peer, str]]:
    for peer in soak.peers:
        for stream in STREAMS:
            yield peer, stream


def restart_times(duration_s: float, every_s: float) -> list[float]:
    """When to restart the receiver: every ``every_s`` (not in the last 20 s), else midway;
    never if ``every_s`` is 0 (a long run that watches one receiver's memory)."""
    if every_s <= 0:
        return []
    times = []
    at = every_s
    while at < duration_s - 20:
        times.append(at)
        at += every_s
    return times or [duration_s / 2]


def summarize(soak: Soak, cutoffs: dict[tuple[str, str], int], drain_s: float) -> dict[str, Any]:
    """Everything the report and the verdict need, as plain data."""
    alive = {name: d.proc.poll() is None for name, d in soak.daemons()}
    exit_codes = soak.stop()
    received = soak.received()
    final = {p.sender_id: p.last for p in soak.peers}
    recorded, unreadable = recorded_seqs(soak.record_dir)
    senders: dict[str, Any] = {}
    for peer in soak.peers:
        streams: dict[str, Any] = {}
        for stream in STREAMS:
            row = {
                name: int(metric(final[peer.sender_id], metric_name, stream=stream))
                for name, metric_name in SENDER_COUNTERS.items()
            }
            for name in RECEIVER_COUNTERS:
                row[name] = received[(peer.sender_id, stream, name)]
            seqs = recorded.get((peer.sender_id, stream), [])
            cutoff = cutoffs[(peer.sender_id, stream)]
            row["recorded"] = len(seqs)
            row["cutoff"] = cutoff
            row["missing"] = len(set(range(cutoff)) - set(seqs))
            row["duplicates"] = len(seqs) - len(set(seqs))
            streams[stream] = row
        senders[peer.sender_id] = {
            "streams": streams,
            "faults": dict(peer.faults),
            "longest_outage_s": round(peer.longest_outage_s, 1),
        }
    return {
        "minutes": soak.opts.minutes,
        "seed": soak.opts.seed,
        "max_growth_mb_min": soak.opts.max_growth_mb_min,
        "spool_seconds": SPOOL_SECONDS,
        "senders": senders,
        "processes": _process_figures(soak, alive, exit_codes),
        "warmup_s": {"senders": _sender_warmup_s(soak.opts), "receiver": RECEIVER_WARMUP_S},
        "restarts": soak.restarts,
        "drain_s": round(drain_s, 1),
        "leftover_parts": len(list(soak.record_dir.rglob("*.part"))),
        "findings": soak.findings,
        "unreadable": unreadable,
        "log_errors": soak.log_errors(),
    }


def _process_figures(
    soak: Soak, alive: dict[str, bool], exit_codes: dict[str, int | None]
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    sender_warmup = _sender_warmup_s(soak.opts)
    for name, points in soak.series.items():
        rss = [p.rss_kb for p in points]
        fds = [p.fds for p in points]
        warmups = (0.0, RECEIVER_WARMUP_S) if name == "receiver" else (sender_warmup, 0.0)
        growth, window = growth_mb_per_min(
            [(p.t, p.incarnation, p.rss_kb) for p in points], *warmups
        )
        figures[name] = {
            "alive": alive.get(name, False),
            "exit_code": exit_codes.get(name),
            "rss_kb": {"start": rss[0], "end": rss[-1], "max": max(rss)},
            "growth_mb_min": growth,
            "growth_window_s": window,
            "growth_judged": growth is not None and window >= MIN_JUDGED_S,
            "fds": {"start": fds[0], "end": fds[-1], "max": max(fds)},
        }
    return figures


def _sender_warmup_s(opts: Options) -> float:
    return min(SENDER_WARMUP_S, opts.minutes * 60 / 2)  # a short run keeps its second half


# ---- recordings, memory, report ------------------------------------------------------------


def recorded_seqs(record_dir: Path) -> tuple[dict[tuple[str, str], list[int]], list[str]]:
    """Stamped sequence numbers of every recorded packet, by (sender, stream); unreadable files."""
    import av  # noqa: PLC0415 - PyAV loads slowly
    import av.error  # noqa: PLC0415

    from avd.media.segment import TAG_SENDER, stamp_of  # noqa: PLC0415

    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    unreadable: list[str] = []
    for path in sorted(record_dir.rglob("*.mkv")):
        try:
            with av.open(str(path)) as container:
                sender = container.metadata.get(TAG_SENDER, "?")
                for packet in container.demux():
                    stamp = stamp_of(packet) if packet.size else None
                    if stamp is not None and packet.stream.type in STREAMS:
                        found[(sender, packet.stream.type)].append(stamp[1])
        except av.error.FFmpegError as exc:
            unreadable.append(f"{path.relative_to(record_dir)}: {exc}")
    return found, unreadable


def growth_mb_per_min(
    points: Sequence[tuple[float, int, int]], since_run_s: float, since_start_s: float
) -> tuple[float | None, float]:
    """RSS growth in MiB/min and the seconds it was measured over: the least-squares slope of
    (t s, RSS KiB) within each incarnation (a restart starts afresh), pooled. Kept: samples
    ``since_run_s`` into the run and ``since_start_s`` into their incarnation (warm-ups)."""
    groups: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for t, incarnation, rss in points:
        groups[incarnation].append((t, rss))
    covariance = variance = window = 0.0
    for group in groups.values():
        since = max(since_run_s, group[0][0] + since_start_s)
        kept = [(t, rss) for t, rss in group if t >= since]
        if len(kept) < 3:
            continue
        window += kept[-1][0] - kept[0][0]
        mean_t = sum(t for t, _ in kept) / len(kept)
        mean_rss = sum(rss for _, rss in kept) / len(kept)
        covariance += sum((t - mean_t) * (rss - mean_rss) for t, rss in kept)
        variance += sum((t - mean_t) ** 2 for t, _ in kept)
    slope = None if variance == 0 else round(covariance / variance * 60 / 1024, 3)
    return slope, round(window, 1)


def judge(summary: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems that fail the verdict, warnings worth a look) found in ``summary``."""
    problems, warnings = list(summary["findings"]), []
    for name, proc in summary["processes"].items():
        if not proc["alive"] or proc["exit_code"] != 0:
            problems.append(f"{name}: alive={proc['alive']} exit={proc['exit_code']}")
        growth = proc["growth_mb_min"]
        if proc["growth_judged"] and growth > summary["max_growth_mb_min"]:
            problems.append(f"{name}: RSS grows {growth:.2f} MiB/min")
        if name != "receiver" and proc["fds"]["end"] > proc["fds"]["start"] + 16:
            warnings.append(f"{name}: descriptors {proc['fds']['start']} -> {proc['fds']['end']}")
    for sender_id, sender in summary["senders"].items():
        long_outage = sender["longest_outage_s"] > summary["spool_seconds"]
        for stream, row in sender["streams"].items():
            where = f"{sender_id} {stream}"
            if row["captured"] == 0 or row["recorded"] == 0:
                problems.append(f"{where}: captured {row['captured']}, recorded {row['recorded']}")
            if row["lost"] and not long_outage:
                problems.append(f"{where}: {row['lost']} frames evicted from the spool")
            if row["missing"] > row["lost"]:
                problems.append(f"{where}: {row['missing']} frames below the cut-off not recorded")
            if row["duplicates"]:
                warnings.append(f"{where}: {row['duplicates']} frames recorded twice")
    if summary["leftover_parts"]:
        warnings.append(f"{summary['leftover_parts']} .part files left in the recordings")
    warnings += [f"unreadable segment {u}" for u in summary["unreadable"]]
    for name, lines in summary["log_errors"].items():
        warnings.append(f"{name}: {len(lines)} ERROR lines or tracebacks, first: {lines[0]}")
    return problems, warnings


def render(summary: dict[str, Any]) -> tuple[str, bool]:
    """The report's text and whether the verdict is good."""
    lines = [_frames_table(summary["senders"]), "", _process_table(summary["processes"]), ""]
    faults: Counter[str] = Counter()
    for sender in summary["senders"].values():
        faults.update(sender["faults"])
    restarts = ", ".join(
        f"at {r['at_s']:.0f} s down {r['downtime_s']:.1f} s" for r in summary["restarts"]
    )
    lines.append("faults: " + ", ".join(f"{k} {faults[k]}" for k in FAULTS))
    lines.append(f"receiver restarts (SIGKILL): {len(summary['restarts'])} ({restarts})")
    lines.append(f"spools drained {summary['drain_s']:.0f} s after the cut-off")
    lines.append(
        f"MiB/min: RSS slope from {summary['warmup_s']['senders']:.0f} s into the run (senders), "
        f"{summary['warmup_s']['receiver']:.0f} s after each start (receiver); (in brackets): "
        f"measured over under {MIN_JUDGED_S:.0f} s, not judged"
    )
    problems, warnings = judge(summary)
    lines += [f"warning: {w}" for w in warnings] + [f"problem: {p}" for p in problems]
    judged = {n: p["growth_mb_min"] for n, p in summary["processes"].items() if p["growth_judged"]}
    growth = f"{max(judged.values()):.2f} MiB/min" if judged else "not judged (run too short)"
    rows = [r for s in summary["senders"].values() for r in s["streams"].values()]
    lost, missing = sum(r["lost"] for r in rows), sum(r["missing"] for r in rows)
    lines.append(
        f"verdict: {'GOOD' if not problems else 'BAD'}: largest RSS growth "
        f"{growth} (limit {summary['max_growth_mb_min']:g}), "
        f"frames lost {lost}, missing from recordings {missing}, problems {len(problems)}"
    )
    summary["problems"], summary["warnings"] = problems, warnings
    return "\n".join(lines), not problems


def _frames_table(senders: dict[str, Any]) -> str:
    columns = [
        "captured",
        "sent",
        "received",
        "late",
        "backfilled",
        "dropped",
        "lost",
        "recorded",
        "missing",
        "duplicates",
    ]
    lines = ["frames        " + " ".join(f"{c:>10}" for c in columns)]
    for sender_id, sender in senders.items():
        for stream, row in sender["streams"].items():
            cells = " ".join(f"{row[c]:>10}" for c in columns)
            lines.append(f"{sender_id:<7} {stream:<5} {cells}")
    return "\n".join(lines)


def _process_table(processes: dict[str, Any]) -> str:
    lines = ["RSS MiB        start    end    max  MiB/min   fds start  end  max  alive  exit"]
    for name, p in processes.items():
        mib = [p["rss_kb"][k] / 1024 for k in ("start", "end", "max")]
        growth = "-" if p["growth_mb_min"] is None else f"{p['growth_mb_min']:+.2f}"
        if not p["growth_judged"]:
            growth = f"({growth})"  # measured over too short a time after the warm-up
        fds = p["fds"]
        lines.append(
            f"{name:<12} {mib[0]:7.1f} {mib[1]:6.1f} {mib[2]:6.1f} {growth:>8} "
            f"{fds['start']:>9} {fds['end']:>4} {fds['max']:>4}  {'yes' if p['alive'] else 'NO':>5}"
            f"  {p['exit_code']}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split(": ", 1)[1].split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="minutes of faults (default 5)")
    parser.add_argument("--senders", type=int, default=4, help="sender daemons (default 4)")
    parser.add_argument(
        "--restart-every", type=float, default=120.0, metavar="S",
        help="SIGKILL and restart the receiver every S s (default 120; once if longer; 0: never)",
    )  # fmt: skip
    parser.add_argument(
        "--max-growth", type=float, default=MAX_GROWTH_MB_MIN, metavar="MB",
        help=f"largest RSS growth per minute judged good (default {MAX_GROWTH_MB_MIN:g})",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="fault schedule seed")
    parser.add_argument("--keep", action="store_true", help="keep logs and recordings")
    parser.add_argument("--json", action="store_true", help="JSON summary on the last line")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.senders < 1:
        parser.error("--minutes must be positive and --senders at least 1")
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    return Options(
        args.minutes, args.senders, args.restart_every, args.max_growth, seed, args.keep, args.json
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the finally blocks stop the daemons


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with contextlib.ExitStack() as stack:
        if opts.keep:
            root = Path(tempfile.mkdtemp(prefix="avd-soak-"))
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="avd-soak-")))
        soak = Soak(opts, root)
        stack.callback(soak.close)
        soak.start()
        print(f"soak: {opts.senders} senders, {opts.minutes:g} min, seed {opts.seed}, in {root}")
        soak.run()
        summary = summarize(soak, *soak.settle())
        if opts.keep:
            soak.write_samples(root / "samples.csv")
    text, ok = render(summary)
    summary["ok"] = ok
    print(text)
    if opts.keep:
        print(f"logs, recordings and samples.csv kept in {root}")
    if opts.json:
        print(json.dumps(summary, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
