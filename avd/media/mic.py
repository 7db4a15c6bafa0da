"""The sender's microphone: 16-bit PCM chunks read from a PyAudio input stream.

Capture times follow the sample count (``CaptureTimeline``), as aiortc stamps its audio:
chunk n starts ``n * chunk / rate`` after the first, so timestamps are as smooth as the
sound card's clock. The timeline is moved to the system clock only when the two disagree by
more than ``RESYNC_US``: samples were lost, or the card's clock drifted that far.

A read that returns more than ``chunk`` frames later than the timeline expects means the
input overflowed (the ring buffer filled while this thread was away, and samples were
lost). PyAudio's ``exception_on_overflow=False`` hides the flag, and raising would throw the
chunk away, so overflows are found by that jump instead: counted in ``overflows``, logged at
most once per ``OVERFLOW_LOG_INTERVAL_US``, never fatal. Losses shorter than the detection
threshold (two chunks, at least 50 ms) go unseen.
"""

from __future__ import annotations

import logging
import threading

import pyaudio

from avd.clock import monotonic_us
from avd.errors import DeviceError
from avd.media.base import AudioFormat, CapturedFrame, MediaFormat, MediaSource, StreamKind
from avd.media.pa import ClocklessPacer, find_device, open_pyaudio
from avd.media.specs import parse_mic_spec

log = logging.getLogger(__name__)

RESYNC_US = 200_000
MIN_OVERFLOW_JUMP_US = 50_000
OVERFLOW_LOG_INTERVAL_US = 10_000_000
# A device without a clock may run this far ahead of the system clock before being slowed.
MAX_LEAD_US = 100_000
CLOSE_WAIT_S = 2.0  # a read returns within one chunk on a real device


class CaptureTimeline:
    """Capture times from the sample count, re-anchored only after a real disagreement.

    ``stamp`` is given, after each read, the instant the read returned and how many frames
    were already waiting behind the chunk (``get_read_available``): the chunk's first
    sample was captured ``(frames + backlog) / rate`` before that instant.
    """

    def __init__(self, rate: int, chunk_frames: int, *, resync_us: int = RESYNC_US) -> None:
        self._rate = rate
        self._resync_us = resync_us
        chunk_us = chunk_frames * 1_000_000 // rate
        self._overflow_jump_us = max(2 * chunk_us, MIN_OVERFLOW_JUMP_US)
        self._anchor_us: int | None = None  # capture time of frame 0 on the current timeline
        self._frames = 0
        self._last_drift_us = 0
        self.overflows = 0
        self.resyncs = 0

    def stamp(self, frames: int, now_us: int, backlog_frames: int = 0) -> int:
        """The capture time of the first sample of the chunk just read."""
        observed_us = now_us - (frames + backlog_frames) * 1_000_000 // self._rate
        if self._anchor_us is None:
            self._anchor_us = observed_us - self._position_us()
        expected_us = self._anchor_us + self._position_us()
        drift_us = observed_us - expected_us
        if drift_us - self._last_drift_us > self._overflow_jump_us:
            self.overflows += 1
        if abs(drift_us) > self._resync_us:
            self.resyncs += 1
            self._anchor_us += drift_us
            expected_us, drift_us = observed_us, 0
        self._last_drift_us = drift_us
        self._frames += frames
        return expected_us

    def _position_us(self) -> int:
        return self._frames * 1_000_000 // self._rate


class MicSource:
    """A MediaSource reading a microphone in blocking mode, one chunk per read."""

    def __init__(self, spec: str, fmt: AudioFormat) -> None:
        if fmt.sample_width != 2:
            raise ValueError(f"the microphone captures 16-bit samples, not {fmt.sample_width}")
        self.kind: StreamKind = StreamKind.AUDIO
        self.format: MediaFormat = fmt
        self.device = parse_mic_spec(spec)
        self.description = f"microphone {self.device!r}"
        self._fmt = fmt
        self._timeline = CaptureTimeline(fmt.rate, fmt.chunk)
        chunk_us = fmt.chunk_duration_us
        self._pacer = ClocklessPacer(fmt.rate, max_lead_us=MAX_LEAD_US, blocked_us=chunk_us // 2)
        self._stop = threading.Event()
        self._io_lock = threading.Lock()  # PortAudio must not close a stream under a read
        self._pa: pyaudio.PyAudio | None = None
        self._stream: pyaudio.Stream | None = None
        self._overflows_logged = 0
        self._overflow_logged_us: int | None = None

    @property
    def overflows(self) -> int:
        return self._timeline.overflows

    def open(self) -> None:
        """Open the input stream; DeviceError naming the microphone if that fails."""
        if self._stream is not None:
            return
        pa = open_pyaudio()
        fmt = self._fmt
        try:
            index = find_device(pa, self.device, input=True)
            name = self.device if index is None else str(pa.get_device_info_by_index(index)["name"])
            self._stream = pa.open(
                format=pyaudio.paInt16,
                channels=fmt.channels,
                rate=fmt.rate,
                input=True,
                input_device_index=index,
                frames_per_buffer=fmt.chunk,
            )
        except (DeviceError, OSError, ValueError) as exc:
            pa.terminate()
            raise DeviceError(f"microphone {self.device!r} cannot be opened: {exc}") from exc
        self._pa = pa
        self.description = f"microphone {name!r} {fmt.rate} Hz {fmt.channels} ch"

    def read(self) -> CapturedFrame | None:
        """The next chunk; None once stopped or closed. DeviceError if the device fails."""
        chunk = self._fmt.chunk
        with self._io_lock:
            stream = self._stream
            if stream is None or self._stop.is_set():
                return None
            started = monotonic_us()
            try:
                data = stream.read(chunk, exception_on_overflow=False)
            except OSError as exc:
                raise DeviceError(f"{self.description} cannot be read: {exc}") from exc
            ended = monotonic_us()
            backlog = _read_available(stream)
        capture_us = self._timeline.stamp(chunk, ended, backlog)
        self._report_overflows(ended)
        sleep_us = self._pacer.after_io(chunk, started, ended)
        if sleep_us:
            self._stop.wait(sleep_us / 1_000_000)  # a stop cuts the wait short
        return CapturedFrame(capture_us=capture_us, data=data)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Release the device; waits for a read in progress (one chunk at most)."""
        self._stop.set()
        if not self._io_lock.acquire(timeout=CLOSE_WAIT_S):
            log.warning("%s: a read is still blocked, leaving the device open", self.description)
            return
        try:
            stream, self._stream = self._stream, None
            pa, self._pa = self._pa, None
            if stream is not None:
                stream.close()  # Pa_CloseStream aborts a running input stream
            if pa is not None:
                pa.terminate()
        finally:
            self._io_lock.release()

    def _report_overflows(self, now_us: int) -> None:
        new = self.overflows - self._overflows_logged
        if new <= 0:
            return
        last = self._overflow_logged_us
        if last is not None and now_us - last < OVERFLOW_LOG_INTERVAL_US:
            return
        log.warning(
            "%s: input overflowed %d time(s) (%d in all): samples were lost",
            self.description,
            new,
            self.overflows,
        )
        self._overflows_logged = self.overflows
        self._overflow_logged_us = now_us


def _read_available(stream: pyaudio.Stream) -> int:
    try:
        return int(stream.get_read_available())
    except OSError:
        return 0  # not every host API can tell; the timeline then just has more jitter


def open_mic_source(spec: str, fmt: AudioFormat) -> MediaSource:
    """A microphone source for "mic" or "mic:<index or name>", not yet opened."""
    return MicSource(spec, fmt)
