"""The report of a run: the table of figures against their targets, what each measured, the
scale steps, the bandwidth table, and the figures as JSON (``KEYS``, in that order).

Targets that the spec gives as ratios (the latency and throughput ones, of the JPEG floor)
are computed from the same run's codec figures.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from avd.bench.phases import CpuFigures
from avd.bench.plan import MIB, Plan, format_ms
from avd.bench.scale import Step

KEYS = (
    "encode_fps", "decode_fps", "floor_ms", "latency_p50_ms", "latency_p99_ms",
    "throughput_fps", "audio_latency_p99_ms", "max_senders", "sender_cpu_pct",
    "receiver_cpu_pct", "receiver_idle_cpu_pct", "reconnect_s", "receiver_rss_per_sender_mb",
)  # fmt: skip


@dataclass
class Outcome:
    figures: dict[str, float]
    probe: dict[str, float]
    cpu: CpuFigures
    reconnects: list[float]
    steps: list[Step]
    bandwidth: list[tuple[str, float, float]]
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)  # other tenants of the machine


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
               (median of 3 runs), at the start and again after the throughput run:
               encode {enc0:.0f} / {enc1:.0f} fps, decode {dec0:.0f} / {dec1:.0f} fps, the faster of
               each kept. floor = one encode + one decode, per frame, in a tight loop.
               The same pair once every 50 ms, as a 20 fps stream runs them, takes p50
               {paced50:.2f} ms and p99 {paced99:.2f} ms: the codec alone, before any transport.
  TLS alone    a {tls_bytes}-byte message (a frame with its head) from one process to another
               every 50 ms, with avd's TLS settings on the daemons' event loop and nothing else
               on the way: p50 {tls50:.2f} ms, p99 {tls99:.2f} ms. With the codec's, the floors
               of the latency at 20 fps: their p50s add up to {floors50:.2f} ms, their p99s to
               {floors99:.2f} ms, before avd's own part (the capture thread's hand-off, the
               protocol, the session, the sinks).
  latency      avd-sender (test pattern 640x480 20 fps q70, capture stamped before encode) ->
               TLS -> the receiver's code (avd.receiver with its recorder) -> decoded there with
               cv2.imdecode on arrival: capture stamp to decoded, exact per frame ({frames} frames;
               p50 of capture to arrival {transport:.2f} ms, of arrival to decoded {decode:.2f} ms,
               of which imdecode {imdecode:.2f} ms). The daemon's own histogram (capture to
               arrival, clock offset corrected, interpolated between buckets) said p50 {hist50},
               p99 {hist99} in the CPU run.
  throughput   one in-process StreamClient: the encoder runs as fast as the stream takes frames
               (no drops), the probe receiver decodes each one; frames decoded per second.
               CPU meanwhile: sender side {tput_tx:.0f} %, receiver side {tput_rx:.0f} % of a core,
               {per_frame:.2f} ms of CPU per frame in all against the floor's {floor:.2f} ms
               (imdecode alone {tput_decode:.2f} ms p50 here): at that cost this machine's
               {cores} cores carry at most {ceiling:.0f} frames/s.
  audio        the sender's test tone ({chunks} chunks of 1024 at 44.1 kHz): arrival minus the
               chunk's stamp, which the tone source gives the instant the chunk is complete, so
               the chunk's own 23.2 ms is not in the figure.
  CPU          /proc/<pid>/stat of the avd-sender process (video only, test pattern: drawing a
               frame ~0.2 ms is in it) and of the avd-receiver daemon with that one stream
               (receiver figures always include its recording process);
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
               daemon (both its processes), divided by N, at the largest step that passed.
               The halfway step after a failed one runs on a receiver started afresh, so
               that what the allocator kept from the larger step is not counted in it.
               "gen lag": how late the generators' frames went out behind their slots, p99.
               A step that failed with it at 50 ms or more did not offer its load on time
               (the machine stalled under it): the full run marks it void and runs it again."""


def render(o: Outcome, plan: Plan, seconds: float) -> str:
    targets = _targets(o.figures, plan.quick)
    load = ", ".join(f"{x:.2f}" for x in o.load_before)
    lines = [
        f"avd bench{' --quick' if plan.quick else ''}: {os.cpu_count()} cores, {seconds:.0f} s; "
        f"load average before the run {load} (others' work skews the figures)",
        "",
        f"{'figure':26} {'measured':>14}   {'target':44} met",
    ]
    no_step_ran = all(s.not_run for s in o.steps)  # no room even for the first: no memory
    for key, label, unit in ROWS:
        target, met = targets.get(key, ("", True))
        shown = unit.format(o.figures[key])
        verdict = ("yes" if met else "NO") if target else ""
        if key == "receiver_rss_per_sender_mb" and no_step_ran:
            shown, verdict = "not measured", "NO"
        lines.append(f"{label:26} {shown:>14}   {target:44} {verdict}")
    c, p = o.cpu, o.probe
    # Percent of a core per frame/s is ms of CPU per frame / 10: both sides, every process.
    cpu_pct = p["sender_side_cpu_pct"] + p["receiver_side_cpu_pct"]
    per_frame_ms = cpu_pct * 10 / o.figures["throughput_fps"] if o.figures["throughput_fps"] else 0
    cores = os.cpu_count() or 1
    tls50, tls99 = p.get("tls_alone_p50_ms", 0.0), p.get("tls_alone_p99_ms", 0.0)
    floors50 = p.get("paced_codec_p50_ms", 0.0) + tls50  # medians do not add up exactly
    lines += ["", NOTES.format(
        frames=int(p["frames"]), transport=p["transport_p50_ms"], decode=p["decode_p50_ms"],
        imdecode=p["imdecode_p50_ms"], hist50=format_ms(c.histogram_p50_ms),
        hist99=format_ms(c.histogram_p99_ms), chunks=int(p["chunks"]), tries=len(o.reconnects),
        tries_s=", ".join(f"{t:.2f}" for t in o.reconnects),
        tput_tx=p["sender_side_cpu_pct"], tput_rx=p["receiver_side_cpu_pct"],
        per_frame=per_frame_ms, floor=o.figures["floor_ms"], cores=cores,
        tput_decode=p.get("throughput_imdecode_p50_ms", 0.0),
        ceiling=cores * 1000 / per_frame_ms if per_frame_ms else 0.0,
        paced50=p.get("paced_codec_p50_ms", 0.0), paced99=p.get("paced_codec_p99_ms", 0.0),
        tls50=tls50, tls99=tls99, tls_bytes=int(p.get("tls_alone_bytes", 0)),
        floors50=floors50, floors99=p.get("paced_codec_p99_ms", 0.0) + tls99,
        enc0=p.get("codec_start_encode_fps", o.figures["encode_fps"]),
        dec0=p.get("codec_start_decode_fps", o.figures["decode_fps"]),
        enc1=p.get("codec_again_encode_fps", o.figures["encode_fps"]),
        dec1=p.get("codec_again_decode_fps", o.figures["decode_fps"]),
    )]  # fmt: skip
    lines += ["", _steps_table(o.steps), "", _bandwidth_table(o.bandwidth)]
    return "\n".join(lines)


def _steps_table(steps: list[Step]) -> str:
    lines = [
        "senders  frames/s  p99 arrival  receiver CPU  per stream  RSS MiB  loadgen CPU  "
        "gen lag  result",
    ]
    for s in steps:
        result = "pass" if s.passed else "FAIL: " + "; ".join(s.problems)
        if s.not_run:
            lines.append(f"{s.senders:7}  {s.not_run}")
            continue
        if s.void:
            result = "VOID, run again: " + result
        lines.append(
            f"{s.senders:7}  {s.received_fps:8.0f}  {format_ms(s.p99_ms):>11}  "
            f"{s.receiver_cpu_pct:10.1f} %  {s.receiver_cpu_pct / s.senders:8.2f} %  "
            f"{s.rss_bytes / MIB:7.0f}  {s.loadgen_cpu_pct:9.1f} %  "
            f"{format_ms(s.loadgen_lag_ms):>7}  {result}"
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
