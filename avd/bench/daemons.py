"""The real daemons and the bench's other child processes, and the workspace they share.

A workspace holds a fresh CA and receiver certificate, one token per sender id (written
once, hashed, as the receiver reads them) and every child process started, so that the run
can kill them all and keep their logs whatever happens. Daemons are started the way an
operator starts them (console scripts, ``AVD_*`` settings) and found ready by their
"listening" log line; frames are counted through the receiver's Prometheus endpoint.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avd.bench.plan import VGA
from avd.certs import SHORT_LIVED_DAYS, CertPaths, init_certs
from avd.demo import console_script, scrape, total
from avd.tokens import hash_token, new_token

LISTENING = r"video=(\d+) audio=(\d+) metrics=(http://\S+)"


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

    def wait(self, timeout: float = 15.0) -> int:
        """Its exit code once it ends on its own (killed after ``timeout``), output all read."""
        return self.stop(timeout, signal_first=False)

    def stop(self, timeout: float = 15.0, *, signal_first: bool = True) -> int:
        if signal_first and self.proc.poll() is None:
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


def child_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVD_")}
    return env | {"AVD_LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1"} | settings


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
    pki = init_certs(root / "certs", ["localhost", "127.0.0.1"], days=SHORT_LIVED_DAYS)
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
    env = child_env(
        AVD_BIND="127.0.0.1", AVD_VIDEO_PORT=str(ports[0]), AVD_AUDIO_PORT=str(ports[1]),
        AVD_TLS_CERT=str(ws.pki.receiver_cert), AVD_TLS_KEY=str(ws.pki.receiver_key),
        AVD_TOKENS_FILE=str(ws.tokens_file), AVD_METRICS_ADDR="127.0.0.1:0",
        AVD_RECORD_DIR=str(record_dir), AVD_MIN_FREE_GB="0", AVD_PLAYBACK="none",
        AVD_LOG_LEVEL="INFO",
    )  # fmt: skip
    if probe is None:
        child = ws.spawn("avd-receiver", console_script("avd-receiver"), env)
    else:
        code = (
            "import sys; from avd.bench.probe import probe_main; sys.exit(probe_main(sys.argv[1:]))"
        )
        child = ws.spawn("probe receiver", [sys.executable, "-c", code, str(probe)], env)
    when, match = child.wait_for(LISTENING)
    return Receiving(child, int(match.group(1)), int(match.group(2)), match.group(3), when)


def start_sender(ws: Workspace, sender_id: str, to: Receiving, audio: bool) -> Child:
    env = child_env(
        AVD_RECEIVER_HOST="127.0.0.1", AVD_TLS_SERVER_NAME="localhost",
        AVD_VIDEO_PORT=str(to.video_port), AVD_AUDIO_PORT=str(to.audio_port),
        AVD_TLS_CA=str(ws.pki.ca_cert), AVD_SENDER_ID=sender_id,
        AVD_TOKEN_FILE=str(ws.token_file(sender_id)), AVD_VIDEO_SOURCE="test",
        AVD_AUDIO_SOURCE="test" if audio else "none", AVD_WIDTH=str(VGA.width),
        AVD_HEIGHT=str(VGA.height), AVD_FPS=str(VGA.fps), AVD_JPEG_QUALITY=str(VGA.quality),
    )  # fmt: skip
    return ws.spawn(f"avd-sender {sender_id}", console_script("avd-sender"), env)


def wait_for_frames(to: Receiving, sender_id: str, sender: Child, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while to.received(sender_id) == 0:
        if time.monotonic() > deadline or sender.proc.poll() is not None:
            tail = "\n".join(line for _, line in sender.lines[-15:])
            raise RuntimeError(f"no frames from {sender_id} reached the receiver:\n{tail}")
        time.sleep(0.05)
