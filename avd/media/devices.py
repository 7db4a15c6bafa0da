"""``avd devices``: the cameras and audio devices this machine offers, with setting values.

Prints each device next to the value that selects it (``AVD_VIDEO_SOURCE=/dev/video0``,
``AVD_AUDIO_SOURCE=mic:2``, ``AVD_PLAYBACK=3``), so an operator can copy it into an env file.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from avd.errors import DeviceError
from avd.media.pa import format_device_table, list_cameras, list_devices


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="avd devices",
        description="List cameras and audio devices with the setting value for each.",
    )
    parser.add_argument(
        "--max-camera-index", type=int, default=10, help="probe /dev/video0 .. N (10)"
    )
    args = parser.parse_args(argv)
    try:
        audio = list_devices()
    except DeviceError as exc:
        print(f"avd devices: {exc}")
        audio = []
    cameras = list_cameras(max_index=args.max_camera_index)
    print(format_device_table(audio, cameras))
    return 0
