"""The load generator against a real receiver daemon (TLS, tokens, recording on)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from avd.certs import CertPaths
from avd.loadgen import LoadConfig, LoadReport, camera_like_frames, run_load, source_address
from avd.media.base import VideoFormat
from avd.media.jpeg import check_video_frame
from avd.tokens import add_token, new_token

from .conftest import REPO, ReceiverHandle, metric, receiver_env, start_receiver, wait_until

SMALL = VideoFormat(160, 120, 20, 60)  # the receiver checks size; small frames keep tests fast


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    issued = {f"cam{i}": new_token() for i in range(6)}
    for sender_id, token in issued.items():
        add_token(path, sender_id, token)
    return path, issued


@pytest.fixture(scope="module")
def receiver(
    pki: CertPaths, tokens: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReceiverHandle]:
    work = tmp_path_factory.mktemp("receiver")
    env = receiver_env(
        pki,
        tokens[0],
        AVD_RECORD_DIR=str(work / "recordings"),
        AVD_MIN_FREE_GB="0",
        AVD_PLAYBACK="none",
    )
    handle = start_receiver(env, work / "receiver.log")
    yield handle
    handle.daemon.kill()


def _config(
    handle: ReceiverHandle, pki: CertPaths, senders: list[tuple[str, str]], **kw: object
) -> LoadConfig:
    base = LoadConfig(
        host="127.0.0.1",
        port=handle.video_port,
        server_name="localhost",
        ca_file=str(pki.ca_cert),
        senders=senders,
        width=SMALL.width,
        height=SMALL.height,
        quality=SMALL.quality,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _received(handle: ReceiverHandle, sender_id: str) -> float:
    return metric(handle.metrics(), "avd_frames_received_total", sender=sender_id, stream="video")


async def _stream_for(config: LoadConfig, seconds: float) -> LoadReport:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await run_load(config, camera_like_frames(SMALL, 4), stop)


def test_frames_are_real_test_pattern_jpegs_of_the_announced_size() -> None:
    frames = camera_like_frames(VideoFormat(640, 480, 20, 70), 3)
    assert len(set(frames)) == 3
    for frame in frames:
        check_video_frame(frame, 640, 480)
        assert 10_000 < len(frame) < 60_000  # camera-like, not a flat picture


def test_three_senders_every_frame_counted_by_the_receiver(
    receiver: ReceiverHandle, pki: CertPaths, tokens: tuple[Path, dict[str, str]]
) -> None:
    senders = [(f"cam{i}", tokens[1][f"cam{i}"]) for i in range(3)]
    before = {s: _received(receiver, s) for s, _ in senders}
    histogram_before = metric(receiver.metrics(), "avd_frame_latency_seconds_count")
    report = asyncio.run(_stream_for(_config(receiver, pki, senders), 2.5))

    assert (report.connected, report.failed, report.skipped, report.closed_early) == (3, 0, 0, 0)
    for sender_id, _ in senders:
        assert report.sent[sender_id] >= 30  # 20 fps for 2.5 s, with a generous margin
        wait_until(lambda s=sender_id: _received(receiver, s) - before[s] == report.sent[s])
    # Heartbeats were answered: the receiver could sync clocks and measure latency.
    assert metric(receiver.metrics(), "avd_frame_latency_seconds_count") > histogram_before
    # Each ended with a goodbye; the receiver logs the close once its last acks are out.
    wait_until(lambda: receiver.daemon.log_text().count("reason=bye") >= 3, 10)
    log = receiver.daemon.log_text()
    for i in range(3):  # each from its own loopback address
        assert f"peer={source_address(i)}:" in log


def test_a_refused_token_is_a_failure_and_the_others_still_stream(
    receiver: ReceiverHandle, pki: CertPaths, tokens: tuple[Path, dict[str, str]]
) -> None:
    senders = [("cam3", tokens[1]["cam3"]), ("cam4", new_token())]
    report = asyncio.run(_stream_for(_config(receiver, pki, senders, first_index=10), 1.0))
    assert (report.connected, report.failed) == (1, 1)
    assert "Refused" in report.errors[0]
    assert report.sent["cam3"] > 0
    assert "cam4" not in report.sent
    assert all(token not in " ".join(report.errors) for _, token in senders)


def test_as_its_own_process_until_sigterm(
    receiver: ReceiverHandle,
    pki: CertPaths,
    tokens: tuple[Path, dict[str, str]],
    tmp_path: Path,
) -> None:
    senders = [("cam5", tokens[1]["cam5"])]
    path = tmp_path / "load.json"
    _config(receiver, pki, senders, first_index=20).save(path)
    assert path.stat().st_mode & 0o077 == 0  # it holds tokens
    before = _received(receiver, "cam5")
    child = subprocess.Popen(
        [sys.executable, "-m", "avd.loadgen", str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "loadgen connected=1 failed=0"
        time.sleep(1.0)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 0
    report = json.loads(out.split("loadgen report ", 1)[1])
    assert report["sent"]["cam5"] >= 10
    wait_until(lambda: _received(receiver, "cam5") - before == report["sent"]["cam5"])


def test_config_round_trips_and_never_shows_its_tokens(tmp_path: Path) -> None:
    token = new_token()
    config = LoadConfig("127.0.0.1", 5000, "localhost", "/ca.pem", [("cam", token)])
    config.save(tmp_path / "c.json")
    assert LoadConfig.load(tmp_path / "c.json") == config
    assert token not in repr(config)


def test_source_addresses_are_distinct_loopback_addresses() -> None:
    addresses = [source_address(i) for i in range(2000)]
    assert len(set(addresses)) == 2000
    assert all(a.startswith("127.") for a in addresses)
    assert all(0 < int(part) < 256 for a in addresses for part in a.split(".")[3:])
