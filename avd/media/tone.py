"""Audio sources that need no sound device: a test tone, and a WAV file.

Both are paced by their sample count, as aiortc paces audio: chunk n is stamped
``start_us + n * chunk * 1e6 / rate`` (exact integer arithmetic in ``Pacer``) and released
at that instant, so the stream never drifts from real time however long it runs, and its
timestamps are those of a perfect sound card. After a stall of the whole process the
timeline is re-anchored rather than caught up in a burst (see ``avd.media.pacing``).

The microphone sources live in another module; the sender dispatches ``"mic"`` there and
everything else to ``open_file_audio_source``.
"""

from __future__ import annotations

import math
import threading
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np

from avd.errors import DeviceError
from avd.media.base import AudioFormat, CapturedFrame, MediaFormat, MediaSource, StreamKind
from avd.media.pacing import Pacer
from avd.media.specs import is_wav_spec

TONE_AMPLITUDE = 0.25 * 32767  # -12 dBFS: clearly audible, never clipping, never deafening


class _PacedAudio:
    """What both sources share: the format, the stop event, and pacing by chunk count."""

    kind = StreamKind.AUDIO

    def __init__(self, fmt: AudioFormat, description: str) -> None:
        self.format: MediaFormat = fmt
        self._fmt = fmt
        self.description = description
        self._stop = threading.Event()
        self._pacer: Pacer | None = None
        self._n = 0  # chunks emitted: samples emitted is n * fmt.chunk

    def _start_pacing(self) -> None:
        self._pacer = Pacer(Fraction(self._fmt.rate, self._fmt.chunk))
        self._n = 0

    def _wait_for_next_chunk(self) -> int | None:
        """Sleep until the next chunk is due and return its timestamp; None once stopped."""
        pacer = self._pacer  # close() may clear it meanwhile
        if self._stop.is_set():
            return None
        if pacer is None:
            raise DeviceError(f"{self.description} was read before open()")
        if not pacer.wait(self._n, self._stop):
            return None
        capture_us = pacer.due_us(self._n)
        self._n += 1
        return capture_us

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()  # a read() racing with close() ends instead of failing
        self._pacer = None


class ToneSource(_PacedAudio):
    """A phase-continuous sine at ``freq`` Hz, int16 little-endian, the same on every channel."""

    def __init__(self, fmt: AudioFormat, freq: float = 440.0) -> None:
        super().__init__(fmt, f"test tone {freq:g} Hz")
        if fmt.sample_width != 2:
            raise DeviceError(
                f"the test tone makes 2-byte samples, the stream's are {fmt.sample_width}-byte"
            )
        self.freq = freq
        # Cycles advanced by each sample of a chunk, relative to the chunk's first sample.
        self._cycle_steps = np.arange(fmt.chunk, dtype=np.float64) * (freq / fmt.rate)

    def open(self) -> None:
        self._start_pacing()

    def read(self) -> CapturedFrame | None:
        first_sample = self._n * self._fmt.chunk
        capture_us = self._wait_for_next_chunk()
        if capture_us is None:
            return None
        return CapturedFrame(capture_us=capture_us, data=self.samples(first_sample))

    def samples(self, first_sample: int) -> bytes:
        """One chunk starting at absolute sample ``first_sample``: the phase comes from the
        count (exact in float64 up to 2**53 / freq samples, years of audio), never from an
        accumulator that would gather rounding errors chunk after chunk."""
        start_cycle = math.fmod(first_sample * self.freq / self._fmt.rate, 1.0)
        wave_ = np.sin(2 * np.pi * (start_cycle + self._cycle_steps)) * TONE_AMPLITUDE
        mono = np.round(wave_).astype("<i2")
        return np.repeat(mono, self._fmt.channels).tobytes()  # interleaved: L R L R ...


class WavFileSource(_PacedAudio):
    """The PCM of a WAV file whose rate, channels and sample width match the stream's.

    The last chunk is padded with silence; then the stream ends, or with ``loop`` starts
    again from the first frame.
    """

    def __init__(self, path: Path, fmt: AudioFormat, loop: bool = False) -> None:
        super().__init__(fmt, f"WAV file {path}")
        self.path, self.loop = path, loop
        self._wav: wave.Wave_read | None = None
        self._at_end = False
        self._lock = threading.Lock()  # close() may come from another thread than read()

    def open(self) -> None:
        try:
            wav = wave.open(str(self.path), "rb")  # noqa: SIM115 (held open until close())
        except FileNotFoundError as exc:
            raise DeviceError(f"WAV file {self.path} cannot be opened: no such file") from exc
        except (OSError, wave.Error, EOFError) as exc:
            raise DeviceError(f"WAV file {self.path} cannot be read: {exc}") from exc
        mismatch = _format_mismatch(self.path, wav, self._fmt)
        if mismatch:
            wav.close()
            raise DeviceError(mismatch)
        self._wav, self._at_end = wav, False
        self._start_pacing()

    def read(self) -> CapturedFrame | None:
        if self._at_end and not self.loop:
            return None
        capture_us = self._wait_for_next_chunk()
        if capture_us is None:
            return None
        data = self._next_chunk()
        return None if data is None else CapturedFrame(capture_us=capture_us, data=data)

    def _next_chunk(self) -> bytes | None:
        """``fmt.chunk`` frames, padded with silence at the end of the file; None past it."""
        fmt = self._fmt
        with self._lock:
            if self._wav is None:
                return None
            if self._at_end:  # looping: the padded chunk was sent, start again
                self._wav.rewind()
            data = self._wav.readframes(fmt.chunk)
            if not data and self.loop:  # the file ended on a chunk boundary
                self._wav.rewind()
                data = self._wav.readframes(fmt.chunk)
        self._at_end = len(data) < fmt.chunk_bytes
        if not data:  # past the end, or an empty file (which must not loop on silence)
            return None
        # 8-bit WAV is unsigned: its silence is 0x80, not 0 (the wave module keeps it so).
        silence = b"\x80" if fmt.sample_width == 1 else b"\x00"
        return data + silence * (fmt.chunk_bytes - len(data))

    def close(self) -> None:
        super().close()
        with self._lock:
            if self._wav is not None:
                self._wav.close()
                self._wav = None


def _format_mismatch(path: Path, wav: wave.Wave_read, fmt: AudioFormat) -> str | None:
    """A sentence naming the file and the setting it disagrees with, or None if it fits."""
    if wav.getframerate() != fmt.rate:
        return f"{path} is {wav.getframerate()} Hz, AVD_AUDIO_RATE is {fmt.rate}"
    if wav.getnchannels() != fmt.channels:
        return f"{path} has {wav.getnchannels()} channel(s), AVD_AUDIO_CHANNELS is {fmt.channels}"
    if wav.getsampwidth() != fmt.sample_width:
        width = wav.getsampwidth()
        return f"{path} has {width}-byte samples, the stream's are {fmt.sample_width}-byte"
    return None


def open_file_audio_source(spec: str, fmt: AudioFormat, loop: bool) -> MediaSource | None:
    """``"none"``: no audio; ``"test"``: a 440 Hz tone; ``*.wav``: that file; else ValueError."""
    if spec == "none":
        return None
    if spec == "test":
        return ToneSource(fmt)
    if is_wav_spec(spec):
        return WavFileSource(Path(spec), fmt, loop)
    raise ValueError(f"audio source {spec!r} is not 'none', 'test', 'mic' or a .wav file")
