"""``avd bench``: latency, throughput, CPU, memory, reconnection and scale on this machine.

Everything runs on localhost through the daemons' own code: TLS 1.3, token authentication,
recording on. Each figure says what it measured (``NOTES``); the table puts it next to its
target, computed from the same run where the target is a ratio (the JPEG floor):

- JPEG encode/decode of the sender's camera-like test pattern (640x480 q70) in this process,
  timed at the start and again after the throughput run, the faster of each kept; their
  per-frame sum is the floor no live frame can beat.
- The bare TLS transport: a frame-sized message between two processes every 50 ms, no avd
  code on the way; with the codec at 20 fps, the floors of the latency.
- Latency and throughput: the real ``avd-sender`` (test sources) and an in-process
  ``StreamClient`` stream to a *probe receiver*: ``avd.receiver.Receiver`` with the daemon's
  recorder, plus a sink that decodes every JPEG on arrival (``cv2.imdecode``, as a live view
  would) and notes the time. CLOCK_MONOTONIC is system-wide, so capture stamps from the
  sender process and decode times in the probe compare directly: exact per-frame figures,
  not the daemon histogram's interpolated ones (which are shown too, as a cross-check).
- CPU, memory, scale and reconnection: the real ``avd-receiver`` daemon, measured from
  /proc (``avd.procstat``), counted through its Prometheus endpoint, its recordings counted
  packet by packet; scale uses ``avd.loadgen`` processes of pre-encoded senders.

The package's modules: ``plan`` (quick or full), ``codec`` (the JPEG floor, bandwidth),
``transport`` (the bare TLS transport at 20 fps, the latency's other floor),
``daemons`` (child processes, certificates, tokens), ``probe`` (the probe receiver),
``phases`` (latency, throughput, CPU, reconnection), ``scale`` (the loadgen ramp) and
``report`` (table, notes, JSON); this one parses the arguments and runs them in order.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from avd import eventloop, procstat
from avd.bench.codec import Codec, bandwidth_rows, measure_codec
from avd.bench.daemons import Workspace, make_workspace, start_receiver
from avd.bench.phases import cpu_phase, latency_phase, reconnect_phase, unthrottled_stream
from avd.bench.plan import FULL, MIB, QUICK, Plan, progress
from avd.bench.probe import analyse_probe
from avd.bench.report import Outcome, as_json, render
from avd.bench.scale import ramp
from avd.bench.transport import Transport, measure_transport
from avd.protocol import HEADER, MEDIA_PREFIX

__all__ = ["main"]


def run(plan: Plan, root: Path) -> Outcome:
    load_before = os.getloadavg()
    progress("JPEG encode and decode of the 640x480 q70 test pattern...")
    codec = measure_codec(plan.codec_frames, plan.paced_codec_frames)
    bandwidth = bandwidth_rows()
    ws = make_workspace(root, max(plan.steps))
    try:
        progress("the bare TLS transport of a frame-sized message at 20 fps...")
        size = round(codec.jpeg_bytes) + HEADER.size + MEDIA_PREFIX.size
        transport = measure_transport(ws, plan.transport_messages, size)
        outcome = _run_daemons(plan, ws, codec, transport, bandwidth)
    finally:
        for n, child in enumerate(ws.children):
            child.kill()
            name = re.sub(r"\W+", "-", child.name)
            log = "".join(f"{line}\n" for _, line in child.lines)
            (ws.root / f"{n:02d}-{name}.log").write_text(log)  # kept with --keep
    outcome.load_before = load_before
    return outcome


def _run_daemons(
    plan: Plan,
    ws: Workspace,
    codec: Codec,
    transport: Transport,
    bandwidth: list[tuple[str, float, float]],
) -> Outcome:
    progress("starting a probe receiver and the avd-receiver daemon (TLS, tokens, recording)...")
    rows_path, record_dir = ws.root / "probe.json", ws.root / "recordings"
    probe = start_receiver(ws, ws.root / "probe-recordings", probe=rows_path)
    daemon = start_receiver(ws, record_dir)
    time.sleep(1.0)  # the daemon is idle from here to the CPU run
    idle = procstat.CpuMeter(daemon.child.pid, tree=True)
    progress(f"latency: avd-sender, 640x480 20 fps and a tone, {plan.window_s:g} s...")
    window = latency_phase(ws, probe, plan)
    progress(f"throughput: one unthrottled stream, {plan.throughput_s:g} s...")
    meters = procstat.CpuMeter(os.getpid()), procstat.CpuMeter(probe.child.pid, tree=True)
    # On the sender daemon's default loop, as the client stands in for the sender.
    fast_window = eventloop.run(unthrottled_stream(ws, probe, plan.throughput_s))
    sides = [m.percent() for m in meters]
    idle_cpu = idle.percent()
    probe.child.stop()
    measured = analyse_probe(json.loads(rows_path.read_text()), window, fast_window)
    # The codec again, right after the runs its floor is held against: the floor is the
    # faster of the two, so that a slow spell at the start does not make the targets easy.
    progress("JPEG encode and decode again, after the latency and throughput runs...")
    again = measure_codec(plan.codec_frames)
    measured["codec_start_encode_fps"], measured["codec_start_decode_fps"] = (
        codec.encode_fps,
        codec.decode_fps,
    )
    measured["codec_again_encode_fps"] = again.encode_fps
    measured["codec_again_decode_fps"] = again.decode_fps
    codec = codec.fastest(again)
    measured["sender_side_cpu_pct"], measured["receiver_side_cpu_pct"] = sides
    progress(f"CPU: avd-sender to avd-receiver, {plan.cpu_s:g} s...")
    sender, cpu = cpu_phase(ws, daemon, plan)
    progress("reconnection: avd-receiver killed (-9) and started again...")
    daemon, reconnects = reconnect_phase(ws, daemon, record_dir, plan.reconnect_tries)
    sender.stop()
    time.sleep(0.5)  # the session has ended: the ramp's idle memory holds no sender
    steps, daemon = ramp(ws, daemon, plan, record_dir, frame_bytes=codec.jpeg_bytes)
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
        "receiver_rss_per_sender_mb": best.rss_per_sender_bytes / MIB,
    }
    measured["paced_codec_p50_ms"] = codec.paced_p50_ms
    measured["paced_codec_p99_ms"] = codec.paced_p99_ms
    measured["tls_alone_p50_ms"], measured["tls_alone_p99_ms"] = transport.p50_ms, transport.p99_ms
    measured["tls_alone_bytes"] = transport.size
    return Outcome(figures, measured, cpu, reconnects, steps, bandwidth)


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
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="work in DIR and keep it: the daemons' logs and the last scale step's recordings "
        "(default: a temporary folder in $TMPDIR, deleted; the scale steps need about 1 GB "
        "free per 200 senders there)",
    )
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
