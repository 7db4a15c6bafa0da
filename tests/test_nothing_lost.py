"""Nothing lost: a receiver killed with SIGKILL and restarted seconds later costs the
recordings nothing; every frame the sender captured is recorded, once.

Real daemons, real TLS, real recordings read back frame by frame (each packet carries its
capture time, see avd.media.recorded_index).
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from avd.certs import CertPaths
from avd.media.base import StreamKind
from avd.media.recorded_index import recorded_stamps

from .conftest import (
    Credentials,
    Daemon,
    ReceiverHandle,
    metric,
    receiver_env,
    scrape,
    sender_env,
    start_receiver,
    wait_until,
)

pytestmark = pytest.mark.slow


def _recorded(record_dir: Path, sender_id: str) -> Counter[tuple[StreamKind, int]]:
    stamps: Counter[tuple[StreamKind, int]] = Counter()
    for path in sorted((record_dir / sender_id).glob("*/*.mkv")):
        stamps.update(recorded_stamps(path, sender_id))
    return stamps


def _received(handle: ReceiverHandle) -> float:
    return metric(handle.metrics(), "avd_frames_received_total")


def test_a_receiver_killed_and_restarted_costs_the_recordings_nothing(
    pki: CertPaths, creds: Credentials, tmp_path: Path, daemons: list[Daemon]
) -> None:
    record_dir = tmp_path / "recordings"
    settings = {
        "AVD_RECORD_DIR": str(record_dir),
        "AVD_SEGMENT_SECONDS": "3",
        "AVD_MIN_FREE_GB": "0",
    }
    first = start_receiver(receiver_env(pki, creds.tokens_file, **settings), tmp_path / "r1.log")
    daemons.append(first.daemon)
    sender = Daemon(
        "sender", sender_env(pki, first, "cam1", creds.tokens["cam1"]), tmp_path / "s.log"
    )
    daemons.append(sender)
    sender_url = sender.wait_for_log(r"metrics=(http://\S+)").group(1)
    wait_until(lambda: _received(first) > 60)
    time.sleep(1.0)

    first.daemon.proc.send_signal(signal.SIGKILL)  # mid-segment, frames in flight
    first.daemon.kill()
    time.sleep(3.0)  # the sender spools meanwhile
    ports = {"AVD_VIDEO_PORT": str(first.video_port), "AVD_AUDIO_PORT": str(first.audio_port)}
    second = start_receiver(
        receiver_env(pki, creds.tokens_file, **settings, **ports), tmp_path / "r2.log"
    )
    daemons.append(second.daemon)
    wait_until(lambda: metric(second.metrics(), "avd_frames_late_total") > 30, 20)
    time.sleep(3.0)
    assert metric(scrape(sender_url), "avd_frames_lost_total") == 0

    assert sender.stop() == 0  # capture stops, the rest is flushed and acknowledged
    assert second.daemon.stop() == 0
    summary = {
        kind: dict(re.findall(r"(\w[\w-]*)=(\d+)", line))
        for kind, line in re.findall(r"(video|audio): (captured=.*)", sender.log_text())
    }
    recorded = _recorded(record_dir, "cam1")
    duplicates = {stamp: n for stamp, n in recorded.items() if n > 1}
    assert not duplicates, f"recorded more than once: {sorted(duplicates)[:5]}"
    for kind in (StreamKind.VIDEO, StreamKind.AUDIO):
        counts = summary[kind.label]
        captured = int(counts["captured"])
        frames = sum(1 for k, _ in recorded if k is kind)
        assert int(counts["lost"]) == 0
        assert int(counts["unacknowledged"]) == 0, counts
        assert frames == captured, f"{kind.label}: {frames} recorded of {captured} captured"
