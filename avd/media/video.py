"""The sender's video sources: a synthetic test pattern, and cameras, streams and files.

Every source meets on ``avd.media.base.MediaSource``: ``read()`` runs on the source's own
thread, blocks until the next frame is due, and returns it already JPEG-encoded (encoding
off the event loop, where a 0.5 ms encode per frame would add up) and stamped with
``avd.clock.monotonic_us()`` at capture.

A camera that goes away (unplugged, driver reset, a stream whose server restarts) is
released and reopened with a doubling backoff while ``read()`` keeps blocking: the network
sessions stay up, one line is logged when it is lost and one when it is back, and the CPU
stays idle meanwhile (camera reconnect spins and log storms are the bugs NVR users report
most).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import urllib.parse
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from avd.clock import monotonic_us
from avd.errors import DeviceError
from avd.media.base import CapturedFrame, MediaFormat, MediaSource, StreamKind, VideoFormat
from avd.media.pacing import Pacer

# OpenCV splits its larger operations (colour conversion, resizing, the test pattern's
# cv2.add of noise) over a pool of one thread per core. On a camera's frame each piece is a fraction
# of a millisecond, and waking another core for it 20 times a second cost more than it
# saved: the sender at 20 fps took 5.5 % of a core with the pool, 4.1 % with one thread
# (the test pattern, four interleaved pairs; docs/performance.md). JPEG encoding and
# decoding (libjpeg) use one thread either way: their rates do not change.
OPENCV_THREADS = 1

log = logging.getLogger("avd.media.video")

Image = npt.NDArray[np.uint8]

FAILURES_BEFORE_REOPEN = 10
# Between failed reads: a vanished device fails at once, and 10 failures spread over 0.5 s
# let a glitch pass without the cost of a reopen.
FAILED_READ_PAUSE_S = 0.05
# A stream that stalls fails each read only after its read timeout: give up on it after this
# long without a frame, rather than after 10 timeouts.
STALL_LIMIT_S = 5.0
STREAM_OPEN_TIMEOUT_MS = 5000  # FFmpeg's own defaults wait far longer on a dead server
STREAM_READ_TIMEOUT_MS = 2000
REOPEN_FIRST_DELAY_S = 0.5
REOPEN_MAX_DELAY_S = 10.0
MAX_FILE_FPS = 240.0  # above this a file's CAP_PROP_FPS is junk (some containers say 1000)


def encode_jpeg(img: Image, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise DeviceError(f"JPEG encoding of a {img.shape} image failed")
    return bytes(buf)


class TestPatternSource:
    """A synthetic, camera-like moving picture, paced in real time at ``fmt.fps``.

    Not a flat colour: a textured, slowly panning background, moving shapes, sensor-like
    noise and a frame counter, so that its JPEG size (about 24 KiB at 640x480 q70) and
    encode time are those of a real camera. Everything that does not move is drawn once in
    ``open()``; a frame is a copy, a few shapes and one saturating add (about 0.2 ms).
    """

    __test__ = False  # a source, not a pytest test class
    kind = StreamKind.VIDEO

    def __init__(self, fmt: VideoFormat) -> None:
        self.format: MediaFormat = fmt
        self.quality = fmt.quality  # lowered and restored by the sender's dynamic quality
        self._fmt = fmt
        self.description = f"test pattern {fmt.width}x{fmt.height}@{fmt.fps}"
        self._stop = threading.Event()
        self._scene: TestPatternScene | None = None
        self._pacer: Pacer | None = None
        self._n = 0

    def open(self) -> None:
        self._scene = TestPatternScene(self._fmt.width, self._fmt.height, self._fmt.fps)
        self._pacer = Pacer(self._fmt.fps)
        self._n = 0

    def read(self) -> CapturedFrame | None:
        scene, pacer = self._scene, self._pacer  # close() may clear them meanwhile
        if self._stop.is_set():
            return None
        if scene is None or pacer is None:
            raise DeviceError(f"{self.description} was read before open()")
        if not pacer.wait(self._n, self._stop):
            return None
        img = scene.render(self._n)
        capture_us = monotonic_us()
        self._n += 1
        return CapturedFrame(capture_us=capture_us, data=encode_jpeg(img, self.quality))

    def close(self) -> None:
        self._stop.set()
        self._scene = None

    def stop(self) -> None:
        self._stop.set()


def camera_like_images(fmt: VideoFormat, count: int) -> list[Image]:
    """``count`` different pictures of the test pattern at ``fmt``'s size, uncompressed.

    For code that needs camera-like frames without a paced source (the bench's JPEG timings,
    the load generator's pre-encoded frames): the same scene ``TestPatternSource`` sends, so
    the JPEG sizes and codec times are those of a real stream. Seven frames apart, so that
    the moving shapes and the noise differ from one picture to the next.
    """
    scene = TestPatternScene(fmt.width, fmt.height, fmt.fps)  # drawn once: the background is costly
    return [scene.render(7 * n).copy() for n in range(count)]  # render() reuses one buffer


class TestPatternScene:
    """The precomputed parts of the test pattern, and the drawing of one frame.

    Public for code that needs the pattern's pictures one by one without its JPEG and
    pacing (``make peers`` hands them to NetGear, which encodes them itself)."""

    __test__ = False  # a picture, not a pytest test class

    PAN = 128  # pixels of extra background width the view pans across
    NOISE = 8  # peak-to-peak sensor noise, in levels of 255
    NOISE_ROWS = 31  # the noise plane is taller than a frame: each frame starts on another row

    def __init__(self, width: int, height: int, fps: int) -> None:
        self.width, self.height, self.fps = width, height, fps
        rng = np.random.default_rng(2024)  # fixed: every run draws the same scene
        # Lowered by half the noise amplitude so that adding 0..NOISE keeps the mean level.
        self.background = _background(width + self.PAN, height, rng, -(self.NOISE // 2))
        shape = (height + self.NOISE_ROWS, width, 3)
        self.noise = rng.integers(0, self.NOISE + 1, shape, dtype=np.uint8)
        self.frame: Image = np.empty((height, width, 3), np.uint8)
        self.scale = min(width, height) / 480  # shapes and text follow the frame size

    def render(self, n: int) -> Image:
        w, h, s, frame = self.width, self.height, self.scale, self.frame
        pan = int(self.PAN / 2 * (1 + math.sin(n / (8 * self.fps))))
        np.copyto(frame, self.background[:, pan : pan + w])
        ball = (int(w / 2 + w / 3 * math.sin(n / 25)), int(h / 2 + h / 3 * math.cos(n / 31)))
        cv2.circle(frame, ball, int(45 * s), (40, 200, 230), -1, cv2.LINE_AA)
        x = n * 4 % (w + 120) - 120
        cv2.rectangle(
            frame, (x, int(0.62 * h)), (x + int(100 * s), int(0.78 * h)), (200, 60, 50), -1
        )
        text = f"avd test pattern #{n:06d}  {n / self.fps:9.2f} s"
        org, font = (int(10 * s), int(30 * s)), cv2.FONT_HERSHEY_SIMPLEX
        cv2.putText(frame, text, org, font, 0.7 * s, (0, 0, 0), max(1, int(4 * s)), cv2.LINE_AA)
        cv2.putText(
            frame, text, org, font, 0.7 * s, (255, 255, 255), max(1, int(2 * s)), cv2.LINE_AA
        )
        row = n % self.NOISE_ROWS
        cv2.add(frame, self.noise[row : row + h], dst=frame)
        return frame


def _background(width: int, height: int, rng: np.random.Generator, lift: int) -> Image:
    """Soft colour gradients, a blotchy luminance texture and a few flat "objects"."""
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    blue, green, red = 70 + 90 * x + 30 * y, 90 + 80 * y + 20 * np.sin(x * 9), 150 - 80 * x * y
    planes = np.stack(np.broadcast_arrays(blue, green, red), axis=-1)
    blotches = rng.normal(0.0, 1.0, (max(1, height // 10), max(1, width // 10))).astype(np.float32)
    texture = cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC) * 14
    img: Image = np.clip(planes + texture[:, :, None] + lift, 0, 255).astype(np.uint8)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = rng.integers(10, max(11, min(width, height) // 4), 2)
        colour = tuple(int(c) for c in rng.integers(30, 226, 3))
        cv2.rectangle(img, (x0, y0), (x0 + int(size[0]), y0 + int(size[1])), colour, -1)
    return img


class VideoCaptureLike(Protocol):
    """The part of ``cv2.VideoCapture`` the capture source uses (a fake meets it in tests)."""

    def isOpened(self) -> bool: ...

    def read(self) -> tuple[bool, Any]: ...

    def release(self) -> None: ...

    def set(self, prop_id: int, value: float, /) -> bool: ...

    def get(self, prop_id: int, /) -> float: ...


CaptureFactory = Callable[[int | str], VideoCaptureLike]


def cv2_capture(target: int | str) -> VideoCaptureLike:
    """The real capture: a camera index, or a path or URL for OpenCV's FFmpeg/V4L2 backends."""
    if isinstance(target, int):  # two overloads in OpenCV's stubs, one per argument type
        return cv2.VideoCapture(target)
    if "://" in target:  # bounded waits, so that a dead server is noticed and stop() is heard
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_OPEN_TIMEOUT_MS]
        timeouts += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_READ_TIMEOUT_MS]
        return cv2.VideoCapture(target, cv2.CAP_FFMPEG, timeouts)
    return cv2.VideoCapture(target)


class CaptureSource:
    """Frames from ``cv2.VideoCapture``: a camera index ("0"), a device path, a URL or a file.

    Frames of another size than ``fmt`` are resized (``INTER_AREA``) to it: the stream's
    hello announced that size and the receiver refuses any other, while many cameras ignore
    the size they are asked for. Resizing costs about a millisecond; refusing to start
    because a camera picked 1280x720 would cost the whole stream.

    Files are paced at their own rate (``CAP_PROP_FPS``, else ``fmt.fps``) and end (``None``)
    or, with ``loop``, start again. Cameras and streams are paced by the device, but never
    faster than ``fmt.fps`` (extra frames are dropped); after ``FAILURES_BEFORE_REOPEN``
    failed reads, ``STALL_LIMIT_S`` without a frame, or at once if the device node vanished,
    they are released and reopened with a backoff doubling from 0.5 s to 10 s while
    ``read()`` keeps blocking. ``stop()`` is heard within one device read (a frame period;
    at most ``STREAM_READ_TIMEOUT_MS`` for a stalled stream).
    """

    kind = StreamKind.VIDEO

    def __init__(
        self,
        spec: str,
        fmt: VideoFormat,
        loop: bool = False,
        *,
        capture_factory: CaptureFactory = cv2_capture,
    ) -> None:
        self.format: MediaFormat = fmt
        self.quality = fmt.quality  # lowered and restored by the sender's dynamic quality
        self._fmt, self._loop, self._factory = fmt, loop, capture_factory
        self._target, self._live = _capture_target(spec)
        self.description = _describe(spec, self._target, self._live)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # cv2 captures are not thread-safe: read() vs close()
        self._cap: VideoCaptureLike | None = None
        self._opened = self._closed = False
        self._pacer: Pacer | None = None  # files only
        self._rate_cap = _FrameRateCap(fmt.fps)  # live sources only
        self._n = 0
        self._failures = 0
        self._last_frame_us = 0
        self._lost = False
        self._reopen_delay_s = REOPEN_FIRST_DELAY_S

    def open(self) -> None:
        cap = self._open_capture()
        if cap is None:
            raise DeviceError(f"{self.description} cannot be opened{self._why_not_opened()}")
        self._cap, self._opened, self._last_frame_us = cap, True, monotonic_us()
        if self._live:
            self._log_delivered(cap)
        else:
            self._pacer = Pacer(_file_rate(cap, self._fmt.fps))

    def read(self) -> CapturedFrame | None:
        if not self._opened:
            raise DeviceError(f"{self.description} was read before open()")
        return self._read_live() if self._live else self._read_file()

    def close(self) -> None:
        self._stop.set()  # a read() looping on reopen must not bring the device back
        with self._lock:
            self._closed = True
        self._release()

    def stop(self) -> None:
        self._stop.set()

    def _read_file(self) -> CapturedFrame | None:
        if self._pacer is None or not self._pacer.wait(self._n, self._stop):
            return None
        img = self._grab()
        if img is None and self._loop:
            img = self._rewind()
        if img is None:
            return None
        self._n += 1
        return self._frame(img, monotonic_us())

    def _rewind(self) -> Image | None:
        """The first frame again: seek to 0, or reopen if the container cannot seek."""
        with self._lock:
            if self._cap is None:  # closed meanwhile
                return None
            if self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
                ok, img = self._cap.read()
                if ok and (first := _as_image(img)) is not None:
                    return first
        self._replace_capture(self._open_capture())
        img = self._grab()
        if img is None:
            log.warning("%s has no frame to loop back to; the stream ends", self.description)
        return img

    def _read_live(self) -> CapturedFrame | None:
        while not self._stop.is_set():
            if self._cap is None:
                self._reopen()
                continue
            img = self._grab()
            now_us = monotonic_us()
            if img is None:
                self._failed_read()
                continue
            self._recovered()
            if self._rate_cap.accept(now_us):
                return self._frame(img, now_us)
        return None

    def _grab(self) -> Image | None:
        with self._lock:
            if self._cap is None:
                return None
            ok, img = self._cap.read()
        return _as_image(img) if ok else None

    def _failed_read(self) -> None:
        self._failures += 1
        stalled = monotonic_us() - self._last_frame_us > STALL_LIMIT_S * 1_000_000
        if self._failures >= FAILURES_BEFORE_REOPEN or stalled or self._device_vanished():
            self._lose()
        else:
            self._stop.wait(FAILED_READ_PAUSE_S)  # never spin on a read that fails at once

    def _lose(self) -> None:
        self._release()
        if not self._lost:  # one line per change of state, however long it stays away
            log.warning(
                "%s lost after %d failed reads; reopening", self.description, self._failures
            )
            self._lost = True

    def _recovered(self) -> None:
        self._failures, self._last_frame_us = 0, monotonic_us()
        if self._lost:
            log.info("%s is back", self.description)
            self._lost = False
            self._reopen_delay_s = REOPEN_FIRST_DELAY_S

    def _reopen(self) -> None:
        if self._stop.wait(self._reopen_delay_s):
            return
        self._reopen_delay_s = min(self._reopen_delay_s * 2, REOPEN_MAX_DELAY_S)
        cap = self._open_capture()
        if cap is not None:
            self._failures, self._last_frame_us = 0, monotonic_us()
            self._replace_capture(cap)

    def _release(self) -> None:
        self._replace_capture(None)

    def _replace_capture(self, cap: VideoCaptureLike | None) -> None:
        """Swap the capture under the lock; once closed, a new one is released at once."""
        with self._lock:
            if self._cap is not None:
                self._cap.release()
            if cap is not None and self._closed:
                cap.release()
                cap = None
            self._cap = cap

    def _open_capture(self) -> VideoCaptureLike | None:
        try:
            cap = self._factory(self._target)
        except (cv2.error, OSError):
            return None
        if not cap.isOpened():
            cap.release()
            return None
        if self._live:  # a request: many cameras pick the nearest mode they have
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self._fmt.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self._fmt.height)
            cap.set(cv2.CAP_PROP_FPS, self._fmt.fps)
        return cap

    def _frame(self, img: Image, capture_us: int) -> CapturedFrame:
        size = (self._fmt.width, self._fmt.height)
        if (img.shape[1], img.shape[0]) != size:
            img = np.asarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA), np.uint8)
        return CapturedFrame(capture_us=capture_us, data=encode_jpeg(img, self.quality))

    def _device_vanished(self) -> bool:
        node = _device_node(self._target)
        return node is not None and not os.path.exists(node)

    def _why_not_opened(self) -> str:
        if (problem := _path_problem(self._target, self._live)) is not None:
            return f": {problem}"
        if _device_node(self._target) is None and self._live:
            return ""  # a stream: OpenCV does not say why
        return ": busy or not a capture device" if self._live else ": not a video OpenCV can read"

    def _log_delivered(self, cap: VideoCaptureLike) -> None:
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps, fmt = cap.get(cv2.CAP_PROP_FPS), self._fmt
        resized = "" if (width, height) == (fmt.width, fmt.height) else "; frames will be resized"
        log.info(
            "%s delivers %dx%d at %.1f fps (asked %dx%d at %d fps)%s",
            *(self.description, width, height, fps, fmt.width, fmt.height, fmt.fps, resized),
        )


class _FrameRateCap:
    """Lets at most ``fps`` frames a second through: a token bucket in µs of credit.

    A quarter period of slack each way, so that a camera delivering exactly ``fps`` with
    jittery frame times never loses a frame, while one delivering 30 fps for a 20 fps
    stream passes two frames of three.
    """

    def __init__(self, fps: int) -> None:
        self._period_us = 1_000_000 // fps
        self._max_credit_us = self._period_us * 5 // 4
        self._credit_us = self._max_credit_us
        self._last_us: int | None = None

    def accept(self, now_us: int) -> bool:
        if self._last_us is not None:
            elapsed = now_us - self._last_us
            self._credit_us = min(self._credit_us + elapsed, self._max_credit_us)
        self._last_us = now_us
        if self._credit_us < self._period_us * 3 // 4:
            return False
        self._credit_us -= self._period_us
        return True


def _as_image(img: Any) -> Image | None:
    return img if isinstance(img, np.ndarray) and img.size else None


def _capture_target(spec: str) -> tuple[int | str, bool]:
    """What to hand ``cv2.VideoCapture``, and whether it is live (a camera or a stream)."""
    if spec.isascii() and spec.isdigit():
        return int(spec), True
    return spec, spec.startswith("/dev/") or "://" in spec


def _describe(spec: str, target: int | str, live: bool) -> str:
    if not live:
        return f"video file {spec}"
    if isinstance(target, int) or spec.startswith("/dev/"):
        return f"camera {spec}"
    return f"stream {_without_credentials(spec)}"


def _without_credentials(url: str) -> str:
    """The URL with any user:password replaced, since descriptions end up in logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
    except ValueError:
        return "<unparsable URL>"


def is_camera(spec: str) -> bool:
    """Whether ``spec`` names a camera (an index or a /dev node), not a file or a stream."""
    target, live = _capture_target(spec)
    return live and _device_node(target) is not None


def video_source_problem(spec: str) -> str | None:
    """Why the camera or file ``spec`` names is not there for us, without opening it (a
    running sender may hold it): "no such device", "no such file", "permission denied".
    None when it may be fine, and for "test", "none" and streams (a URL)."""
    if spec in ("none", "test"):
        return None
    return _path_problem(*_capture_target(spec))


def _path_problem(target: int | str, live: bool) -> str | None:
    path = _device_node(target) if live else str(target)
    if path is None:
        return None
    if not os.path.exists(path):
        return "no such device" if live else "no such file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def _device_node(target: int | str) -> str | None:
    """The /dev node a camera target stands for (Linux numbering), if it has one."""
    if isinstance(target, int):
        return f"/dev/video{target}"
    return target if target.startswith("/dev/") else None


def _file_rate(cap: VideoCaptureLike, fallback_fps: int) -> Fraction:
    """The file's own frame rate (29.97 stays 30000/1001), or the configured one."""
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not 0 < fps <= MAX_FILE_FPS:  # also false for NaN
        return Fraction(fallback_fps)
    return Fraction(fps).limit_denominator(1001)


def open_video_source(spec: str, fmt: VideoFormat, loop: bool = False) -> MediaSource | None:
    """``"none"``: no video; ``"test"``: the test pattern; anything else: a capture source.

    Also sets OpenCV's thread pool for this process to OPENCV_THREADS (see there)."""
    if spec == "none":
        return None
    cv2.setNumThreads(OPENCV_THREADS)
    if spec == "test":
        return TestPatternSource(fmt)
    return CaptureSource(spec, fmt, loop)
