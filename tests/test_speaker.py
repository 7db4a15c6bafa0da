"""avd.media.speaker: real PyAudio playback to the ALSA file device of tests/alsa.

Chunks of a known ramp go through SpeakerSink as the receiver would hand them over, and
the same samples must be found in the playback file. The sink writes silence while its
jitter buffer fills, so the ramp is searched for rather than compared from byte 0; the
ramps never hold a zero sample, so "all non-zero samples" is exactly what was played.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

import numpy as np
import pytest

from avd.errors import DeviceError
from avd.media.base import AudioFormat, ReceivedFrame, StreamInfo, StreamKind, VideoFormat
from avd.media.speaker import SpeakerSink, silence_for
from tests.alsa.alsa_env import (
    PLAYBACK_DEVICE,
    AlsaDevices,
    ramp,
)

FMT = AudioFormat(rate=44100, channels=1, sample_width=2, chunk=1024)
STEREO = AudioFormat(rate=48000, channels=2, sample_width=2, chunk=480)
N = 10  # chunks per test stream: 232 ms at 44.1 kHz
# A jitter buffer as deep as the whole stream: playback starts only once every chunk is
# held, so no scheduling hiccup of the test thread can cut the ramp with silence.
WHOLE_STREAM_MS = N * FMT.chunk_duration_us // 1000


def make_sink(
    closing: ExitStack,
    spec: str = "default",
    *,
    sender_filter: str | None = None,
    buffer_ms: int = 60,
) -> SpeakerSink:
    """A SpeakerSink, closed at the test's end even if the test failed."""
    sink = SpeakerSink(spec, sender_filter, buffer_ms)
    closing.callback(sink.close)
    return sink


def audio(sender: str, fmt: AudioFormat = FMT, session: int = 1) -> StreamInfo:
    return StreamInfo(sender, StreamKind.AUDIO, fmt, "127.0.0.1:40000", session)


def chunks(pattern: bytes, fmt: AudioFormat = FMT) -> list[bytes]:
    size = fmt.chunk_bytes
    return [pattern[i : i + size] for i in range(0, len(pattern), size)]


def send(sink: SpeakerSink, info: StreamInfo, data: list[bytes], first_seq: int = 0) -> None:
    for seq, chunk in enumerate(data, start=first_seq):
        sink.frame(info, ReceivedFrame(seq, seq * 1000, seq * 1000, None, chunk))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def wait_played_out(sink: SpeakerSink, played: int) -> None:
    wait_until(lambda: sink.played == played and not sink.busy)


def play_stream(sink: SpeakerSink, info: StreamInfo, data: list[bytes]) -> None:
    """A whole stream handed over as the receiver does (start, chunks, end), then played out."""
    sink.stream_started(info)
    send(sink, info, data)
    sink.stream_ended(info)
    wait_played_out(sink, len(data))


def nonzero_samples(data: bytes) -> bytes:
    samples = np.frombuffer(data, "<i2")
    return bytes(samples[samples != 0].tobytes())


def test_a_stream_is_played_byte_exact(alsa: AlsaDevices, closing: ExitStack) -> None:
    sink = make_sink(closing, buffer_ms=WHOLE_STREAM_MS)
    info = audio("cam1")
    pattern = ramp(FMT.chunk * N)
    play_stream(sink, info, chunks(pattern))
    played = alsa.played()
    assert pattern in played
    assert nonzero_samples(played) == pattern
    assert (sink.gaps, sink.late, sink.overflow) == (0, 0, 0)


def test_the_output_takes_the_stream_format(alsa: AlsaDevices, closing: ExitStack) -> None:
    sink = make_sink(closing, PLAYBACK_DEVICE, buffer_ms=10 * STEREO.chunk_duration_us // 1000)
    info = audio("cam1", STEREO)
    pattern = ramp(STEREO.chunk * 10, channels=2)
    play_stream(sink, info, chunks(pattern, STEREO))
    played = alsa.played()
    assert pattern in played
    assert len(played) % (2 * 2) == 0  # whole stereo frames only


def test_out_of_order_and_missing_chunks(alsa: AlsaDevices, closing: ExitStack) -> None:
    sink = make_sink(closing, buffer_ms=WHOLE_STREAM_MS)
    info = audio("cam1")
    parts = chunks(ramp(FMT.chunk * N))
    sink.stream_started(info)
    order = [1, 0, 3, 2, 5, 4, 7, 6, 9]  # chunk 8 never comes
    for seq in order:
        sink.frame(info, ReceivedFrame(seq, 0, 0, None, parts[seq]))
    sink.stream_ended(info)
    wait_played_out(sink, N - 1)
    expected = b"".join(parts[:8]) + silence_for(FMT) + parts[9]
    assert expected in alsa.played()
    assert sink.gaps == 1


def test_the_sender_filter_is_honoured(alsa: AlsaDevices, closing: ExitStack) -> None:
    sink = make_sink(closing, sender_filter="cam2", buffer_ms=WHOLE_STREAM_MS)
    cam1, cam2 = audio("cam1"), audio("cam2")
    heard = ramp(FMT.chunk * N, negative=True)
    sink.stream_started(cam1)  # first, but not the one asked for
    sink.stream_started(cam2)
    send(sink, cam1, chunks(ramp(FMT.chunk * N)))
    send(sink, cam2, chunks(heard))
    sink.stream_ended(cam1)
    sink.stream_ended(cam2)
    wait_played_out(sink, N)
    assert nonzero_samples(alsa.played()) == heard  # not one sample of cam1


def test_without_filter_the_first_is_heard_then_a_running_one_takes_over(
    alsa: AlsaDevices, closing: ExitStack
) -> None:
    sink = make_sink(closing, buffer_ms=WHOLE_STREAM_MS)
    cam1, cam2 = audio("cam1"), audio("cam2")
    first, second = ramp(FMT.chunk * N), ramp(FMT.chunk * N, negative=True)
    sink.stream_started(cam1)
    sink.stream_started(cam2)
    send(sink, cam2, chunks(second)[:3])  # not heard: cam1 came first
    send(sink, cam1, chunks(first))
    sink.stream_ended(cam1)
    # cam2 was running when cam1 ended: it is heard from its next chunk on.
    send(sink, cam2, chunks(second), first_seq=3)
    sink.stream_ended(cam2)
    wait_played_out(sink, 2 * N)
    # The device is opened again for cam2, which truncates the test's playback file: what
    # is left is all of cam2's chunks after the takeover, and none of those before it.
    assert nonzero_samples(alsa.played()) == second
    assert sink.stats().underruns == 0


def test_the_next_stream_to_start_is_taken(alsa: AlsaDevices, closing: ExitStack) -> None:
    sink = make_sink(closing, buffer_ms=WHOLE_STREAM_MS)
    pattern = ramp(FMT.chunk * N, negative=True)
    first = audio("cam1", session=1)
    sink.stream_started(first)
    sink.stream_ended(first)  # a session that sent nothing
    again = audio("cam1", session=2)  # the same sender reconnected
    play_stream(sink, again, chunks(pattern))
    assert nonzero_samples(alsa.played()) == pattern


def test_video_and_spooled_audio_are_not_played(alsa: AlsaDevices, closing: ExitStack) -> None:
    sink = make_sink(closing, buffer_ms=WHOLE_STREAM_MS)
    video = StreamInfo("cam1", StreamKind.VIDEO, VideoFormat(64, 48, 10, 70), "127.0.0.1:1", 1)
    info = audio("cam1")
    pattern = ramp(FMT.chunk * N)
    sink.stream_started(video)
    sink.frame(video, ReceivedFrame(0, 0, 0, None, b"\xff\xd8 not audio"))
    sink.stream_started(info)
    for seq, chunk in enumerate(chunks(ramp(FMT.chunk * 3, negative=True))):
        sink.frame(info, ReceivedFrame(seq, 0, 0, None, chunk, late=True))
    send(sink, info, chunks(pattern), first_seq=3)
    sink.stream_ended(video)
    sink.stream_ended(info)
    wait_played_out(sink, N)
    assert nonzero_samples(alsa.played()) == pattern
    assert sink.late == 3


def test_chunks_of_partial_frames_or_oversized_are_rejected(
    alsa: AlsaDevices, closing: ExitStack
) -> None:
    sink = make_sink(closing, buffer_ms=WHOLE_STREAM_MS)
    info = audio("cam1")
    pattern = ramp(FMT.chunk * N)
    sink.stream_started(info)
    bad = [b"\x01\x02\x03", ramp(FMT.chunk + 1, negative=True), b""]
    for seq, chunk in enumerate(bad):
        sink.frame(info, ReceivedFrame(seq, 0, 0, None, chunk))
    short_last = chunks(pattern)
    short_last[-1] = short_last[-1][:100]  # a shorter last chunk (end of a WAV) is fine
    send(sink, info, short_last, first_seq=len(bad))
    sink.stream_ended(info)
    wait_played_out(sink, N)
    assert sink.rejected == len(bad)
    assert nonzero_samples(alsa.played()) == b"".join(short_last)


def test_a_format_the_device_refuses_is_logged_and_the_next_stream_plays(
    alsa: AlsaDevices, closing: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink(closing, buffer_ms=WHOLE_STREAM_MS)
    too_wide = AudioFormat(rate=44100, channels=200, sample_width=2, chunk=64)  # 128 at most
    refused = audio("cam1", too_wide)
    sink.stream_started(refused)
    wait_until(lambda: "cannot play 44100 Hz, 200 channel(s)" in caplog.text)
    assert "speaker 'default'" in caplog.text
    assert "the stream is still received and recorded (AVD_PLAYBACK: none for no" in caplog.text
    send(sink, refused, [bytes(too_wide.chunk_bytes)] * 3)  # dropped, no error
    sink.stream_ended(refused)
    good = audio("cam2")
    pattern = ramp(FMT.chunk * N)
    play_stream(sink, good, chunks(pattern))
    assert nonzero_samples(alsa.played()) == pattern


def test_a_clockless_device_is_played_at_real_time(alsa: AlsaDevices, closing: ExitStack) -> None:
    sink = make_sink(closing, buffer_ms=WHOLE_STREAM_MS)
    info = audio("cam1")
    sink.stream_started(info)
    send(sink, info, chunks(ramp(FMT.chunk * 20)))  # 464 ms
    started = time.monotonic()
    sink.stream_ended(info)
    wait_played_out(sink, 20)
    # Up to about 100 ms may be written ahead; the file device alone takes about 1 ms.
    assert time.monotonic() - started >= 0.3


def test_an_unknown_device_is_named_in_the_error(alsa: AlsaDevices) -> None:
    with pytest.raises(DeviceError) as caught:
        SpeakerSink("usb")
    message = str(caught.value)
    assert message.startswith("speaker 'usb' cannot be opened: no output audio device matches")
    assert f"'{PLAYBACK_DEVICE}'" in message
    with pytest.raises(DeviceError, match=r"^speaker '99' cannot be opened: audio device 99"):
        SpeakerSink("99")


def test_close_stops_at_once_and_twice_is_fine(alsa: AlsaDevices, closing: ExitStack) -> None:
    sink = make_sink(closing, buffer_ms=60)
    info = audio("cam1")
    sink.stream_started(info)
    send(sink, info, chunks(ramp(FMT.chunk * 20)))  # would take 464 ms to play
    wait_until(lambda: sink.played > 0)
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 2
    assert not sink._thread.is_alive()
    sink.close()
    sink.frame(info, ReceivedFrame(99, 0, 0, None, b"\x00\x01"))  # ignored, no error
