"""CaptureThread against a scripted source (a unit test of this one module)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from avd.capture import CaptureThread
from avd.errors import DeviceError
from avd.logs import LogEvent
from avd.media.base import AudioFormat, CapturedFrame, MediaFormat, StreamKind


class ScriptedSource:
    """Opens and reads as its script says: "fail" raises, bytes are frames, None ends."""

    kind = StreamKind.AUDIO
    format: MediaFormat = AudioFormat(44100, 1, 2, 1024)
    description = "scripted microphone"

    def __init__(self, opens: list[bool], reads: list[bytes | str | None]) -> None:
        self.opens = iter(opens)
        self.reads: Iterator[bytes | str | None] = iter(reads)
        self.open_calls = 0
        self.close_calls = 0
        self.stopped = threading.Event()

    def open(self) -> None:
        self.open_calls += 1
        if not next(self.opens, True):
            raise DeviceError("microphone 'usb' cannot be opened: unplugged")

    def read(self) -> CapturedFrame | None:
        item = next(self.reads, None)
        if item == "fail":
            raise DeviceError("microphone 'usb' read failed: device gone")
        if item is None or self.stopped.is_set():
            return None
        assert isinstance(item, bytes)
        return CapturedFrame(capture_us=len(item), data=item)

    def close(self) -> None:
        self.close_calls += 1

    def stop(self) -> None:
        self.stopped.set()


def _run(source: ScriptedSource, monkeypatch: pytest.MonkeyPatch) -> tuple[list[bytes], bool]:
    monkeypatch.setattr("avd.capture.OPEN_RETRY_FIRST_S", 0.01)
    delivered: list[bytes] = []
    done = threading.Event()
    thread = CaptureThread(source, lambda f: delivered.append(f.data), done.set)
    thread.start()
    assert done.wait(5), "the capture thread did not finish"
    thread.stop()
    return delivered, done.is_set()


def test_delivers_every_frame_then_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    source = ScriptedSource([True], [b"a", b"b", b"c", None])
    delivered, finished = _run(source, monkeypatch)
    assert delivered == [b"a", b"b", b"c"]
    assert finished
    assert source.close_calls >= 1


def test_a_device_that_cannot_be_opened_is_retried_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "avd.capture")
    source = ScriptedSource([False, False, False, True], [b"x", None])
    delivered, _ = _run(source, monkeypatch)
    assert delivered == [b"x"]
    assert source.open_calls == 4
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "microphone 'usb' cannot be opened" in errors[0].getMessage()
    assert getattr(errors[0], "avd_event", None) is LogEvent.DEVICE_LOST
    (back,) = [r for r in caplog.records if "available again" in r.getMessage()]
    assert getattr(back, "avd_event", None) is LogEvent.DEVICE_BACK
    assert getattr(back, "avd_fields", None) == {"stream": "audio", "device": "scripted microphone"}


def test_a_device_lost_while_reading_is_reopened_and_capture_resumes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "avd.capture")
    source = ScriptedSource([True, False, True], [b"1", b"2", "fail", b"3", None])
    delivered, _ = _run(source, monkeypatch)
    assert delivered == [b"1", b"2", b"3"]
    assert source.open_calls == 3
    (lost,) = [r for r in caplog.records if "device gone; reopening" in r.getMessage()]
    assert getattr(lost, "avd_event", None) is LogEvent.DEVICE_LOST


def test_stop_ends_a_source_that_never_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("avd.capture.OPEN_RETRY_FIRST_S", 0.01)
    source = ScriptedSource([False] * 10_000, [])
    done = threading.Event()
    thread = CaptureThread(source, lambda f: None, done.set)
    thread.start()
    thread.stop(timeout=5)
    assert done.wait(5)
