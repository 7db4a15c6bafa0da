"""Video sources and the pacer: the test pattern, real MJPG files read back through cv2, and
the camera reopen logic against a scripted fake capture (no camera exists on this machine)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from avd.errors import DeviceError
from avd.media import video
from avd.media.base import CapturedFrame, StreamKind, VideoFormat
from avd.media.jpeg import jpeg_dimensions
from avd.media.pacing import Pacer
from avd.media.video import (
    OPENCV_THREADS,
    CaptureSource,
    TestPatternScene,
    TestPatternSource,
    _FrameRateCap,
    is_camera,
    open_video_source,
    video_source_problem,
)

VGA = VideoFormat(width=640, height=480, fps=20, quality=70)
QVGA_FAST = VideoFormat(width=320, height=240, fps=50, quality=70)


def decode(frame: CapturedFrame) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(frame.data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return np.asarray(img)


def read_all(source: Any, limit: int = 1000) -> list[CapturedFrame]:
    frames: list[CapturedFrame] = []
    while (frame := source.read()) is not None and len(frames) < limit:
        frames.append(frame)
    return frames


def read_in_thread(source: Any) -> tuple[threading.Thread, list[CapturedFrame | None]]:
    results: list[CapturedFrame | None] = []
    reader = threading.Thread(target=lambda: results.append(source.read()), daemon=True)
    reader.start()
    return reader, results


# --- Pacer ---------------------------------------------------------------------------------


class ManualClock:
    def __init__(self, now_us: int = 1_000_000) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us


def test_pacer_due_times_are_exact_from_the_count() -> None:
    clock = ManualClock()
    pacer = Pacer(Fraction(44100, 1024), clock=clock)
    assert pacer.period_us == 23219
    assert pacer.due_us(0) == 1_000_000
    assert pacer.due_us(1) == 1_000_000 + 23219
    assert pacer.due_us(44100) == 1_000_000 + 1024 * 1_000_000  # no accumulated rounding


def test_pacer_reanchors_after_a_stall_instead_of_bursting() -> None:
    clock = ManualClock()
    pacer, stop = Pacer(20, clock=clock), threading.Event()
    clock.now_us += 120_000  # a little late (within 200 ms): catch up, no re-anchor
    assert pacer.wait(2, stop)
    assert pacer.reanchors == 0
    assert pacer.due_us(3) == 1_150_000
    clock.now_us = 3_000_000  # stalled for ~2 s: period 3 becomes due now
    assert pacer.wait(3, stop)
    assert pacer.reanchors == 1
    assert pacer.due_us(3) == 3_000_000
    assert pacer.due_us(4) == 3_050_000  # period 4 is a full period later: no burst


def test_pacer_wait_sleeps_until_due_and_honours_stop() -> None:
    pacer, stop = Pacer(10), threading.Event()
    start = time.monotonic()
    assert pacer.wait(1, stop)
    assert time.monotonic() - start >= 0.099
    threading.Timer(0.05, stop.set).start()
    start = time.monotonic()
    assert not pacer.wait(100, stop)  # ten seconds away, but stopped after 50 ms
    assert time.monotonic() - start < 1.0
    assert not pacer.wait(0, stop)


def test_pacer_refuses_a_zero_rate() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Pacer(0)


# --- test pattern --------------------------------------------------------------------------


def test_test_pattern_is_a_camera_like_jpeg_of_the_configured_size() -> None:
    source = TestPatternSource(VGA)
    assert source.kind is StreamKind.VIDEO
    assert source.description == "test pattern 640x480@20"
    source.open()
    first, second = source.read(), source.read()
    assert first is not None
    assert second is not None
    assert jpeg_dimensions(first.data) == (640, 480)
    img = decode(first)
    assert img.shape == (480, 640, 3)
    assert img.std() > 20  # not a flat colour
    # Realistic size for a camera at q70: neither a flat-colour 5 KiB nor white noise.
    assert 20 * 1024 <= len(first.data) <= 40 * 1024
    assert not np.array_equal(img, decode(second))  # it moves
    assert second.capture_us > first.capture_us
    source.stop()
    source.close()


@pytest.mark.parametrize(("width", "height"), [(160, 120), (1280, 720), (33, 17)])
def test_test_pattern_follows_the_configured_size(width: int, height: int) -> None:
    source = TestPatternSource(VideoFormat(width, height, 30, 80))
    source.open()
    frame = source.read()
    assert frame is not None
    assert decode(frame).shape == (height, width, 3)


def test_rendering_a_frame_is_well_under_two_milliseconds() -> None:
    scene = TestPatternScene(640, 480, 20)
    timings = []
    for n in range(60):
        start = time.perf_counter()
        scene.render(n)
        timings.append(time.perf_counter() - start)
    # Measured 0.23 ms median here; the bound is loose for a shared machine.
    assert float(np.median(timings)) < 0.002


def test_test_pattern_is_paced_at_fps() -> None:
    source = TestPatternSource(QVGA_FAST)
    source.open()
    start = time.monotonic()
    frames = [source.read() for _ in range(16)]
    elapsed = time.monotonic() - start
    assert all(frame is not None for frame in frames)
    assert elapsed >= 15 / 50 - 0.002  # frame 0 at once, then 15 periods of 20 ms
    assert elapsed < 3.0


def test_stop_unblocks_the_test_pattern() -> None:
    source = TestPatternSource(VideoFormat(320, 240, 1, 70))
    source.open()
    assert source.read() is not None  # the next frame is a second away
    reader, results = read_in_thread(source)
    time.sleep(0.05)
    stopped_at = time.monotonic()
    source.stop()
    reader.join(timeout=2)
    assert results == [None]
    assert time.monotonic() - stopped_at < 0.5


# --- capture from real files ---------------------------------------------------------------


def write_avi(path: Path, frames: int, size: tuple[int, int] = (320, 240), fps: float = 50) -> None:
    """An MJPG .avi whose frame i is a flat grey of level 10 * i (to recognise it again)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 10 * i, np.uint8))
    writer.release()


def grey_levels(frames: list[CapturedFrame]) -> list[int]:
    return [round(float(decode(f).mean()) / 10) for f in frames]


def test_video_file_is_read_back_at_its_own_rate(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    write_avi(path, 12, fps=50)
    source = CaptureSource(str(path), VideoFormat(320, 240, 5, 80))  # 5 fps configured
    assert source.description == f"video file {path}"
    source.open()
    start = time.monotonic()
    frames = read_all(source)
    elapsed = time.monotonic() - start
    assert grey_levels(frames) == list(range(12))
    assert all(jpeg_dimensions(f.data) == (320, 240) for f in frames)
    assert 11 / 50 - 0.002 <= elapsed < 11 / 5  # the file's 50 fps, not the configured 5
    assert source.read() is None  # ended for good
    source.close()
    source.close()


def test_frames_of_another_size_are_resized(tmp_path: Path) -> None:
    path = tmp_path / "big.avi"
    write_avi(path, 3, size=(320, 240))
    source = CaptureSource(str(path), VideoFormat(200, 100, 50, 80))
    source.open()
    frames = read_all(source)
    assert [jpeg_dimensions(f.data) for f in frames] == [(200, 100)] * 3
    assert grey_levels(frames) == [0, 1, 2]


def test_a_looping_file_starts_again(tmp_path: Path) -> None:
    path = tmp_path / "loop.avi"
    write_avi(path, 4)
    source = CaptureSource(str(path), QVGA_FAST, loop=True)
    source.open()
    frames = [source.read() for _ in range(10)]
    assert grey_levels([f for f in frames if f is not None]) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    source.stop()
    assert source.read() is None


def test_missing_file_and_camera_name_the_device(tmp_path: Path) -> None:
    missing = tmp_path / "x.mp4"
    with pytest.raises(DeviceError) as caught:
        CaptureSource(str(missing), VGA).open()
    assert str(caught.value) == f"video file {missing} cannot be opened: no such file"
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"not a video" * 100)
    with pytest.raises(DeviceError, match="not a video OpenCV can read"):
        CaptureSource(str(garbage), VGA).open()
    with pytest.raises(DeviceError) as caught:
        CaptureSource("99", VGA).open()
    assert str(caught.value) == "camera 99 cannot be opened: no such device"
    with pytest.raises(DeviceError) as caught:
        CaptureSource("/dev/video-avd-missing", VGA).open()
    assert str(caught.value) == "camera /dev/video-avd-missing cannot be opened: no such device"


def test_open_video_source_dispatches_on_the_spec() -> None:
    assert open_video_source("none", VGA) is None
    assert isinstance(open_video_source("test", VGA), TestPatternSource)
    camera = open_video_source("0", VGA)
    assert isinstance(camera, CaptureSource)
    assert camera.description == "camera 0"
    clip = open_video_source("clip.mp4", VGA, loop=True)
    assert isinstance(clip, CaptureSource)
    assert clip.description == "video file clip.mp4"
    stream = open_video_source("rtsp://admin:hunter2@cam.local:554/live", VGA)
    assert stream is not None
    assert stream.description == "stream rtsp://***@cam.local:554/live"


# --- cameras: rate cap and reopen logic, against a scripted fake ---------------------------


def test_rate_cap_passes_at_most_fps() -> None:
    def accepted(device_fps: float, seconds: int = 10, jitter_us: int = 0) -> int:
        cap, rng = _FrameRateCap(20), np.random.default_rng(1)
        times = np.arange(0, seconds * 1e6, 1e6 / device_fps)
        times += rng.integers(-jitter_us, jitter_us + 1, len(times))
        return sum(cap.accept(int(t)) for t in times)

    assert 198 <= accepted(30) <= 201  # 2 of 3 frames of a 30 fps camera
    assert accepted(20, jitter_us=8000) == 200  # a jittery 20 fps camera loses nothing
    assert accepted(10) == 100
    assert 198 <= accepted(1000, jitter_us=0) <= 201


class FakeWorld:
    """A camera that can be unplugged and plugged back, and a log of what was tried."""

    def __init__(self, size: tuple[int, int] = (320, 240)) -> None:
        self.present = True
        self.opens_when_absent = False
        self.stalled = False
        self.size = size
        self.opens: list[float] = []
        self.reads = 0

    def factory(self, target: int | str) -> FakeCapture:
        self.opens.append(time.monotonic())
        return FakeCapture(self)


class FakeCapture:
    def __init__(self, world: FakeWorld) -> None:
        self.world, self.opened = world, world.present or world.opens_when_absent

    def isOpened(self) -> bool:
        return self.opened

    def read(self) -> tuple[bool, Any]:
        self.world.reads += 1
        if self.world.stalled:  # a stream whose server stopped sending: each read times out
            time.sleep(0.1)
            return False, None
        if not (self.opened and self.world.present):
            return False, None  # at once, as for a device that vanished
        time.sleep(0.005)  # a device blocks until its next frame
        width, height = self.world.size
        return True, np.full((height, width, 3), 128, np.uint8)

    def release(self) -> None:
        self.opened = False

    def set(self, prop_id: int, value: float, /) -> bool:
        return True

    def get(self, prop_id: int, /) -> float:
        width, height = self.world.size
        return {cv2.CAP_PROP_FRAME_WIDTH: width, cv2.CAP_PROP_FRAME_HEIGHT: height}.get(
            prop_id, 30.0
        )


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video, "REOPEN_FIRST_DELAY_S", 0.05)
    monkeypatch.setattr(video, "REOPEN_MAX_DELAY_S", 0.2)
    monkeypatch.setattr(video, "FAILED_READ_PAUSE_S", 0.01)
    monkeypatch.setattr(video, "STALL_LIMIT_S", 0.35)


def fake_camera(world: FakeWorld, spec: str = "rtsp://cam.invalid/live") -> CaptureSource:
    source = CaptureSource(spec, QVGA_FAST, capture_factory=world.factory)
    source.open()
    return source


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never came true"
        time.sleep(0.01)


def state_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "avd.media.video"]


@pytest.mark.usefixtures("quick_backoff")
def test_camera_lost_and_back_logs_once_each_and_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="avd.media.video")
    world = FakeWorld(size=(640, 360))
    source = fake_camera(world)
    assert state_lines(caplog) == [
        "stream rtsp://cam.invalid/live delivers 640x360 at 30.0 fps (asked 320x240 at 50 fps);"
        " frames will be resized"
    ]
    first = source.read()
    assert first is not None
    assert jpeg_dimensions(first.data) == (320, 240)
    world.present = False
    reader, results = read_in_thread(source)
    wait_until(lambda: len(world.opens) >= 6)  # several reopen attempts while it is away
    reads_while_away = world.reads
    time.sleep(0.3)
    assert world.reads - reads_while_away < 10  # no busy loop: released, waiting on backoff
    assert reader.is_alive()  # read() keeps blocking meanwhile
    world.present = True
    reader.join(timeout=5)
    assert results[0] is not None
    assert jpeg_dimensions(results[0].data) == (320, 240)
    assert state_lines(caplog)[1:] == [
        "stream rtsp://cam.invalid/live lost after 10 failed reads; reopening",
        "stream rtsp://cam.invalid/live is back",
    ]
    source.close()


@pytest.mark.usefixtures("quick_backoff")
def test_reopen_backoff_doubles_up_to_its_cap() -> None:
    world = FakeWorld()
    source = fake_camera(world)
    world.present = False
    reader, _ = read_in_thread(source)
    wait_until(lambda: len(world.opens) >= 6)
    source.stop()
    reader.join(timeout=2)
    gaps = np.diff(world.opens[1:6])  # between reopen attempts
    assert gaps[0] >= 0.095  # 0.1 s, after the first attempt waited 0.05 s
    assert gaps[1] >= 0.19  # 0.2 s: the cap
    assert gaps[2] >= 0.19
    assert max(gaps) < 1.0  # capped, not doubling on (0.4, 0.8, ...)


@pytest.mark.usefixtures("quick_backoff")
def test_a_vanished_device_node_is_given_up_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="avd.media.video")
    world = FakeWorld()
    source = fake_camera(world, spec="/dev/video-avd-unplugged")  # the node never exists
    world.present = False
    reader, _ = read_in_thread(source)
    wait_until(lambda: len(world.opens) >= 2)
    source.stop()
    reader.join(timeout=2)
    assert state_lines(caplog) == [
        "camera /dev/video-avd-unplugged lost after 1 failed reads; reopening"
    ]


@pytest.mark.usefixtures("quick_backoff")
def test_a_device_that_opens_but_does_not_deliver_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="avd.media.video")
    world = FakeWorld()
    source = fake_camera(world)
    caplog.clear()
    world.present, world.opens_when_absent = False, True  # reopens "succeed", reads fail
    reader, results = read_in_thread(source)
    wait_until(lambda: len(world.opens) >= 4)  # lost, reopened, lost again, ...
    world.present = True
    reader.join(timeout=5)
    assert results[0] is not None
    assert state_lines(caplog) == [
        "stream rtsp://cam.invalid/live lost after 10 failed reads; reopening",
        "stream rtsp://cam.invalid/live is back",
    ]


def test_a_short_glitch_is_ridden_out_without_a_reopen(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="avd.media.video")
    world = FakeWorld()
    source = fake_camera(world)
    caplog.clear()
    world.present = False  # reads fail at once for 0.2 s: fewer than 10 paced failures
    threading.Timer(0.2, lambda: setattr(world, "present", True)).start()
    frame = source.read()
    assert frame is not None
    assert len(world.opens) == 1
    assert state_lines(caplog) == []


@pytest.mark.usefixtures("quick_backoff")
def test_a_stalled_stream_is_given_up_by_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="avd.media.video")
    world = FakeWorld()
    source = fake_camera(world)
    assert source.read() is not None
    world.stalled = True
    reader, results = read_in_thread(source)
    wait_until(lambda: len(world.opens) >= 2)
    world.stalled = False
    reader.join(timeout=5)
    assert results[0] is not None
    (lost,) = state_lines(caplog)
    failures = int(lost.split(" after ")[1].split()[0])
    assert 3 <= failures <= 5  # 0.35 s of 0.1 s timeouts, not 10 of them


def test_stop_unblocks_a_read_waiting_for_a_lost_camera() -> None:
    world = FakeWorld()
    source = fake_camera(world)  # real backoff: the first reopen is 0.5 s after the loss
    world.present = False
    reader, results = read_in_thread(source)
    wait_until(lambda: world.reads >= 10)
    stopped_at = time.monotonic()
    source.stop()
    reader.join(timeout=2)
    assert results == [None]
    assert time.monotonic() - stopped_at < 0.3
    source.close()
    source.close()


def test_close_from_another_thread_releases_and_ends() -> None:
    world = FakeWorld()
    source = fake_camera(world)
    source.stop()
    source.close()
    assert source.read() is None


class UnseekableClip(FakeCapture):
    """A file-like capture of three frames that cannot seek back (a pipe, some containers)."""

    def __init__(self, world: FakeWorld) -> None:
        super().__init__(world)
        self.left = 3

    def read(self) -> tuple[bool, Any]:
        self.left -= 1
        if self.left < 0:
            return False, None
        return True, np.full((240, 320, 3), 10 * self.left, np.uint8)

    def set(self, prop_id: int, value: float, /) -> bool:
        return False


def test_a_file_that_cannot_seek_is_reopened_to_loop() -> None:
    world = FakeWorld()
    opened: list[UnseekableClip] = []

    def factory(target: int | str) -> UnseekableClip:
        world.opens.append(time.monotonic())
        opened.append(UnseekableClip(world))
        return opened[-1]

    source = CaptureSource("clip.avi", QVGA_FAST, loop=True, capture_factory=factory)
    source.open()
    frames = [source.read() for _ in range(7)]
    assert grey_levels([f for f in frames if f is not None]) == [2, 1, 0, 2, 1, 0, 2]
    assert len(opened) == 3
    assert [clip.opened for clip in opened] == [False, False, True]  # old ones released
    source.close()
    assert not opened[-1].opened


def test_reading_before_open_is_an_error_and_after_close_the_end() -> None:
    for source in (TestPatternSource(VGA), CaptureSource("clip.avi", VGA)):
        with pytest.raises(DeviceError, match="was read before open"):
            source.read()
    pattern = TestPatternSource(VGA)
    pattern.open()
    pattern.close()
    assert pattern.read() is None


# --- a real stream: MJPEG over HTTP on loopback, read by OpenCV's FFmpeg backend --------------


class MjpegServer:
    """multipart/x-mixed-replace JPEGs at 25 fps, as IP cameras serve them; can be killed
    and brought back on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._listener: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._up = threading.Event()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.port, self._listener = listener.getsockname()[1], listener
        self._up.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def kill(self) -> None:
        self._up.clear()
        for sock in [self._listener, *self._clients]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._clients.clear()

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                self._clients.append(client)
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        _, jpeg = cv2.imencode(".jpg", np.full((120, 160, 3), 200, np.uint8))
        part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
        with contextlib.suppress(OSError):
            client.recv(4096)
            client.sendall(b"HTTP/1.0 200 OK\r\n")
            client.sendall(b"Content-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
            while self._up.is_set():
                client.sendall(part + bytes(jpeg) + b"\r\n")
                time.sleep(0.04)


@pytest.mark.usefixtures("quick_backoff")
def test_a_real_http_stream_is_lost_and_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="avd.media.video")
    server = MjpegServer()
    server.start()
    url = f"http://127.0.0.1:{server.port}/video"
    source = CaptureSource(url, VideoFormat(320, 240, 10, 70))
    source.open()
    try:
        frames = [source.read() for _ in range(3)]
        assert [decode(f).shape for f in frames if f is not None] == [(240, 320, 3)] * 3
        server.kill()
        reader, results = read_in_thread(source)
        wait_until(lambda: any("lost" in line for line in state_lines(caplog)))
        time.sleep(0.3)  # a few refused reconnects
        server.start()
        reader.join(timeout=10)
        assert results[0] is not None
        assert jpeg_dimensions(results[0].data) == (320, 240)
    finally:
        source.close()
        server.kill()
    assert [line.split(" ")[2] for line in state_lines(caplog)] == ["delivers", "lost", "is"]


def test_a_video_source_leaves_opencv_one_thread() -> None:
    """OpenCV's pool of a thread per core cost the sender more than it saved (see
    OPENCV_THREADS): opening a source sets it, for the process."""
    cv2.setNumThreads(cv2.getNumberOfCPUs())
    source = open_video_source("test", VideoFormat(64, 48, 5, 50))
    assert source is not None
    assert cv2.getNumThreads() == OPENCV_THREADS == 1


def test_a_camera_is_told_from_a_file_or_a_stream_by_its_setting() -> None:
    assert [is_camera(s) for s in ("0", "/dev/video2", "/srv/a.mp4", "rtsp://cam/x")] == [
        True,
        True,
        False,
        False,
    ]
    assert video_source_problem("/dev/video99") == "no such device"
    assert video_source_problem("/nonexistent/a.mp4") == "no such file"
    assert video_source_problem("rtsp://cam/x") is None  # a stream: not looked at
