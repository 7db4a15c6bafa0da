"""PyAudio helpers: a quiet start-up, finding a device from a setting, listing devices.

Also ``ClocklessPacer``, which holds a sound device that has no clock to real time. A real
sound card paces blocking I/O itself (a read waits for samples, a write waits for room);
the ALSA file devices the tests use, or a broken driver, return at once, and a capture or
playback loop on them would spin thousands of times faster than real time.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyaudio

from avd.errors import DeviceError

if TYPE_CHECKING:
    from _ctypes import CFuncPtr

# snd_lib_error_handler_t is variadic (file, line, function, err, fmt, ...); a callback that
# declares only the fixed arguments is safe on the C calling conventions Linux uses, since
# the callee never reads the variadic ones.
_AlsaErrorHandler = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p
)
_JackMessageHandler = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def _ignore_alsa_error(
    _file: bytes | None, _line: int, _function: bytes | None, _err: int, _fmt: bytes | None
) -> None:
    """Swallow one ALSA library message (PyAudio's probing of every PCM prints dozens)."""


def _ignore_jack_message(_message: bytes | None) -> None:
    """Swallow one JACK message ("jack server is not running" on every PyAudio())."""


@functools.cache
def _quiet_handlers() -> tuple[CFuncPtr, CFuncPtr] | None:
    """The no-op callbacks, made once and never freed (the cache keeps them).

    The C libraries keep these function pointers for the life of the process; a callback
    that Python garbage-collected would crash it the next time ALSA or JACK called it. None
    if callbacks cannot be made (an old libffi under MemoryDenyWriteExecute=yes): the noise
    is cosmetic, never worth failing for.
    """
    try:
        return _AlsaErrorHandler(_ignore_alsa_error), _JackMessageHandler(_ignore_jack_message)
    except (MemoryError, OSError):
        return None


def _load_library(*names: str) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def quiet_portaudio() -> None:
    """Silence what ALSA and JACK print on stderr; a library that is absent is skipped.

    A plain function rather than a context manager: the handlers must stay installed for
    good, because ALSA also prints on every later device open (PyAudio re-probes), and
    stderr may be the journal. Installing them again is harmless.
    """
    handlers = _quiet_handlers()
    if handlers is None:
        return
    alsa_handler, jack_handler = handlers
    asound = _load_library("libasound.so.2", "libasound.so")
    if asound is not None:
        asound.snd_lib_error_set_handler(alsa_handler)
    jack = _load_library("libjack.so.0", "libjack.so")
    if jack is not None:
        jack.jack_set_error_function(jack_handler)
        jack.jack_set_info_function(jack_handler)


def open_pyaudio() -> pyaudio.PyAudio:
    """A PyAudio instance started quietly. The caller must ``terminate()`` it."""
    quiet_portaudio()
    try:
        return pyaudio.PyAudio()
    except OSError as exc:
        raise DeviceError(f"PortAudio cannot start: {exc}") from exc


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    index: int
    name: str
    max_input_channels: int
    max_output_channels: int
    default_rate: float
    host_api: str

    def channels(self, *, input: bool) -> int:
        return self.max_input_channels if input else self.max_output_channels


def device_infos(pa: pyaudio.PyAudio) -> list[DeviceInfo]:
    """Every device PortAudio knows, in index order."""
    host_apis = {
        i: str(pa.get_host_api_info_by_index(i)["name"]) for i in range(pa.get_host_api_count())
    }
    devices = []
    for index in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(index)
        devices.append(
            DeviceInfo(
                index=index,
                name=str(info["name"]),
                max_input_channels=int(info["maxInputChannels"]),
                max_output_channels=int(info["maxOutputChannels"]),
                default_rate=float(info["defaultSampleRate"]),
                host_api=host_apis.get(int(info["hostApi"]), "?"),
            )
        )
    return devices


def list_devices() -> list[DeviceInfo]:
    """Every audio device, from a PyAudio instance started and stopped for the purpose."""
    pa = open_pyaudio()
    try:
        return device_infos(pa)
    finally:
        pa.terminate()


def find_device(pa: pyaudio.PyAudio, spec: str, *, input: bool) -> int | None:
    """The device index a setting names; None for "default" (PortAudio's default device).

    ``spec`` is "default", an index, or a case-insensitive part of the device name (an exact
    name wins over a partial one; otherwise the lowest index that matches).
    """
    wanted = spec.strip()
    if wanted.casefold() == "default":
        return None
    direction = "input" if input else "output"
    usable = [d for d in device_infos(pa) if d.channels(input=input) > 0]
    if wanted.isdecimal():
        index = int(wanted)
        if any(d.index == index for d in usable):
            return index
        known = index < pa.get_device_count()
        problem = f"has no {direction} channels" if known else "does not exist"
        raise DeviceError(f"audio device {index} {problem}: {_choices(usable, direction)}")
    folded = wanted.casefold()
    exact = [d for d in usable if d.name.casefold() == folded]
    partial = [d for d in usable if folded in d.name.casefold()]
    if exact or partial:
        return (exact or partial)[0].index
    raise DeviceError(
        f"no {direction} audio device matches {wanted!r}: {_choices(usable, direction)}"
    )


def _choices(devices: list[DeviceInfo], direction: str) -> str:
    if not devices:
        return f"there is no {direction} audio device at all"
    return "choose one of: " + ", ".join(f"{d.index} {d.name!r}" for d in devices)


def list_cameras(max_index: int = 10, path_template: str = "/dev/video{}") -> list[str]:
    """The video devices that exist and that OpenCV opens, as paths for AVD_VIDEO_SOURCE.

    A USB camera often makes two nodes, one of them metadata only, so existing is not
    enough: each node is opened once to tell. ``path_template`` is for tests.
    """
    import cv2  # noqa: PLC0415 - OpenCV takes a while to import; only `avd devices` needs it

    cameras = []
    for index in range(max_index):
        path = path_template.format(index)
        if not Path(path).exists():
            continue
        capture = cv2.VideoCapture(path)
        try:
            if capture.isOpened():
                cameras.append(path)
        finally:
            capture.release()
    return cameras


def format_device_table(devices: list[DeviceInfo], cameras: list[str]) -> str:
    """The listing `avd devices` prints: each device with the setting that selects it."""
    lines = ["Audio devices (PortAudio):"]
    if not devices:
        lines.append("  (none found)")
    for d in devices:
        settings = []
        if d.max_input_channels > 0:
            settings.append(f"AVD_AUDIO_SOURCE=mic:{d.index}")
        if d.max_output_channels > 0:
            settings.append(f"AVD_PLAYBACK={d.index}")
        lines.append(
            f"  {d.index:>3}  {d.name!r:<32} in {d.max_input_channels:>3}  "
            f"out {d.max_output_channels:>3}  {d.default_rate:>7.0f} Hz  {d.host_api:<6}  "
            + "  ".join(settings)
        )
    lines.append("Cameras:")
    if not cameras:
        lines.append("  (none found)")
    lines.extend(f"  {path:<36} AVD_VIDEO_SOURCE={path}" for path in cameras)
    return "\n".join(lines)


class ClocklessPacer:
    """Holds a sound device without a clock to real time; leaves a device with a clock alone.

    Call ``after_io`` after each blocking read or write with the frames it moved and when the
    call started and ended. A call that had to wait (``blocked_us`` or more) proves the device
    has a clock: the timeline is re-anchored there and nothing is slept, so a real card's
    own pace and its clock drift are never fought. When calls keep returning at once, the
    stream position runs ahead of the system clock; past ``max_lead_us`` the answer is how
    many microseconds to sleep to come back to it.
    """

    def __init__(self, rate: int, *, max_lead_us: int, blocked_us: int) -> None:
        self._rate = rate
        self._max_lead_us = max_lead_us
        self._blocked_us = blocked_us
        self._frames = 0
        self._anchor_us: int | None = None  # when frame 0 would have been on the system clock
        self.paced = 0  # how many sleeps were asked for: nonzero means the device is clockless

    def after_io(self, frames: int, started_us: int, ended_us: int) -> int:
        """Microseconds to sleep before the next call (0 for a device that keeps time)."""
        self._frames += frames
        position_us = self._frames * 1_000_000 // self._rate
        if self._anchor_us is None or ended_us - started_us >= self._blocked_us:
            self._anchor_us = ended_us - position_us
            return 0
        lead_us = position_us - (ended_us - self._anchor_us)
        if lead_us <= self._max_lead_us:
            return 0
        self.paced += 1
        return lead_us - self._max_lead_us
