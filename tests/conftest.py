"""Fixtures shared by the integration tests: certificates, tokens, and real daemons.

Certificates come from avd's own ``init_certs``; tokens from ``avd.tokens``. Daemons run as
real subprocesses (``python -m avd.cli ...`` entry points) with their settings in the
environment, ports picked by the kernel (port 0, read back from the start-up log line),
and their logs in a file the test can wait on.

Below those, helpers more than one test file needs (so each is written once): the Launcher
of a test's daemons, a real small tmpfs, per-test ALSA file devices, closing what a test
opened, decoding one protocol message, and walking a spool's frames.
"""

from __future__ import annotations

import contextlib
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
from typing import Protocol

import pytest
from prometheus_client.parser import text_string_to_metric_families

from avd.certs import CertPaths, init_certs
from avd.config import ReceiverSettings
from avd.media.base import CapturedFrame
from avd.protocol import Event, FrameDecoder, decode_body
from avd.tokens import add_token, new_token

from .alsa.alsa_env import AlsaDevices, make_alsa_devices, use_alsa_devices

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

    def __init__(
        self,
        role: str,
        env: dict[str, str],
        log_path: Path,
        open_files: tuple[int, int] | None = None,
    ) -> None:
        """``open_files``: the (soft, hard) RLIMIT_NOFILE to start it with, as a unit's
        LimitNOFILE= or a shell's ulimit -n would."""
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
            [
                sys.executable,
                "-c",
                _limited(open_files) + f"from avd.cli import {entry}; sys.exit({entry}())",
            ],
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


def _limited(open_files: tuple[int, int] | None) -> str:
    """Python that sets RLIMIT_NOFILE first, before anything else runs in the process."""
    limit = (
        "" if open_files is None else f"resource.setrlimit(resource.RLIMIT_NOFILE, {open_files}); "
    )
    return "import resource, sys; " + limit


@dataclass
class ReceiverHandle:
    daemon: Daemon
    video_port: int
    audio_port: int
    metrics_url: str

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.metrics_url)


def receiver_settings(pki: CertPaths, tokens_file: Path, **extra: object) -> ReceiverSettings:
    """Settings for a Receiver run in the test's own process, on loopback, ports chosen."""
    fields = {
        "bind": "127.0.0.1",
        "video_port": 0,
        "audio_port": 0,
        "tls_cert": pki.receiver_cert,
        "tls_key": pki.receiver_key,
        "tokens_file": tokens_file,
    }
    return ReceiverSettings.model_validate(fields | extra)


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


def start_receiver(
    env: dict[str, str], log_path: Path, open_files: tuple[int, int] | None = None
) -> ReceiverHandle:
    daemon = Daemon("receiver", env, log_path, open_files)
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


# ---- helpers shared by several test files ----------------------------------------------------


@dataclass
class Launcher:
    """Starts a test's daemons from its pki and tokens, logs in its folder, each put in
    ``daemons`` so that the test's end kills whatever still runs: one place for what every
    end-to-end test repeated before its first real line."""

    pki: CertPaths
    creds: Credentials
    logs: Path
    daemons: list[Daemon]

    def receiver(self, log: str = "receiver", **extra: str) -> ReceiverHandle:
        """A receiver with ``receiver_env`` and ``extra``, logging to ``<log>.log``."""
        env = receiver_env(self.pki, self.creds.tokens_file, **extra)
        handle = start_receiver(env, self.logs / f"{log}.log")
        self.daemons.append(handle.daemon)
        return handle

    def recording_receiver(
        self, record_dir: Path, log: str = "receiver", **extra: str
    ) -> ReceiverHandle:
        """A receiver recording into ``record_dir`` whatever the free space of this machine."""
        return self.receiver(log, AVD_RECORD_DIR=str(record_dir), AVD_MIN_FREE_GB="0", **extra)

    def receiver_again(self, gone: ReceiverHandle, log: str, **extra: str) -> ReceiverHandle:
        """A receiver on the ports ``gone`` listened on, as a restarted service comes back."""
        ports = {"AVD_VIDEO_PORT": str(gone.video_port), "AVD_AUDIO_PORT": str(gone.audio_port)}
        return self.receiver(log, **ports, **extra)

    def sender(
        self,
        handle: ReceiverHandle,
        log: str = "sender",
        sender_id: str = "cam1",
        token: str | None = None,
        **extra: str,
    ) -> Daemon:
        """A sender with ``sender_env`` and ``extra``; its own token unless ``token`` is given."""
        token = self.creds.tokens[sender_id] if token is None else token
        env = sender_env(self.pki, handle, sender_id, token, **extra)
        daemon = Daemon("sender", env, self.logs / f"{log}.log")
        self.daemons.append(daemon)
        return daemon


@pytest.fixture
def launch(pki: CertPaths, creds: Credentials, tmp_path: Path, daemons: list[Daemon]) -> Launcher:
    """The test's Launcher; what it starts is killed with the ``daemons`` fixture."""
    return Launcher(pki, creds, tmp_path, daemons)


def sender_metrics_url(sender: Daemon) -> str:
    """The URL a sender logged for its metrics, once it has (its port is the kernel's pick)."""
    return sender.wait_for_log(r"metrics=(http://\S+)").group(1)


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``mount_point`` for full-disk tests, always unmounted after.

    Skips the test, saying why, where mounting is not permitted (needs CAP_SYS_ADMIN).
    """
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {result.stderr.strip()}"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, unmounted at teardown: the file system a full-disk test fills."""
    with small_tmpfs(tmp_path / "small", "2m") as mount_point:
        yield mount_point


@pytest.fixture
def alsa(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AlsaDevices:
    """This test's own ALSA file devices, used by every PyAudio the test creates after it."""
    devices = make_alsa_devices(tmp_path)
    use_alsa_devices(monkeypatch, devices)
    return devices


@pytest.fixture
def closing() -> Iterator[contextlib.ExitStack]:
    """Closes what a test registered at its end, even a failed one: no device stays open."""
    with contextlib.ExitStack() as stack:
        yield stack


def decode_one(data: bytes) -> Event:
    """Frames and decodes exactly one message, checking nothing is left over."""
    decoder = FrameDecoder(media_limit=1024)
    decoder.feed(data)
    message = decoder.next_message()
    assert message is not None
    assert decoder.buffered == 0
    return decode_body(*message)


class FrameWalker(Protocol):
    """What both spool tiers offer to read frames in seq order."""

    def next_after(self, seq: int) -> tuple[int, CapturedFrame] | None: ...


def walk_frames(spool: FrameWalker) -> list[tuple[int, CapturedFrame]]:
    """Every frame ``spool`` holds, by ``next_after`` from the start, as a sender resends."""
    found, cursor = [], -1
    while (item := spool.next_after(cursor)) is not None:
        found.append(item)
        cursor = item[0]
    return found
