"""``avd devices`` lists the audio devices PortAudio offers, with the value to set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.alsa.alsa_env import make_alsa_devices


def _run_devices(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from avd.cli import main; sys.exit(main(['devices']))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_lists_the_test_devices_with_their_setting_values(tmp_path: Path) -> None:
    devices = make_alsa_devices(tmp_path)
    result = _run_devices({**os.environ, **devices.env()})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "avd_test_capture" in out
    assert "AVD_AUDIO_SOURCE=mic:" in out
    assert "AVD_PLAYBACK=" in out
    assert "Cameras:" in out
    # PortAudio's probing noise stays out of the output.
    assert "ALSA lib" not in result.stderr + out
