"""Fixtures shared by the integration tests: certificates, tokens, and real daemons.

Certificates come from avd's own ``init_certs``; tokens from ``avd.tokens``. Daemons run as
real subprocesses (``python -m avd.cli ...`` entry points) with their settings in the
environment, ports picked by the kernel (port 0, read back from the start-up log line),
and their logs in a file the test can wait on.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from avd.certs import CertPaths, init_certs
from avd.tokens import add_token, new_token

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A CA, a receiver certificate for localhost/127.0.0.1/::1 and a sender certificate."""
    return init_certs(tmp_path_factory.mktemp("pki"), ["localhost", "127.0.0.1", "::1"], days=365)


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A second, unrelated CA: nothing it signs may be trusted."""
    return init_certs(tmp_path_factory.mktemp("other-pki"), ["localhost", "127.0.0.1"], days=365)


@dataclass
class Credentials:
    tokens_file: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def add(self, sender_id: str) -> str:
        token = new_token()
        add_token(self.tokens_file, sender_id, token)
        self.tokens[sender_id] = token
        return token


@pytest.fixture
def creds(tmp_path: Path) -> Credentials:
    c = Credentials(tmp_path / "tokens")
    c.add("cam1")
    c.add("cam2")
    return c


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus samples as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and set(labels.items()) <= set(sample_labels):
            total += value
    return total


class Daemon:
    """An avd daemon running as a real subprocess, logs in a file."""

    def __init__(self, role: str, env: dict[str, str], log_path: Path) -> None:
        self.role = role
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AVD_")}
        full_env.update(
            {"AVD_LOG_FORMAT": "text", "AVD_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1"}
        )
        full_env.update(env)
        entry = "receiver_main" if role == "receiver" else "sender_main"
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys; from avd.cli import {entry}; sys.exit({entry}())"],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            match = regex.search(self.log_text())
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{self.role}: no log line matching {pattern!r} (exit={self.proc.poll()}):\n"
            + self.log_text()[-4000:]
        )

    def stop(self, timeout: float = 8.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@dataclass
class ReceiverHandle:
    daemon: Daemon
    video_port: int
    audio_port: int
    metrics_url: str

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.metrics_url)


def receiver_env(pki: CertPaths, tokens_file: Path, **extra: str) -> dict[str, str]:
    env = {
        "AVD_BIND": "127.0.0.1",
        "AVD_VIDEO_PORT": "0",
        "AVD_AUDIO_PORT": "0",
        "AVD_TLS_CERT": str(pki.receiver_cert),
        "AVD_TLS_KEY": str(pki.receiver_key),
        "AVD_TOKENS_FILE": str(tokens_file),
        "AVD_METRICS_ADDR": "127.0.0.1:0",
        "AVD_PLAYBACK": "none",  # no sound card here; the audio tests choose ALSA file devices
    }
    env.update(extra)
    return env


def start_receiver(env: dict[str, str], log_path: Path) -> ReceiverHandle:
    daemon = Daemon("receiver", env, log_path)
    match = daemon.wait_for_log(r"video=(\d+) audio=(\d+) metrics=(http://\S+)")
    return ReceiverHandle(daemon, int(match.group(1)), int(match.group(2)), match.group(3))


def sender_env(
    pki: CertPaths, handle: ReceiverHandle, sender_id: str, token: str, **extra: str
) -> dict[str, str]:
    env = {
        "AVD_RECEIVER_HOST": "127.0.0.1",
        "AVD_VIDEO_PORT": str(handle.video_port),
        "AVD_AUDIO_PORT": str(handle.audio_port),
        "AVD_TLS_CA": str(pki.ca_cert),
        "AVD_SENDER_ID": sender_id,
        "AVD_TOKEN": token,
        "AVD_VIDEO_SOURCE": "test",
        "AVD_AUDIO_SOURCE": "test",
        "AVD_METRICS_ADDR": "127.0.0.1:0",
    }
    env.update(extra)
    return env


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts; any still running at the end are killed."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def wait_until(predicate: object, timeout: float = 15.0, interval: float = 0.1) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
