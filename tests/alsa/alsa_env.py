"""Real PyAudio in tests, through the ALSA file devices of ``asound.conf``.

Each test gets its own capture and playback files, named by environment variables that
``asound.conf`` reads when a device is opened:

- in this process: ``use_alsa_devices(monkeypatch, devices)`` sets ALSA_CONFIG_PATH,
  TEST_ALSA_IN and TEST_ALSA_OUT. Every PyAudio created afterwards uses them:
  alsa-lib reloads its configuration when ALSA_CONFIG_PATH changes, and the file names are
  read at each device open, so no subprocess is needed. Create PyAudio (or the avd object
  that does) only after the call.
- in a subprocess (the sender or receiver daemon): pass ``{**os.environ, **devices.env()}``.
  Give each process its own files (``make_alsa_devices(tmp, "sender")``, ``(tmp,
  "receiver")``): every ``PyAudio()`` opens both devices while probing, so a sender sharing
  the receiver's files would truncate what the receiver played.

Facts to know (see also asound.conf):

- ``default`` captures from ``devices.capture`` and plays to ``devices.playback``; the same
  devices are also listed by name, ``avd_test_capture`` and ``avd_test_playback``.
- The devices have no clock. avd's microphone and speaker pace themselves to the system
  clock on such a device, so they run at real time; other readers spin.
- Capture past the end of the capture file returns stale data, not silence: make the file
  longer than the test reads. ``capture`` may be a FIFO (``make_capture_fifo``) to pace the
  device from the test.
- Opening the playback device truncates the playback file. ``PyAudio()`` opens every
  device once while probing, and avd's speaker opens the device again for each stream, so
  the file holds what was played since the last open.
- A wrong ALSA_CONFIG_PATH makes PortAudio abort the whole process (an assertion in its
  ALSA device list), hence ``ASOUND_CONF`` is checked to exist.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

ASOUND_CONF = Path(__file__).resolve().with_name("asound.conf")
CAPTURE_DEVICE = "avd_test_capture"
PLAYBACK_DEVICE = "avd_test_playback"


@dataclass(frozen=True)
class AlsaDevices:
    capture: Path  # the bytes the capture device returns
    playback: Path  # where the playback device writes, raw

    def env(self) -> dict[str, str]:
        """The environment that selects these files, for this process or a child."""
        assert ASOUND_CONF.is_file(), ASOUND_CONF
        return {
            "ALSA_CONFIG_PATH": str(ASOUND_CONF),
            "TEST_ALSA_IN": str(self.capture),
            "TEST_ALSA_OUT": str(self.playback),
        }

    def played(self) -> bytes:
        return self.playback.read_bytes() if self.playback.exists() else b""


def make_alsa_devices(directory: Path, name: str = "alsa") -> AlsaDevices:
    """Files ``<name>-capture.raw`` (empty: write the pattern to it) and ``<name>-playback.raw``."""
    devices = AlsaDevices(directory / f"{name}-capture.raw", directory / f"{name}-playback.raw")
    devices.capture.touch()
    return devices


def make_capture_fifo(devices: AlsaDevices) -> int:
    """Replace the capture file by a FIFO; returns a descriptor the test writes periods to.

    The descriptor is opened read-write so that neither side blocks in open(): PyAudio's
    probing opens the capture file too. The caller closes it.
    """
    devices.capture.unlink(missing_ok=True)
    os.mkfifo(devices.capture)
    return os.open(devices.capture, os.O_RDWR)


def use_alsa_devices(monkeypatch: pytest.MonkeyPatch, devices: AlsaDevices) -> None:
    """Point this process's ALSA at ``devices`` until the test ends."""
    for key, value in devices.env().items():
        monkeypatch.setenv(key, value)


def ramp(frames: int, channels: int = 1, start: int = 0, *, negative: bool = False) -> bytes:
    """A counter ramp of int16 samples, 1..32767 (or negated), never 0: silence can't mimic it.

    Two senders told apart in one output use ``negative`` for one of them.
    """
    sign = -1 if negative else 1
    values = [sign * ((start + i) % 32767 + 1) for i in range(frames * channels)]
    return struct.pack(f"<{len(values)}h", *values)
