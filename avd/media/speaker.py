"""The receiver's speaker: plays the audio of one sender through PyAudio.

One sender is heard at a time: the one ``sender_filter`` names (AVD_PLAYBACK_SENDER), or
else the first audio stream to start. When it ends, the earliest audio stream still running
takes over, or else the next one to start. Video streams are ignored.

``frame`` runs on the event loop and only hands the chunk to the current stream's jitter
buffer under a lock. A playback thread owns every PyAudio call: it opens an output stream
in the stream's own format, writes one chunk per period (a blocking write, so the sound
card sets the pace; a device without a clock is held to real time by ``ClocklessPacer``),
writes silence while the buffer fills, plays out what is left when the stream ends, and
closes the output before the next stream. The output file of the ALSA test device is
therefore truncated at each new stream.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import pyaudio

from avd.clock import monotonic_us
from avd.errors import DeviceError
from avd.media.base import AudioFormat, ReceivedFrame, StreamInfo, StreamKind
from avd.media.jitter import JitterBuffer, JitterStats
from avd.media.pa import ClocklessPacer, find_device, open_pyaudio

log = logging.getLogger(__name__)

MAX_BUFFER_MS = 500
CLOSE_TIMEOUT_S = 5.0


@dataclass(slots=True)
class _Playback:
    """One stream being heard (or played out after its end)."""

    info: StreamInfo
    fmt: AudioFormat
    buffer: JitterBuffer
    failed: bool = False  # the output could not be opened: frames are dropped


def silence_for(fmt: AudioFormat) -> bytes:
    """One chunk of silence: 8-bit PCM (as in WAV) is unsigned, centred on 0x80."""
    return (b"\x80" if fmt.sample_width == 1 else b"\x00") * fmt.chunk_bytes


def _fits(data: bytes, fmt: AudioFormat) -> bool:
    """Whole frames, at most one chunk.

    A bigger chunk would hold one playback slot for more than a period and throw the jitter
    buffer's timing off.
    """
    frame_bytes = fmt.channels * fmt.sample_width
    return 0 < len(data) <= fmt.chunk_bytes and len(data) % frame_bytes == 0


class SpeakerSink:
    """A MediaSink that plays one sender's audio on a PyAudio output device."""

    def __init__(
        self,
        device_spec: str,
        sender_filter: str | None = None,
        buffer_ms: int = 60,
        *,
        max_buffer_ms: int = MAX_BUFFER_MS,
    ) -> None:
        """Raises DeviceError naming the device if PortAudio cannot find it."""
        self.device_spec = device_spec
        self.sender_filter = sender_filter
        self._buffer_ms = buffer_ms
        self._max_buffer_ms = max(buffer_ms, max_buffer_ms)
        self._pa = open_pyaudio()
        try:
            self._device_index = find_device(self._pa, device_spec, input=False)
        except DeviceError as exc:
            self._pa.terminate()
            raise DeviceError(f"speaker {device_spec!r} cannot be opened: {exc}") from exc
        self._cond = threading.Condition()
        self._running: list[StreamInfo] = []  # audio streams that may be heard, oldest first
        self._current: _Playback | None = None  # the stream whose frames are taken
        self._queue: deque[_Playback] = deque()  # what the thread plays, in order
        self._done = JitterStats()  # counters of the streams already played out
        self._spooled = 0  # chunks a sender replayed from its spool after an outage
        self._rejected = 0  # chunks of partial frames or over the announced chunk size
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="avd-speaker", daemon=True)
        self._thread.start()

    # --- MediaSink, called on the event loop: never blocks beyond a short lock ---

    def stream_started(self, info: StreamInfo) -> None:
        if not self._wanted(info):
            return
        with self._cond:
            self._running.append(info)
            if self._current is None:
                self._take(info)

    def frame(self, info: StreamInfo, frame: ReceivedFrame) -> None:
        with self._cond:
            playback = self._current
            if playback is None or playback.info != info or playback.failed:
                return
            if frame.late:  # old audio replayed after an outage has no place in live sound
                self._spooled += 1
                return
            if not _fits(frame.data, playback.fmt):
                self._rejected += 1
                return
            playback.buffer.put(frame.seq, frame.data)

    def stream_ended(self, info: StreamInfo) -> None:
        with self._cond:
            if info in self._running:
                self._running.remove(info)
            current = self._current
            if current is None or current.info != info:
                return
            current.buffer.finish()
            self._current = None
            log.info("speaker: sender %s stopped (%s)", info.sender_id, info.peer)
            if self._running:
                self._take(self._running[0])

    def close(self) -> None:
        """Stop playing at once and release the device. Safe to call twice."""
        if self._closing.is_set():
            return
        with self._cond:
            self._closing.set()
            self._cond.notify_all()
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("speaker %r: the playback thread did not stop", self.device_spec)
            return  # terminating PortAudio under a thread still writing would crash
        self._pa.terminate()

    # --- counters ---

    def stats(self) -> JitterStats:
        """Totals over every stream heard so far, the current one included."""
        with self._cond:
            total = JitterStats()
            total.add(self._done)
            for playback in self._queue:
                total.add(playback.buffer.stats)
            total.late += self._spooled
            return total

    @property
    def busy(self) -> bool:
        """A stream is being heard, or the end of one is still being played out."""
        with self._cond:
            return bool(self._queue)

    @property
    def rejected(self) -> int:
        """Chunks dropped for not being whole frames or for exceeding the chunk size."""
        with self._cond:
            return self._rejected

    @property
    def played(self) -> int:
        return self.stats().played

    @property
    def gaps(self) -> int:
        return self.stats().gaps

    @property
    def late(self) -> int:
        """Chunks too late for their slot, and chunks replayed from a sender's spool."""
        return self.stats().late

    @property
    def overflow(self) -> int:
        return self.stats().overflow

    # --- selection (called with the lock held) ---

    def _wanted(self, info: StreamInfo) -> bool:
        if info.kind is not StreamKind.AUDIO or not isinstance(info.format, AudioFormat):
            return False
        return self.sender_filter is None or info.sender_id == self.sender_filter

    def _take(self, info: StreamInfo) -> None:
        assert isinstance(info.format, AudioFormat)
        fmt = info.format
        buffer = JitterBuffer(
            fmt.chunk_duration_us, self._buffer_ms, self._max_buffer_ms, silence=silence_for(fmt)
        )
        self._current = _Playback(info, fmt, buffer)
        self._queue.append(self._current)
        self._cond.notify_all()
        log.info(
            "speaker: playing sender %s (%s), %d Hz, %d channel(s)",
            info.sender_id,
            info.peer,
            fmt.rate,
            fmt.channels,
        )

    # --- the playback thread ---

    def _run(self) -> None:
        while (playback := self._next_playback()) is not None:
            stream = self._open_output(playback)
            if stream is not None:
                try:
                    self._play(playback, stream)
                finally:
                    self._close_output(stream, drain=not self._closing.is_set())
            self._retire(playback)

    def _next_playback(self) -> _Playback | None:
        with self._cond:
            self._cond.wait_for(lambda: self._closing.is_set() or bool(self._queue))
            return None if self._closing.is_set() else self._queue[0]

    def _retire(self, playback: _Playback) -> None:
        with self._cond:
            self._queue.remove(playback)
            self._done.add(playback.buffer.stats)

    def _open_output(self, playback: _Playback) -> pyaudio.Stream | None:
        fmt = playback.fmt
        try:
            return self._pa.open(
                format=self._pa.get_format_from_width(fmt.sample_width),
                channels=fmt.channels,
                rate=fmt.rate,
                output=True,
                output_device_index=self._device_index,
                frames_per_buffer=fmt.chunk,
            )
        except (OSError, ValueError) as exc:
            log.error(
                "speaker %r cannot play %d Hz, %d channel(s), %d-bit audio of sender %s: %s; "
                "the stream is still received and recorded (AVD_PLAYBACK: none for no "
                "speaker, or another device, which avd devices lists)",
                self.device_spec,
                fmt.rate,
                fmt.channels,
                8 * fmt.sample_width,
                playback.info.sender_id,
                exc,
            )
            self._give_up(playback)
            return None

    def _give_up(self, playback: _Playback) -> None:
        """Drop this stream's audio from now on; the next stream tries the device again."""
        with self._cond:
            playback.failed = True
            playback.buffer.finish()

    def _play(self, playback: _Playback, stream: pyaudio.Stream) -> None:
        fmt = playback.fmt
        chunk_us = fmt.chunk_duration_us
        # A real card lets the first writes fill its buffer without waiting; only a lead
        # well past that buffer means the device has no clock.
        latency_us = int(stream.get_output_latency() * 1_000_000)
        pacer = ClocklessPacer(
            fmt.rate, max_lead_us=latency_us + 2 * chunk_us + 50_000, blocked_us=chunk_us // 2
        )
        silence = silence_for(fmt)
        frame_bytes = fmt.channels * fmt.sample_width
        while True:
            with self._cond:
                if self._closing.is_set() or playback.buffer.drained:
                    return
                data = playback.buffer.next_chunk()
            data = silence if data is None else data
            started = monotonic_us()
            try:
                stream.write(data)
            except OSError as exc:
                log.error("speaker %r stopped playing: %s", self.device_spec, exc)
                self._give_up(playback)
                return
            sleep_us = pacer.after_io(len(data) // frame_bytes, started, monotonic_us())
            if sleep_us and self._closing.wait(sleep_us / 1_000_000):
                return

    def _close_output(self, stream: pyaudio.Stream, *, drain: bool) -> None:
        try:
            if drain:
                stream.stop_stream()  # Pa_StopStream plays out what the device still holds
            stream.close()
        except OSError as exc:
            log.warning("speaker %r: closing the output failed: %s", self.device_spec, exc)
