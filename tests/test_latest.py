"""avd.media.latest: latest.jpg on a real file system, with a controlled clock for the rate."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from avd.media.latest import LatestJpeg


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def jpeg(shade: int) -> bytes:
    image = np.full((480, 640, 3), shade, np.uint8)
    cv2.circle(image, (320, 240), 100, (0, 0, 255), -1)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    return bytes(encoded.tobytes())


def test_written_at_most_once_per_interval_and_never_stale_by_more(tmp_path: Path) -> None:
    clock = FakeClock()
    latest = LatestJpeg(tmp_path, interval=1.0, clock=clock)
    path = latest.path("cam1")
    assert path == tmp_path / "cam1" / "latest.jpg"

    latest.offer("cam1", jpeg(10))
    assert path.read_bytes() == jpeg(10), "the first frame is written at once"
    clock.now += 0.5
    latest.offer("cam1", jpeg(20))
    latest.flush_due()
    assert path.read_bytes() == jpeg(10), "not again within the interval"
    clock.now += 0.5
    latest.flush_due()
    assert path.read_bytes() == jpeg(20), "the pending frame goes out when due"
    clock.now += 5
    latest.flush_due()
    assert path.read_bytes() == jpeg(20), "nothing pending, nothing written"

    image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    assert image.shape == (480, 640, 3)
    assert [p.name for p in path.parent.iterdir()] == ["latest.jpg"], "no temporary file left"


def test_each_sender_has_its_own_file_and_rate(tmp_path: Path) -> None:
    clock = FakeClock()
    latest = LatestJpeg(tmp_path, interval=1.0, clock=clock)
    latest.offer("cam1", jpeg(1))
    clock.now += 0.1
    latest.offer("cam2", jpeg(2))
    assert latest.path("cam1").read_bytes() == jpeg(1)
    assert latest.path("cam2").read_bytes() == jpeg(2)


def test_readers_only_ever_see_whole_pictures(tmp_path: Path) -> None:
    latest = LatestJpeg(tmp_path, interval=0.0)
    pictures = [jpeg(shade) for shade in (0, 128, 255)]
    latest.offer("cam1", pictures[0])
    done = threading.Event()

    def write() -> None:
        for i in range(300):
            latest.offer("cam1", pictures[i % 3])
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while not done.is_set() or reads < 50:
        assert latest.path("cam1").read_bytes() in pictures
        reads += 1
    writer.join()


def test_a_failing_write_warns_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="avd.media.latest")
    clock = FakeClock()
    latest = LatestJpeg(tmp_path, interval=1.0, clock=clock)
    (tmp_path / "cam1").write_bytes(b"a file where the sender's folder should be")
    for _ in range(3):
        latest.offer("cam1", jpeg(1))  # must not raise
        clock.now += 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cam1/latest.jpg" in warnings[0].getMessage()

    (tmp_path / "cam1").unlink()
    latest.offer("cam1", jpeg(2))
    assert latest.path("cam1").read_bytes() == jpeg(2)
    assert any("updated again" in r.getMessage() for r in caplog.records)
