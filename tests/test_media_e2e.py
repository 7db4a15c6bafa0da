"""End to end: real media devices and files through the real daemons.

- A microphone: the real ``avd-sender`` captures with PyAudio from an ALSA file device whose
  input is a known pattern; the real ``avd-receiver`` plays it with PyAudio to its own ALSA
  file device and records it. The pattern must come out byte-exact at both ends.
- A video file: an MJPG .avi written with ``cv2.VideoWriter`` is the sender's source; every
  one of its frames must be recorded, in order, and look like the file's frame.

Each daemon gets its own ALSA files (``tests/alsa``): PyAudio opens every device while
probing, which would truncate another process's output.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import cv2
import numpy as np
import numpy.typing as npt
import pytest

from .alsa.alsa_env import AlsaDevices, make_alsa_devices
from .conftest import Launcher, ReceiverHandle, metric, wait_until

pytestmark = pytest.mark.slow

RATE = 44100
CHUNK_BYTES = 1024 * 2  # the sender's default chunk: 1024 mono 16-bit frames


def _received(handle: ReceiverHandle, stream: str) -> float:
    return metric(handle.metrics(), "avd_frames_received_total", sender="cam1", stream=stream)


def _recorded(record_dir: Path, kind: str) -> list[bytes]:
    """Every packet of ``kind`` in cam1's segments, in recording order."""
    packets: list[bytes] = []
    for path in sorted((record_dir / "cam1").glob("*/*.mkv")):
        with av.open(str(path)) as container:
            packets += [bytes(p) for p in container.demux() if p.size and p.stream.type == kind]
    return packets


def _pattern(seconds: float) -> bytes:
    """Random mono 16-bit samples, none of them 0: silence can never pass for them, and
    unlike a ramp the pattern never repeats, so a slice of it has one place only."""
    rng = np.random.default_rng(2024)
    samples = rng.integers(1, 30000, int(seconds * RATE), dtype=np.int16)
    samples *= rng.choice(np.array([-1, 1], dtype=np.int16), samples.size)
    return samples.astype("<i2").tobytes()


def _sound_runs(played: bytes) -> list[bytes]:
    """The stretches of ``played`` between silences (samples of 0), in order."""
    samples = np.frombuffer(played, dtype="<i2")
    edges = np.flatnonzero(np.diff(np.concatenate(([0], samples != 0, [0])).astype(np.int8)))
    return [samples[a:b].tobytes() for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _wait_until_stable(path: Path, quiet_s: float = 0.5, timeout: float = 10.0) -> None:
    """Until ``path`` has not grown for ``quiet_s`` (the speaker has played everything out)."""
    deadline = time.monotonic() + timeout
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_size = path.stat().st_size if path.exists() else 0
        if now_size != size:
            size, since = now_size, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} kept growing for {timeout} s")


def test_microphone_to_speaker_and_recording_byte_exact(tmp_path: Path, launch: Launcher) -> None:
    mic: AlsaDevices = make_alsa_devices(tmp_path, "sender")
    speaker: AlsaDevices = make_alsa_devices(tmp_path, "receiver")
    # Longer than the test reads: past its end the capture device repeats stale data.
    pattern = _pattern(seconds=15)
    mic.capture.write_bytes(pattern)
    record_dir = tmp_path / "rec"
    handle = launch.recording_receiver(record_dir, AVD_PLAYBACK="default", **speaker.env())
    sender = launch.sender(handle, AVD_VIDEO_SOURCE="none", AVD_AUDIO_SOURCE="mic", **mic.env())
    wait_until(lambda: _received(handle, "audio") >= 3 * RATE / 1024)  # 3 s of sound
    assert sender.stop() == 0
    handle.daemon.wait_for_log(r"connection closed .*stream=audio")
    received = int(_received(handle, "audio"))
    _wait_until_stable(speaker.playback)
    assert handle.daemon.stop() == 0

    # The recording holds the microphone's samples from the first one, byte for byte.
    chunks = _recorded(record_dir, "audio")
    recorded = b"".join(chunks)
    assert len(chunks) == received, f"{len(chunks)} chunks recorded of {received} received"
    assert recorded == pattern[: len(recorded)], "the recorded PCM is not what was captured"

    # The speaker played the same samples: silence first (the jitter buffer filling), then
    # the pattern, each stretch of sound a slice of it, in order.
    runs = _sound_runs(speaker.played())
    assert runs, "the speaker played nothing but silence"
    offsets = [pattern.find(run) for run in runs]
    assert -1 not in offsets, "the speaker played samples the microphone never captured"
    assert offsets == sorted(offsets), "the speaker played the sound out of order"
    played = sum(len(run) for run in runs)
    print(
        f"mic: {received} chunks received and recorded byte-exact; speaker played "
        f"{played / len(recorded):.1%} of them in {len(runs)} stretch(es), from offset {offsets[0]}"
    )
    assert offsets[0] == 0
    assert played >= 0.95 * len(recorded)


# ---- a video file as the source -------------------------------------------------------------

Image = npt.NDArray[np.uint8]


def _source_frames(count: int) -> list[Image]:
    """Distinct pictures: a moving bar and the frame number on a gradient."""
    gradient = np.tile(np.linspace(30, 220, 640, dtype=np.uint8), (480, 1))
    frames = []
    for n in range(count):
        image = cv2.merge([gradient, gradient[::-1], np.full_like(gradient, 90)])
        cv2.rectangle(image, (10 * n, 300), (10 * n + 60, 420), (255, 255, 255), -1)
        cv2.putText(image, f"{n:03d}", (200, 200), cv2.FONT_HERSHEY_SIMPLEX, 4, (0, 0, 0), 8)
        frames.append(np.asarray(image, np.uint8))
    return frames


def _write_avi(path: Path, frames: list[Image], fps: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (640, 480))
    assert writer.isOpened(), f"cv2 cannot write {path}"
    for frame in frames:
        writer.write(frame)
    writer.release()


def _mean_difference(a: Image, b: Image) -> float:
    return float(np.mean(cv2.absdiff(a, b)))


def test_a_video_file_is_streamed_and_every_frame_recorded_in_order(
    tmp_path: Path, launch: Launcher
) -> None:
    frames = _source_frames(60)
    video_file = tmp_path / "source.avi"
    _write_avi(video_file, frames, fps=20)
    record_dir = tmp_path / "rec"
    handle = launch.recording_receiver(record_dir)
    sender = launch.sender(handle, AVD_VIDEO_SOURCE=str(video_file), AVD_AUDIO_SOURCE="none")
    # Without AVD_VIDEO_LOOP the file's end ends the sender, cleanly.
    assert sender.proc.wait(30) == 0, sender.log_text()[-3000:]
    sender.wait_for_log(r"all sources have ended")
    handle.daemon.wait_for_log(r"connection closed .*stream=video .*reason=bye")
    received = _received(handle, "video")
    assert received == len(frames), sender.log_text()[-4000:] + handle.daemon.log_text()[-3000:]
    assert handle.daemon.stop() == 0

    recorded = _recorded(record_dir, "video")
    assert len(recorded) == len(frames)
    for n, jpeg in enumerate(recorded):
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None, f"frame {n} does not decode"
        assert image.shape == (480, 640, 3), f"frame {n} is {image.shape}"
        # Twice through JPEG (the file's MJPG, the sender's q70), yet nearest its own frame.
        differences = [_mean_difference(np.asarray(image, np.uint8), f) for f in frames]
        assert differences[n] < 4, f"frame {n} differs from the file's by {differences[n]:.1f}"
        assert int(np.argmin(differences)) == n, f"recorded frame {n} is another frame"
    assert os.path.getsize(record_dir / "cam1" / "latest.jpg") > 0


# ---- a network camera that goes away and comes back ----------------------------------------


class _MjpegCamera:
    """An HTTP MJPEG camera (multipart/x-mixed-replace, as IP cameras serve) on loopback.

    ``stop`` closes the listening socket and every stream, as a camera losing power does;
    ``start`` serves again on the same port.
    """

    def __init__(self, jpeg: bytes) -> None:
        self.jpeg = jpeg
        self.port = 0
        self.served = 0  # frames written to clients
        self._server: ThreadingHTTPServer | None = None
        self._running = threading.Event()

    def start(self) -> None:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                with contextlib.suppress(OSError):
                    while camera._running.is_set():
                        part = (
                            b"--frame\r\nContent-Type: image/jpeg\r\n"
                            + f"Content-Length: {len(camera.jpeg)}\r\n\r\n".encode()
                        )
                        self.wfile.write(part + camera.jpeg + b"\r\n")
                        camera.served += 1
                        time.sleep(0.05)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._running.set()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._running.clear()  # every streaming handler ends and closes its connection
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def test_a_network_camera_that_goes_away_is_reopened_while_the_session_stays_up(
    launch: Launcher,
) -> None:
    jpeg = cv2.imencode(".jpg", _source_frames(1)[0])[1].tobytes()
    camera = _MjpegCamera(jpeg)
    camera.start()
    try:
        handle = launch.receiver()
        url = f"http://127.0.0.1:{camera.port}/stream.mjpg"
        sender = launch.sender(handle, AVD_VIDEO_SOURCE=url, AVD_AUDIO_SOURCE="none")
        wait_until(lambda: _received(handle, "video") >= 20)

        camera.stop()
        sender.wait_for_log(r"stream http://127\.0\.0\.1:\d+/stream\.mjpg lost after \d+ failed")
        stalled = _received(handle, "video")
        time.sleep(1.0)
        assert _received(handle, "video") <= stalled + 1, "frames while the camera was away"

        camera.start()
        sender.wait_for_log(r"stream http://\S+ is back", timeout=20)
        wait_until(lambda: _received(handle, "video") >= stalled + 20)
        assert sender.stop() == 0
        assert handle.daemon.stop() == 0
    finally:
        camera.stop()
    # The network session never noticed: one video connection from start to end.
    log = handle.daemon.log_text()
    assert len(re.findall(r"connection opened .*stream=video", log)) == 1, log[-3000:]
    lost = re.findall(r"lost after", sender.log_text())
    assert len(lost) == 1, "the loss is logged once"
