"""avd.media.pa: device lookup, listing, quiet start-up and the pacer of clockless devices.

Device lookup and listing run on real PyAudio over the ALSA file devices of
tests/alsa/asound.conf. The stderr checks run PyAudio in a child process and read its
fd 2, next to a control run without avd's handlers that must be noisy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from avd.errors import DeviceError
from avd.media.pa import (
    ClocklessPacer,
    DeviceInfo,
    _load_library,
    find_device,
    format_device_table,
    list_cameras,
    list_devices,
    open_pyaudio,
)
from tests.alsa.alsa_env import (
    CAPTURE_DEVICE,
    PLAYBACK_DEVICE,
    AlsaDevices,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def pa(alsa: AlsaDevices) -> Iterator[Any]:
    instance = open_pyaudio()
    yield instance
    instance.terminate()


def index_of(name: str) -> int:
    return next(d.index for d in list_devices() if d.name == name)


# --- find_device on real devices -------------------------------------------------------


def test_default_means_portaudio_default_device(pa: Any) -> None:
    assert find_device(pa, "default", input=True) is None
    assert find_device(pa, " DEFAULT ", input=False) is None


def test_an_index_is_taken_when_the_device_exists(pa: Any) -> None:
    capture = index_of(CAPTURE_DEVICE)
    assert find_device(pa, str(capture), input=True) == capture


def test_a_name_part_matches_case_insensitively(pa: Any) -> None:
    assert find_device(pa, "TEST_CAPT", input=True) == index_of(CAPTURE_DEVICE)
    assert find_device(pa, "Playback", input=False) == index_of(PLAYBACK_DEVICE)


def test_an_unknown_name_is_refused_with_the_choices(pa: Any) -> None:
    with pytest.raises(DeviceError) as caught:
        find_device(pa, "usb", input=True)
    message = str(caught.value)
    assert message.startswith("no input audio device matches 'usb': choose one of: ")
    assert f"{index_of(CAPTURE_DEVICE)} '{CAPTURE_DEVICE}'" in message
    assert "'default'" in message


def test_an_index_out_of_range_is_refused_with_the_choices(pa: Any) -> None:
    with pytest.raises(DeviceError, match=r"^audio device 99 does not exist: choose one of: "):
        find_device(pa, "99", input=False)


# --- find_device matching rules, on a stand-in for PyAudio's device list ---------------


class FakeDeviceList:
    """The four PyAudio calls find_device makes, over a fixed device list."""

    def __init__(self, devices: list[tuple[str, int, int]]) -> None:
        self.devices = devices  # (name, input channels, output channels)

    def get_host_api_count(self) -> int:
        return 1

    def get_host_api_info_by_index(self, index: int) -> dict[str, Any]:
        return {"name": "ALSA"}

    def get_device_count(self) -> int:
        return len(self.devices)

    def get_device_info_by_index(self, index: int) -> dict[str, Any]:
        name, inputs, outputs = self.devices[index]
        return {
            "name": name,
            "hostApi": 0,
            "maxInputChannels": inputs,
            "maxOutputChannels": outputs,
            "defaultSampleRate": 48000.0,
        }


CARDS = FakeDeviceList(
    [("USB Audio: - (hw:1,0)", 1, 0), ("pulse", 32, 32), ("pulse2", 2, 2), ("HDMI", 0, 8)]
)


def test_an_exact_name_wins_over_a_longer_name_listed_first() -> None:
    devices = FakeDeviceList([("pulse2", 2, 2), ("pulse", 2, 2)])
    assert find_device(devices, "pulse", input=False) == 1
    assert find_device(devices, "puls", input=False) == 0


def test_a_device_without_channels_in_that_direction_is_refused() -> None:
    with pytest.raises(DeviceError) as caught:
        find_device(CARDS, "3", input=True)
    assert str(caught.value) == (
        "audio device 3 has no input channels: "
        "choose one of: 0 'USB Audio: - (hw:1,0)', 1 'pulse', 2 'pulse2'"
    )
    with pytest.raises(DeviceError, match="no output audio device matches 'usb'"):
        find_device(CARDS, "usb", input=False)


def test_no_device_at_all_is_said_plainly() -> None:
    with pytest.raises(DeviceError, match="there is no input audio device at all"):
        find_device(FakeDeviceList([]), "mic", input=True)


# --- listing -----------------------------------------------------------------------------


def test_list_devices_reports_the_test_devices(alsa: AlsaDevices) -> None:
    devices = {d.name: d for d in list_devices()}
    assert {CAPTURE_DEVICE, PLAYBACK_DEVICE, "default"} <= set(devices)
    capture = devices[CAPTURE_DEVICE]
    assert capture.host_api == "ALSA"
    assert capture.max_input_channels > 0
    assert capture.default_rate > 0


def test_the_table_gives_the_setting_for_each_device_and_camera() -> None:
    devices = [
        DeviceInfo(0, "USB mic", 1, 0, 48000.0, "ALSA"),
        DeviceInfo(1, "HDMI", 0, 8, 48000.0, "ALSA"),
        DeviceInfo(2, "default", 32, 32, 44100.0, "ALSA"),
    ]
    lines = format_device_table(devices, ["/dev/video0"]).splitlines()
    assert lines[0] == "Audio devices (PortAudio):"
    assert "'USB mic'" in lines[1]
    assert lines[1].endswith("AVD_AUDIO_SOURCE=mic:0")
    assert lines[2].endswith("AVD_PLAYBACK=1")
    assert lines[3].endswith("AVD_AUDIO_SOURCE=mic:2  AVD_PLAYBACK=2")
    assert lines[4] == "Cameras:"
    assert lines[5].split() == ["/dev/video0", "AVD_VIDEO_SOURCE=/dev/video0"]
    empty = format_device_table([], [])
    assert empty.count("(none found)") == 2


def test_list_cameras_keeps_the_nodes_opencv_can_open(tmp_path: Path) -> None:
    writer = cv2.VideoWriter(
        str(tmp_path / "video0.avi"), cv2.VideoWriter.fourcc(*"MJPG"), 10, (64, 48)
    )
    for _ in range(3):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    (tmp_path / "video0.avi").rename(tmp_path / "video0")
    (tmp_path / "video2").write_bytes(b"not a camera")  # exists, but nothing opens it
    template = str(tmp_path / "video{}")
    assert list_cameras(4, template) == [str(tmp_path / "video0")]
    assert list_cameras(4, str(tmp_path / "none{}")) == []


# --- quiet start-up ----------------------------------------------------------------------

START_QUIETLY = "from avd.media.pa import open_pyaudio; open_pyaudio().terminate()"
START_PLAINLY = "import pyaudio; pyaudio.PyAudio().terminate()"


def stderr_of(code: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stderr


@pytest.mark.parametrize("config", ["test devices", "system config, no card"])
def test_quiet_start_up_leaves_stderr_clean(alsa: AlsaDevices, config: str) -> None:
    env = dict(os.environ)
    if config == "system config, no card":
        del env["ALSA_CONFIG_PATH"]  # ALSA then complains about every missing card
    assert stderr_of(START_PLAINLY, env) != ""  # the noise is there to be silenced
    assert stderr_of(START_QUIETLY, env) == ""


def test_a_missing_library_is_skipped() -> None:
    assert _load_library("libavd-does-not-exist.so.9") is None
    assert _load_library("libavd-does-not-exist.so.9", "libasound.so.2") is not None


# --- ClocklessPacer ----------------------------------------------------------------------

RATE = 1000  # 1 frame = 1 ms, so the arithmetic reads plainly
CHUNK = 10  # frames: 10 ms


def make_pacer() -> ClocklessPacer:
    return ClocklessPacer(RATE, max_lead_us=50_000, blocked_us=5_000)


def test_a_device_that_keeps_time_is_never_slowed() -> None:
    pacer = make_pacer()
    now = 0
    for _ in range(100):  # each call waits its 10 ms, as a sound card makes it
        assert pacer.after_io(CHUNK, now, now + 10_000) == 0
        now += 10_000
    assert pacer.paced == 0


def test_a_device_without_clock_is_held_to_real_time() -> None:
    pacer = make_pacer()
    now = 0
    slept = []
    for _ in range(100):  # each call returns at once
        sleep_us = pacer.after_io(CHUNK, now, now + 10)
        slept.append(sleep_us)
        now += 10 + sleep_us
    # After a lead of 50 ms, every chunk costs its 10 ms of sleep: real time.
    assert slept[:5] == [0] * 5
    assert all(9_000 <= s <= 10_000 for s in slept[7:])
    assert 940_000 <= now <= 1_000_000
    assert pacer.paced > 90


def test_catching_up_after_a_stall_is_not_mistaken_for_a_clockless_device() -> None:
    pacer = make_pacer()
    now = 0
    for _ in range(10):
        pacer.after_io(CHUNK, now, now + 10_000)
        now += 10_000
    now += 300_000  # the thread was away: 30 chunks wait in the device's buffer
    for _ in range(30):
        assert pacer.after_io(CHUNK, now, now + 10) == 0  # read at once, still behind
        now += 10
    assert pacer.paced == 0
