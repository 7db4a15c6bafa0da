"""The test tone and the WAV file sources: chunking, phase, timestamps, round trips, errors."""

from __future__ import annotations

import re
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from avd.clock import monotonic_us
from avd.errors import DeviceError
from avd.media.base import AudioFormat, CapturedFrame, StreamKind
from avd.media.tone import (
    TONE_AMPLITUDE,
    ToneSource,
    WavFileSource,
    open_file_audio_source,
)

CD_MONO = AudioFormat(rate=44100, channels=1, sample_width=2, chunk=1024)
# 10 ms chunks: short enough to keep the tests quick, long enough to pace for real.
FAST_STEREO = AudioFormat(rate=48000, channels=2, sample_width=2, chunk=480)


def read_chunks(source: ToneSource | WavFileSource, count: int) -> list[CapturedFrame]:
    chunks = []
    for _ in range(count):
        chunk = source.read()
        assert chunk is not None
        chunks.append(chunk)
    return chunks


def opened_tone(fmt: AudioFormat, freq: float = 440.0) -> ToneSource:
    source = ToneSource(fmt, freq)
    source.open()
    return source


def pcm(chunks: list[CapturedFrame]) -> np.ndarray:
    return np.frombuffer(b"".join(c.data for c in chunks), "<i2")


# --- the tone ------------------------------------------------------------------------------


def test_tone_is_an_audio_source_with_exact_chunks() -> None:
    source = opened_tone(FAST_STEREO)
    assert source.kind is StreamKind.AUDIO
    assert source.format == FAST_STEREO
    assert source.description == "test tone 440 Hz"
    for chunk in read_chunks(source, 5):
        assert len(chunk.data) == FAST_STEREO.chunk_bytes == 480 * 2 * 2
        left, right = np.frombuffer(chunk.data, "<i2").reshape(-1, 2).T
        assert np.array_equal(left, right)
        assert 0.9 * TONE_AMPLITUDE <= np.abs(left).max() <= TONE_AMPLITUDE + 1
    source.close()


def test_tone_phase_is_continuous_across_chunks() -> None:
    fmt = AudioFormat(rate=48000, channels=1, sample_width=2, chunk=333)  # not a whole cycle
    samples = pcm(read_chunks(opened_tone(fmt, freq=1000.0), 8))
    t = np.arange(len(samples)) / fmt.rate
    reference = np.round(np.sin(2 * np.pi * 1000.0 * t) * TONE_AMPLITUDE)
    assert np.abs(samples - reference).max() <= 1


def test_tone_phase_stays_exact_after_hours() -> None:
    source = ToneSource(CD_MONO, 440.0)
    first = 44100 * 3600 * 10  # ten hours in
    joined = np.frombuffer(source.samples(first) + source.samples(first + 1024), "<i2")
    t = (first + np.arange(2048)) / 44100
    reference = np.round(np.sin(2 * np.pi * 440.0 * t) * TONE_AMPLITUDE)
    assert np.abs(joined - reference).max() <= 1


def test_tone_timestamps_come_from_the_sample_count() -> None:
    source = opened_tone(CD_MONO)  # 1024 / 44100 s = 23219.95 µs, not a whole µs
    chunks = read_chunks(source, 12)
    released_us = monotonic_us()
    start = chunks[0].capture_us
    for n, chunk in enumerate(chunks):
        assert chunk.capture_us == start + n * 1024 * 1_000_000 // 44100
    assert released_us >= chunks[-1].capture_us  # never handed out before its time


def test_tone_is_paced_in_real_time() -> None:
    source = opened_tone(FAST_STEREO)
    start = time.monotonic()
    read_chunks(source, 21)
    elapsed = time.monotonic() - start
    assert elapsed >= 0.2 - 0.002  # 20 periods of 10 ms after the first chunk
    assert elapsed < 2.0


def test_stop_unblocks_a_waiting_read() -> None:
    source = opened_tone(AudioFormat(rate=8000, channels=1, sample_width=2, chunk=8000))
    assert source.read() is not None  # chunk 0 is due at once, chunk 1 in a second
    results: list[CapturedFrame | None] = []
    reader = threading.Thread(target=lambda: results.append(source.read()))
    reader.start()
    time.sleep(0.05)
    stopped_at = time.monotonic()
    source.stop()
    reader.join(timeout=2)
    assert not reader.is_alive()
    assert results == [None]
    assert time.monotonic() - stopped_at < 0.5


def test_tone_refuses_sample_widths_it_cannot_make() -> None:
    with pytest.raises(DeviceError, match="2-byte samples, the stream's are 3-byte"):
        ToneSource(AudioFormat(rate=44100, channels=1, sample_width=3, chunk=1024))


def test_read_before_open_is_an_error() -> None:
    with pytest.raises(DeviceError, match="test tone 440 Hz was read before open"):
        ToneSource(CD_MONO).read()


# --- WAV files -----------------------------------------------------------------------------


def write_wav(path: Path, fmt: AudioFormat, frames: int, *, seed: int = 7) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, frames * fmt.channels * fmt.sample_width)
    raw = data.astype(np.uint8).tobytes()
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(fmt.channels)
        wav.setsampwidth(fmt.sample_width)
        wav.setframerate(fmt.rate)
        wav.writeframes(raw)
    return raw


def opened_wav(path: Path, fmt: AudioFormat, loop: bool = False) -> WavFileSource:
    source = WavFileSource(path, fmt, loop)
    source.open()
    return source


def test_wav_round_trip_is_byte_exact_with_silence_padding(tmp_path: Path) -> None:
    path = tmp_path / "speech.wav"
    raw = write_wav(path, FAST_STEREO, 480 * 3 + 100)
    source = opened_wav(path, FAST_STEREO)
    assert source.description == f"WAV file {path}"
    chunks = read_chunks(source, 4)
    assert all(len(c.data) == FAST_STEREO.chunk_bytes for c in chunks)
    padding = FAST_STEREO.chunk_bytes * 4 - len(raw)
    assert b"".join(c.data for c in chunks) == raw + bytes(padding)
    assert source.read() is None
    assert source.read() is None  # and stays ended
    start = chunks[0].capture_us
    assert [c.capture_us - start for c in chunks] == [0, 10_000, 20_000, 30_000]
    source.close()
    source.close()


def test_wav_of_whole_chunks_ends_without_an_empty_chunk(tmp_path: Path) -> None:
    path = tmp_path / "exact.wav"
    raw = write_wav(path, FAST_STEREO, 480 * 2)
    source = opened_wav(path, FAST_STEREO)
    assert b"".join(c.data for c in read_chunks(source, 2)) == raw
    assert source.read() is None


def test_wav_loops_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "loop.wav"
    fmt = AudioFormat(rate=48000, channels=1, sample_width=2, chunk=480)
    raw = write_wav(path, fmt, 480 + 200)
    chunks = read_chunks(opened_wav(path, fmt, loop=True), 5)
    one_pass = raw + bytes(fmt.chunk_bytes * 2 - len(raw))
    assert b"".join(c.data for c in chunks) == one_pass * 2 + raw[: fmt.chunk_bytes]


def test_eight_bit_wav_is_padded_with_its_own_silence(tmp_path: Path) -> None:
    path = tmp_path / "old.wav"
    fmt = AudioFormat(rate=8000, channels=1, sample_width=1, chunk=80)
    raw = write_wav(path, fmt, 50)
    (chunk,) = read_chunks(opened_wav(path, fmt), 1)
    assert chunk.data == raw + b"\x80" * 30


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (AudioFormat(44100, 2, 2, 480), "is 48000 Hz, AVD_AUDIO_RATE is 44100"),
        (AudioFormat(48000, 1, 2, 480), "has 2 channel(s), AVD_AUDIO_CHANNELS is 1"),
        (AudioFormat(48000, 2, 1, 480), "has 2-byte samples, the stream's are 1-byte"),
    ],
)
def test_wav_format_mismatch_names_the_file_and_setting(
    tmp_path: Path, fmt: AudioFormat, expected: str
) -> None:
    path = tmp_path / "sounds.wav"
    write_wav(path, FAST_STEREO, 100)
    with pytest.raises(DeviceError) as caught:
        WavFileSource(path, fmt).open()
    assert str(caught.value) == f"{path} {expected}"


def test_missing_or_broken_wav_files_are_device_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(DeviceError) as caught:
        WavFileSource(missing, FAST_STEREO).open()
    assert str(caught.value) == f"WAV file {missing} cannot be opened: no such file"
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00MP3 this is not a wave file")
    with pytest.raises(DeviceError, match=re.escape(f"WAV file {broken} cannot be read: ")):
        WavFileSource(broken, FAST_STEREO).open()


def test_close_from_another_thread_ends_the_stream(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    write_wav(path, FAST_STEREO, 48000)
    source = opened_wav(path, FAST_STEREO)
    assert source.read() is not None
    source.stop()
    source.close()
    assert source.read() is None


# --- the opener ----------------------------------------------------------------------------


def test_open_file_audio_source_dispatches_on_the_spec(tmp_path: Path) -> None:
    assert open_file_audio_source("none", CD_MONO, loop=False) is None
    assert isinstance(open_file_audio_source("test", CD_MONO, loop=False), ToneSource)
    wav = open_file_audio_source(str(tmp_path / "A.WAV"), CD_MONO, loop=True)
    assert isinstance(wav, WavFileSource)
    assert wav.loop
    assert wav.path == tmp_path / "A.WAV"
    for spec in ("mic", "mic:default", "song.mp3", ""):
        with pytest.raises(
            ValueError, match=re.escape("is not 'none', 'test', 'mic' or a .wav file")
        ):
            open_file_audio_source(spec, CD_MONO, loop=False)


def test_wav_of_whole_chunks_loops_without_a_silent_chunk(tmp_path: Path) -> None:
    path = tmp_path / "exact.wav"
    raw = write_wav(path, FAST_STEREO, 480 * 2)
    chunks = read_chunks(opened_wav(path, FAST_STEREO, loop=True), 4)
    assert b"".join(c.data for c in chunks) == raw * 2


def test_empty_wav_ends_even_when_looping(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    write_wav(path, FAST_STEREO, 0)
    assert opened_wav(path, FAST_STEREO, loop=True).read() is None
