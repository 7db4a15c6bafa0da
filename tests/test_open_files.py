"""The receiver's open files: enough for its connections and their recordings, or said.

A soft limit of 1024 open files is what systemd gives a service and a login shell gives a
command. The real receiver daemon runs here under smaller limits set the same way
(RLIMIT_NOFILE before exec), with real TLS senders from the load generator and recording on.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from avd.bench.scale import recorded_frames
from avd.certs import CertPaths
from avd.fdlimit import (
    FILES_BESIDES,
    FILES_PER_CONNECTION,
    FileBudget,
    connections_within,
    files_needed,
)
from avd.loadgen import LoadConfig, LoadReport, camera_like_frames, run_load
from avd.media.base import VideoFormat
from avd.tokens import hash_token, new_token

from .conftest import REPO, ReceiverHandle, metric, receiver_env, start_receiver, wait_until

SMALL = VideoFormat(160, 120, 5, 60)  # many senders on 2 cores: small frames, 5 fps

# The tests start processes with hard limits up to 8192: only root may raise its own.
can_raise_to_8192 = pytest.mark.skipif(
    os.geteuid() != 0 and resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 8192,
    reason="needs root, or a hard limit of open files of 8192 or more",
)


def test_files_needed_and_connections_within_are_inverse() -> None:
    assert files_needed(1024) == FILES_PER_CONNECTION * 1024 + FILES_BESIDES
    for n in (1, 7, 240, 1024, 10_000):
        assert connections_within(files_needed(n)) == n
        assert connections_within(files_needed(n) - 1) == n - 1 or n == 1
    assert connections_within(10) == 1  # never none: the receiver must take someone


def test_without_recording_a_connection_needs_only_its_socket() -> None:
    assert files_needed(1024, recording=False) == 1024 + FILES_BESIDES
    assert connections_within(1024, recording=False) == 1024 - FILES_BESIDES
    budget = FileBudget(
        wanted=files_needed(2000, recording=False), before=1024, soft=1024, hard=1024
    )
    assert "taking at most 960 connections" in budget.shortfall(2000, recording=False)


def test_the_shortfall_names_the_setting_the_limit_and_the_remedies() -> None:
    budget = FileBudget(wanted=files_needed(1024), before=1024, soft=1024, hard=1024)
    text = budget.shortfall(1024)
    assert "AVD_MAX_CONNECTIONS=1024" in text
    assert f"may need {files_needed(1024)} open files" in text
    assert "may open 1024" in text
    assert f"at most {connections_within(1024)} connections" in text
    assert "LimitNOFILE=" in text
    assert "ulimit -n" in text
    refused = FileBudget(wanted=5000, before=1024, soft=1024, hard=8192, error="EPERM")
    assert "raising it failed: EPERM" in refused.shortfall(1024)


def _budget_under(limits: tuple[int, int], wanted: int) -> tuple[dict[str, object], int]:
    """``ensure_open_files(wanted)`` in a fresh process started with ``limits``; its budget
    and the soft limit the process has afterwards."""
    code = (
        f"import json, resource, dataclasses; resource.setrlimit(resource.RLIMIT_NOFILE, {limits});"
        "from avd.fdlimit import ensure_open_files;"
        f"b = ensure_open_files({wanted});"
        "print(json.dumps([dataclasses.asdict(b), resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    budget, soft = json.loads(out)
    return budget, soft


@can_raise_to_8192
def test_the_soft_limit_is_raised_to_what_is_wanted_and_no_further() -> None:
    budget, soft = _budget_under((256, 4096), 1000)
    assert (budget["before"], budget["soft"], budget["hard"], soft) == (256, 1000, 4096, 1000)


def test_the_soft_limit_stops_at_the_hard_limit() -> None:
    budget, soft = _budget_under((256, 512), 1000)
    assert (budget["soft"], soft, budget["error"]) == (512, 512, None)


@can_raise_to_8192
def test_a_soft_limit_already_high_enough_is_left_alone_never_lowered() -> None:
    budget, soft = _budget_under((2048, 4096), 1000)
    assert (budget["before"], budget["soft"], soft) == (2048, 2048, 2048)


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    issued = {f"cam{i}": new_token() for i in range(70)}
    path = tmp_path / "tokens"
    path.write_text("".join(f"{s} {hash_token(t)}\n" for s, t in issued.items()))
    return path, issued


@pytest.fixture
def record_dir(tmp_path: Path) -> Path:
    return tmp_path / "recordings"


@pytest.fixture
def receiver_under(
    pki: CertPaths, tokens: tuple[Path, dict[str, str]], record_dir: Path, tmp_path: Path
) -> Iterator[Callable[[tuple[int, int]], ReceiverHandle]]:
    """Starts the recording receiver daemon under a (soft, hard) limit of open files."""
    started: list[ReceiverHandle] = []

    def start(open_files: tuple[int, int]) -> ReceiverHandle:
        env = receiver_env(pki, tokens[0], AVD_RECORD_DIR=str(record_dir), AVD_MIN_FREE_GB="0")
        started.append(start_receiver(env, tmp_path / "receiver.log", open_files))
        return started[-1]

    yield start
    for handle in started:
        handle.daemon.kill()


def _stream(
    handle: ReceiverHandle, pki: CertPaths, senders: list[tuple[str, str]], seconds: float
) -> LoadReport:
    config = LoadConfig(
        "127.0.0.1", handle.video_port, "localhost", str(pki.ca_cert), senders,
        width=SMALL.width, height=SMALL.height, fps=SMALL.fps, quality=SMALL.quality,
    )  # fmt: skip

    async def run() -> LoadReport:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        return await run_load(config, camera_like_frames(SMALL, 4), stop)

    return asyncio.run(run())


def _received(handle: ReceiverHandle) -> float:
    return metric(handle.metrics(), "avd_frames_received_total", stream="video")


@can_raise_to_8192
def test_seventy_senders_are_recorded_under_a_soft_limit_of_128_open_files(
    pki: CertPaths,
    tokens: tuple[Path, dict[str, str]],
    record_dir: Path,
    receiver_under: Callable[[tuple[int, int]], ReceiverHandle],
) -> None:
    """Each sender's recording holds two files in the recording process, so 70 senders
    need more than 128: before the daemon raised its soft limit (the hard one allows
    it), the recording process failed to open segments with "Too many open files"."""
    handle = receiver_under((128, 8192))
    report = _stream(handle, pki, sorted(tokens[1].items()), 3.0)

    sent = sum(report.sent.values())
    assert (report.connected, report.failed, report.skipped) == (70, 0, 0)
    assert all(count >= 5 for count in report.sent.values())
    wait_until(lambda: _received(handle) == sent, 20)
    wait_until(lambda: recorded_frames(record_dir) == sent, 30)
    assert handle.daemon.stop() == 0
    log = handle.daemon.log_text()
    assert "Too many open files" not in log
    assert "Traceback" not in log
    assert "AVD_MAX_CONNECTIONS" not in log  # the limit was raised: nothing to warn of
    assert "soft limit raised from 128 to" in log


def test_a_hard_limit_too_low_caps_the_connections_and_says_so(
    pki: CertPaths,
    tokens: tuple[Path, dict[str, str]],
    record_dir: Path,
    receiver_under: Callable[[tuple[int, int]], ReceiverHandle],
) -> None:
    """Hard limit 100: the daemon cannot raise it, warns once at start, and refuses the
    connections beyond what 100 files carry, by name, while those it took stream and are
    recorded whole."""
    handle = receiver_under((100, 100))
    cap = connections_within(100)
    handle.daemon.wait_for_log(
        rf"WARNING avd: AVD_MAX_CONNECTIONS=1024 may need {files_needed(1024)} open files, "
        rf"but this process may open 100: taking at most {cap} connections; raise the limit"
    )
    report = _stream(handle, pki, sorted(tokens[1].items())[: cap + 3], 2.0)

    assert (report.connected, report.failed) == (cap, 3)
    sent = sum(report.sent.values())
    wait_until(lambda: _received(handle) == sent, 20)
    wait_until(lambda: recorded_frames(record_dir) == sent, 30)
    log = handle.daemon.log_text()
    assert f"too many connections (AVD_MAX_CONNECTIONS={cap})" in log
    assert "Too many open files" not in log
