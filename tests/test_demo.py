"""``avd demo``, the README's first command: real daemons, a recording, figures, exit 0."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import REPO


def test_the_demo_streams_records_prints_figures_and_stops_both_daemons_cleanly() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from avd.cli import main; sys.exit(main())",
         "demo", "--seconds", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for stream in ("video", "audio"):
        row = re.search(rf"^{stream}\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
        assert row is not None, out
        assert float(row.group(1)) > 0, row.group(0)
    packets = re.search(r"\((\d+) mjpeg packets, (\d+) pcm_s16le packets\)", out)
    assert packets is not None, out
    assert int(packets.group(1)) > 0
    assert int(packets.group(2)) > 0
    assert "latest.jpg" in out
    assert "exit codes: sender 0, receiver 0" in out
