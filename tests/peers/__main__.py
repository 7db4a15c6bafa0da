"""``python -m tests.peers`` (``make peers``): avd beside imagezmq and vidgear's NetGear.

Prints one table: per system, latency at 20 fps (p50, p99 and p99 as a multiple of the
JPEG floor measured at the start of the same run), unthrottled frames per second (and as a
share of the slower of encode and decode), CPU of sender and receiver at 20 fps and of the
idle receiver; then, per figure, whether avd is ahead of every peer. The full run measures
every system three times, interleaved (``--rounds``), as the machine's pace drifts over
minutes; ``--quick`` once, with short windows. ``--json`` adds the
figures as one JSON object on the last line. Exit 0 whether or not avd is ahead: this
measures, it does not judge; exit 1 if a system could not be measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from avd.bench.codec import Codec, measure_codec
from avd.bench.daemons import make_workspace

from .compare import LABELS, PEERS, Durations, Figures, as_dict, measure_all

# Per round; the full run has three, interleaved (idle over 3 x 5 s: 1 tick = 0.2 %).
FULL = Durations(window_s=10.0, throughput_s=4.0, idle_s=5.0)
QUICK = Durations(window_s=3.0, throughput_s=2.0, idle_s=1.0)

# (figure, lower is better) for the verdict lines
AHEAD = (
    ("latency_p50_ms", True),
    ("latency_p99_ms", True),
    ("throughput_fps", False),
    ("sender_cpu_pct", True),
    ("receiver_cpu_pct", True),
    ("receiver_idle_cpu_pct", True),
)


def verdict(avd: Figures, peers: list[Figures], key: str, lower_is_better: bool) -> str:
    """yes: better than every peer; tie: as good as the best of them; else NO."""
    sign = 1 if lower_is_better else -1
    ours = sign * getattr(avd, key)
    best_peer = min(sign * getattr(p, key) for p in peers)
    if ours < best_peer:
        return "yes"
    return "tie" if ours == best_peer else "NO"


def render(codec: Codec, results: dict[str, Figures], rounds: int = 1) -> str:
    slower = min(codec.encode_fps, codec.decode_fps)
    lines = [
        f"JPEG floor {codec.floor_ms:.2f} ms (encode {codec.encode_fps:.0f}/s, decode "
        f"{codec.decode_fps:.0f}/s, 640x480 q70), measured in this run",
        f"{rounds} round(s) of every system, interleaved: latency over all their frames, "
        "the other figures their median",
        "",
        f"{'system':36} {'latency p50':>11} {'p99':>8} {'p99/floor':>9} "
        f"{'frames/s':>9} {'of codec':>8} {'CPU snd':>8} {'CPU rcv':>8} {'idle':>6}",
    ]
    for name, f in results.items():
        lines.append(
            f"{LABELS[name]:36} {f.latency_p50_ms:8.2f} ms {f.latency_p99_ms:5.2f} ms "
            f"{f.latency_p99_ms / codec.floor_ms:8.2f}x {f.throughput_fps:9.0f} "
            f"{100 * f.throughput_fps / slower:7.0f}% {f.sender_cpu_pct:7.1f}% "
            f"{f.receiver_cpu_pct:7.1f}% {f.receiver_idle_cpu_pct:5.2f}%"
        )
    lines += ["", "CPU in % of one core at 20 fps; the receivers decode every frame.", ""]
    avd = results["avd"]
    peers = [f for name, f in results.items() if name != "avd"]
    for key, lower in AHEAD:
        lines.append(f"avd ahead of every peer on {key}: {verdict(avd, peers, key, lower)}")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {text})")
    return value


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.peers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short windows (about 30 s in all)")
    parser.add_argument("--json", action="store_true", help="the figures as JSON, last line")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument(
        "--rounds", type=_positive, help="rounds of every system, interleaved (full 3, quick 1)"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    modules = {"imagezmq": "imagezmq", "netgear": "vidgear"}
    missing = [modules[p] for p in args.peers if importlib.util.find_spec(modules[p]) is None]
    if missing:
        print(
            f"peers: {', '.join(missing)} not installed: pip install -e '.[peers]'"
            " (make peers installs it)",
            file=sys.stderr,
        )
        return 1
    durations = QUICK if args.quick else FULL
    codec = measure_codec(200 if args.quick else 600)
    with tempfile.TemporaryDirectory(prefix="avd-peers-") as tmp:
        ws = make_workspace(Path(tmp), 0)
        try:
            results = measure_all(ws, durations, args.peers, rounds)
        except RuntimeError as exc:
            print(f"peers: {exc}", file=sys.stderr)
            return 1
        finally:
            for child in ws.children:
                child.kill()
    print(render(codec, results, rounds))
    if args.json:
        print(json.dumps({"floor_ms": codec.floor_ms, "encode_fps": codec.encode_fps,
                          "decode_fps": codec.decode_fps} | as_dict(results)))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
