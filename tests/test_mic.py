"""avd.media.mic: real PyAudio capture from the ALSA file device of tests/alsa.

A counter ramp written to the capture file must come out of MicSource byte for byte. The
file device has no clock, so the source paces itself (ClocklessPacer); one test makes the
capture file a FIFO fed one chunk per period instead, as a sound card would deliver it, and
checks the source then leaves the pace to the device.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from contextlib import ExitStack

import pytest

from avd.errors import DeviceError
from avd.media.base import AudioFormat, CapturedFrame, StreamKind
from avd.media.mic import CaptureTimeline, MicSource, open_mic_source
from avd.media.pa import list_devices
from avd.media.specs import check_audio_source, is_mic_spec, parse_mic_spec
from tests.alsa.alsa_env import (
    CAPTURE_DEVICE,
    AlsaDevices,
    make_capture_fifo,
    ramp,
)

FMT = AudioFormat(rate=48000, channels=1, sample_width=2, chunk=480)  # 10 ms chunks
STEREO = AudioFormat(rate=44100, channels=2, sample_width=2, chunk=1024)


def open_mic(spec: str, fmt: AudioFormat, closing: ExitStack) -> MicSource:
    """An opened MicSource, closed at the test's end even if the test failed."""
    source = MicSource(spec, fmt)
    source.open()
    closing.callback(source.close)
    return source


def read_n(source: MicSource, n: int) -> list[CapturedFrame]:
    frames = []
    for _ in range(n):
        frame = source.read()
        assert frame is not None
        frames.append(frame)
    return frames


def test_a_ramp_in_the_capture_file_arrives_byte_exact(
    alsa: AlsaDevices, closing: ExitStack
) -> None:
    pattern = ramp(FMT.chunk * 60)
    alsa.capture.write_bytes(pattern)
    source = open_mic("mic", FMT, closing)
    assert (source.kind, source.format) == (StreamKind.AUDIO, FMT)
    frames = read_n(source, 40)
    assert all(len(f.data) == FMT.chunk_bytes for f in frames)
    assert b"".join(f.data for f in frames) == pattern[: 40 * FMT.chunk_bytes]


def test_stereo_frames_stay_interleaved(alsa: AlsaDevices, closing: ExitStack) -> None:
    pattern = ramp(STEREO.chunk * 8, channels=2)
    alsa.capture.write_bytes(pattern)
    source = open_mic("mic:default", STEREO, closing)
    frames = read_n(source, 5)
    assert b"".join(f.data for f in frames) == pattern[: 5 * STEREO.chunk_bytes]


def test_capture_times_follow_the_sample_count(alsa: AlsaDevices, closing: ExitStack) -> None:
    alsa.capture.write_bytes(ramp(FMT.chunk * 40))
    source = open_mic("mic", FMT, closing)
    frames = read_n(source, 30)
    steps = [b.capture_us - a.capture_us for a, b in itertools.pairwise(frames)]
    # Every step is one chunk, except where the timeline was re-anchored after a stall of
    # this (shared) machine of more than 200 ms.
    off = [s for s in steps if abs(s - FMT.chunk_duration_us) > 1]
    assert len(off) == source._timeline.resyncs


def test_a_clockless_device_is_read_at_real_time(alsa: AlsaDevices, closing: ExitStack) -> None:
    alsa.capture.write_bytes(ramp(FMT.chunk * 60))
    source = open_mic("mic", FMT, closing)
    started = time.monotonic()
    read_n(source, 50)  # 500 ms of audio
    elapsed = time.monotonic() - started
    # Up to 100 ms may be read ahead; the file device alone would take about 1 ms.
    assert 0.35 <= elapsed < 10
    assert source._pacer.paced > 0


def test_a_device_that_delivers_in_real_time_sets_the_pace(
    alsa: AlsaDevices, closing: ExitStack
) -> None:
    fifo = make_capture_fifo(alsa)
    pattern = ramp(FMT.chunk * 40)
    stop = threading.Event()

    def deliver() -> None:  # one chunk per period, as a sound card would
        for i in range(40):
            if stop.wait(FMT.chunk_duration_us / 1e6):
                return
            os.write(fifo, pattern[i * FMT.chunk_bytes : (i + 1) * FMT.chunk_bytes])

    feeder = threading.Thread(target=deliver, daemon=True)
    try:
        source = open_mic(f"mic:{CAPTURE_DEVICE}", FMT, closing)
        feeder.start()
        frames = read_n(source, 30)
    finally:
        stop.set()
        feeder.join()
        os.close(fifo)
    assert b"".join(f.data for f in frames) == pattern[: 30 * FMT.chunk_bytes]
    assert source._pacer.paced == 0  # every read waited for the device: no extra sleep


def test_a_device_can_be_chosen_by_index(alsa: AlsaDevices, closing: ExitStack) -> None:
    index = next(d.index for d in list_devices() if d.name == CAPTURE_DEVICE)
    pattern = ramp(FMT.chunk * 4)
    alsa.capture.write_bytes(pattern)
    source = open_mic(f"mic:{index}", FMT, closing)
    assert CAPTURE_DEVICE in source.description
    assert read_n(source, 2)[0].data == pattern[: FMT.chunk_bytes]


def test_an_unknown_device_is_named_in_the_error(alsa: AlsaDevices) -> None:
    with pytest.raises(DeviceError) as caught:
        MicSource("mic:usb", FMT).open()
    message = str(caught.value)
    assert message.startswith("microphone 'usb' cannot be opened: no input audio device matches")
    assert f"'{CAPTURE_DEVICE}'" in message  # the choices are listed


def test_an_invalid_index_is_named_in_the_error(alsa: AlsaDevices) -> None:
    with pytest.raises(DeviceError, match=r"^microphone '99' cannot be opened: audio device 99"):
        open_mic_source("mic:99", FMT).open()


@pytest.mark.parametrize("spec", ["microphone", "wav:x.wav", "mic:", "mic:  "])
def test_a_spec_that_is_not_a_microphone_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        parse_mic_spec(spec)


def test_spec_parsing() -> None:
    assert parse_mic_spec("mic") == "default"
    assert parse_mic_spec(" MIC : USB Audio ") == "USB Audio"
    assert parse_mic_spec("mic:2") == "2"


def test_only_16_bit_capture_is_offered() -> None:
    with pytest.raises(ValueError, match="16-bit"):
        MicSource("mic", AudioFormat(44100, 1, 1, 1024))


def test_stop_from_another_thread_ends_the_reads(alsa: AlsaDevices, closing: ExitStack) -> None:
    alsa.capture.write_bytes(ramp(FMT.chunk * 400))
    source = open_mic("mic", FMT, closing)
    results: list[int] = []

    def capture() -> None:
        while source.read() is not None:
            results.append(1)

    reader = threading.Thread(target=capture)
    reader.start()
    time.sleep(0.1)
    source.stop()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert results  # it was reading before the stop
    source.close()
    source.close()  # twice is fine
    assert source.read() is None


def test_close_from_another_thread_waits_for_the_read_in_progress(
    alsa: AlsaDevices, closing: ExitStack
) -> None:
    alsa.capture.write_bytes(ramp(FMT.chunk * 400))
    source = open_mic("mic", FMT, closing)
    ended = threading.Event()

    def capture() -> None:
        while source.read() is not None:
            pass
        ended.set()

    reader = threading.Thread(target=capture)
    reader.start()
    time.sleep(0.05)
    closer = threading.Thread(target=source.close)
    closer.start()
    closer.join(timeout=5)
    reader.join(timeout=5)
    assert ended.is_set()
    assert source._stream is None


# --- CaptureTimeline: the clock behind capture_us -----------------------------------------

RATE = 1000  # 1 frame = 1 ms
CHUNK = 10


def test_timeline_starts_at_the_first_sample_and_counts_samples() -> None:
    timeline = CaptureTimeline(RATE, CHUNK)
    # Read returned at 1 s with 5 more frames waiting: the chunk began 15 ms earlier.
    assert timeline.stamp(CHUNK, 1_000_000, backlog_frames=5) == 985_000
    # Later reads are stamped from the count, whatever the jitter of their return.
    assert timeline.stamp(CHUNK, 1_013_000, backlog_frames=0) == 995_000
    assert timeline.stamp(CHUNK, 1_021_000, backlog_frames=0) == 1_005_000
    assert (timeline.overflows, timeline.resyncs) == (0, 0)


def test_timeline_counts_a_jump_as_an_overflow_and_resyncs_only_past_200_ms() -> None:
    timeline = CaptureTimeline(RATE, CHUNK)
    now = 0
    for _ in range(5):
        now += 10_000
        timeline.stamp(CHUNK, now)
    now += 10_000 + 80_000  # 80 ms of samples lost
    stamped = timeline.stamp(CHUNK, now)
    assert timeline.overflows == 1
    assert timeline.resyncs == 0
    assert stamped == 50_000  # still on the sample count: timestamps stay smooth
    now += 10_000
    timeline.stamp(CHUNK, now)
    assert timeline.overflows == 1  # the same 80 ms are not counted again
    now += 10_000 + 150_000  # another 150 ms lost: 230 ms behind the clock in all
    assert timeline.stamp(CHUNK, now) == now - 10_000  # moved to the clock
    assert (timeline.overflows, timeline.resyncs) == (2, 1)


def test_timeline_follows_a_slow_drift_without_counting_overflows() -> None:
    timeline = CaptureTimeline(RATE, CHUNK)
    now = 0
    for _ in range(1100):  # the clock runs 2 % faster than the card: 0.2 ms per chunk
        now += 10_200
        timeline.stamp(CHUNK, now)
    assert timeline.overflows == 0
    assert timeline.resyncs == 1  # over 200 ms of drift after 1000 chunks: re-anchored once


def test_overflows_are_logged_at_most_once_per_10_s(caplog: pytest.LogCaptureFixture) -> None:
    source = MicSource("mic", FMT)
    timeline = source._timeline
    caplog.set_level(logging.WARNING, logger="avd.media.mic")
    now = 0
    for second in range(25):
        for _ in range(100):
            now += 10_000
            timeline.stamp(FMT.chunk, now)
        now += 100_000  # every second, 100 ms of samples are lost
        timeline.stamp(FMT.chunk, now)
        source._report_overflows(now)
        assert timeline.overflows == second + 1
    warnings = [r for r in caplog.records if "overflowed" in r.getMessage()]
    assert len(warnings) == 3  # at 1 s, 11 s and 21 s
    assert "(21 in all)" in warnings[-1].getMessage()


def test_audio_source_specs_are_told_apart_by_their_text() -> None:
    for spec in ("none", "test", "/srv/a.WAV", "mic", " MIC : USB Audio ", "mic:2"):
        assert check_audio_source(spec) == spec
    assert [is_mic_spec(s) for s in ("mic", "Mic:1", "micro", "test")] == [True, True, False, False]
    for spec in ("microphone", "mic:", "/srv/a.mp3", ""):
        with pytest.raises(ValueError):
            check_audio_source(spec)
