"""``make demo``: a receiver and a sender with test sources on localhost, for 10 seconds.

Everything is made on the fly in a temporary folder: a CA and certificates (``avd certs
init``'s code), a token and the receiver's tokens file. Both daemons run as the real
console scripts, as an operator would run them; their connection logs are shown as they
come. At the end the demo prints per-stream frame rate, bit rate and latency p50/p99
(from the receiver's Prometheus endpoint), opens the recording it made, and stops both
daemons with SIGTERM, reporting their exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from avd.certs import SHORT_LIVED_DAYS, init_certs
from avd.tokens import add_token, new_token

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
WARM_UP_S = 1.0  # not in the figures: the frames that waited for the connection arrive in it
SHOWN = re.compile(r"connection (opened|closed)|listening on|stream connected|refused|error", re.I)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our loopback URL
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' interpolation over cumulative (upper bound, count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            span = count - lower_count
            return lower_bound + (bound - lower_bound) * (
                (rank - lower_count) / span if span else 1
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def latency_buckets(before: Samples, after: Samples, stream: str) -> list[tuple[float, float]]:
    name = "avd_frame_latency_seconds_bucket"
    rows = []
    for (n, labels), value in after.items():
        lab = dict(labels)
        if n == name and lab.get("stream") == stream:
            previous = before.get((n, labels), 0.0)
            rows.append((float(lab["le"]), value - previous))
    return sorted(rows)


class Process:
    """A daemon whose output is echoed (connection lines only) and searchable."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if SHOWN.search(line):
                print(f"  {self.name:8} | {line.rstrip()}", flush=True)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := regex.search(line):
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not log {pattern!r}:\n" + "\n".join(self.lines[-20:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(2)
        return code


def console_script(name: str) -> list[str]:
    """The console script an operator runs, next to this Python; else its entry point."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    entry = "receiver_main" if name == "avd-receiver" else "sender_main"
    return [sys.executable, "-c", f"import sys; from avd.cli import {entry}; sys.exit({entry}())"]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVD_")}
    env.update({"AVD_LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1"})
    return env


def _recording_summary(record_dir: Path) -> list[str]:
    import av  # noqa: PLC0415 - only the demo's summary needs it here

    lines = []
    for path in sorted(record_dir.rglob("*.mkv")):
        counts: dict[str, int] = {}
        with av.open(str(path)) as container:
            names = {s.index: f"{s.codec_context.name}" for s in container.streams}
            for packet in container.demux():
                if packet.size:
                    key = names[packet.stream.index]
                    counts[key] = counts.get(key, 0) + 1
        detail = ", ".join(f"{n} {k} packets" for k, n in sorted(counts.items()))
        lines.append(
            f"  {path.relative_to(record_dir)}  {path.stat().st_size / 1e6:.2f} MB  ({detail})"
        )
    latest = list(record_dir.rglob("latest.jpg"))
    if latest:
        lines.append(f"  {latest[0].relative_to(record_dir)}  (the latest frame)")
    return lines or ["  (no recording was written)"]


def run(seconds: float, workdir: Path) -> int:
    print(f"avd demo: working in {workdir}")
    pki = init_certs(workdir / "certs", ["localhost", "127.0.0.1"], days=SHORT_LIVED_DAYS)
    token = new_token()
    add_token(workdir / "tokens", "demo-cam", token)
    (workdir / "token").write_text(token + "\n")
    os.chmod(workdir / "token", 0o600)
    print("  made a CA, receiver and sender certificates, and a token for sender 'demo-cam'")
    record_dir = workdir / "recordings"

    env = _base_env() | {
        "AVD_BIND": "127.0.0.1", "AVD_VIDEO_PORT": "0", "AVD_AUDIO_PORT": "0",
        "AVD_TLS_CERT": str(pki.receiver_cert), "AVD_TLS_KEY": str(pki.receiver_key),
        "AVD_TOKENS_FILE": str(workdir / "tokens"), "AVD_METRICS_ADDR": "127.0.0.1:0",
        "AVD_RECORD_DIR": str(record_dir), "AVD_SEGMENT_SECONDS": "60", "AVD_MIN_FREE_GB": "0",
        "AVD_PLAYBACK": os.environ.get("AVD_PLAYBACK", "none"),  # a 10 s test tone is no treat
    }  # fmt: skip
    receiver = Process("receiver", console_script("avd-receiver"), env)
    sender: Process | None = None
    try:
        match = receiver.wait_for(r"video=(\d+) audio=(\d+) metrics=(http://\S+)")
        video_port, audio_port, url = match.group(1), match.group(2), match.group(3)
        sender_env = _base_env() | {
            "AVD_RECEIVER_HOST": "127.0.0.1", "AVD_TLS_SERVER_NAME": "localhost",
            "AVD_VIDEO_PORT": video_port, "AVD_AUDIO_PORT": audio_port,
            "AVD_TLS_CA": str(pki.ca_cert), "AVD_SENDER_ID": "demo-cam",
            "AVD_TOKEN_FILE": str(workdir / "token"),
            "AVD_VIDEO_SOURCE": "test", "AVD_AUDIO_SOURCE": "test",
        }  # fmt: skip
        sender = Process("sender", console_script("avd-sender"), sender_env)
        deadline = time.monotonic() + 30
        while total(scrape(url), "avd_frames_received_total") == 0:
            if time.monotonic() > deadline or sender.proc.poll() is not None:
                raise RuntimeError("no frames arrived:\n" + "\n".join(sender.lines[-20:]))
            time.sleep(0.1)
        # Capture starts while TLS is still connecting, so the first frames arrive up to a
        # few hundred ms late, once. The figures are of the steady stream after them.
        print(
            f"  streaming: {WARM_UP_S:g} s to warm up, then {seconds:.0f} s measured"
            " (Ctrl-C stops early)..."
        )
        time.sleep(WARM_UP_S)
        before, started = scrape(url), time.monotonic()
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(seconds)
        after, elapsed = scrape(url), time.monotonic() - started
        _print_figures(before, after, elapsed)
    finally:
        codes = {}
        if sender is not None:
            codes["sender"] = sender.stop()
        codes["receiver"] = receiver.stop()
    print("\nrecording:")
    print("\n".join(_recording_summary(record_dir)))
    print("\nexit codes: " + ", ".join(f"{k} {v}" for k, v in codes.items()))
    return 0 if all(code == 0 for code in codes.values()) else 1


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:8.2f}" if seconds is not None else f"{'n/a':>8}"


def _print_figures(before: Samples, after: Samples, elapsed: float) -> None:
    print(f"\n{'stream':8} {'frames/s':>9} {'kbit/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for stream in ("video", "audio"):
        frames = total(after, "avd_frames_received_total", stream=stream) - total(
            before, "avd_frames_received_total", stream=stream
        )
        data = total(after, "avd_bytes_received_total", stream=stream) - total(
            before, "avd_bytes_received_total", stream=stream
        )
        buckets = latency_buckets(before, after, stream)
        p50, p99 = (histogram_quantile(q, buckets) for q in (0.5, 0.99))
        print(
            f"{stream:8} {frames / elapsed:9.1f} {data * 8 / elapsed / 1000:9.0f} "
            f"{_ms(p50)} {_ms(p99)}"
        )
    rejected = total(after, "avd_frames_rejected_total")
    failures = total(after, "avd_auth_failures_total")
    print(f"(frames rejected: {rejected:.0f}, authentication failures: {failures:.0f})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="avd demo",
        description="Run a receiver and a sender with test sources, then print figures.",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to stream (10)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run(args.seconds, args.keep)
    with tempfile.TemporaryDirectory(prefix="avd-demo-") as workdir:
        return run(args.seconds, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
