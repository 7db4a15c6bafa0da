"""avd.procstat against real processes: this one burning CPU and allocating, and others."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avd import procstat


def _burn(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    data = b"x" * 4096
    while time.monotonic() < deadline:
        data = hashlib.sha256(data).digest() * 128


def test_cpu_seconds_grow_with_work_done_by_this_process() -> None:
    before = procstat.cpu_seconds(os.getpid())
    _burn(0.3)
    used = procstat.cpu_seconds(os.getpid()) - before
    # Generous: a shared machine may steal time, but 0.3 s of a busy loop is mostly ours.
    assert 0.05 <= used <= 1.0


def test_meter_shows_a_busy_loop_near_one_core_and_a_sleep_near_zero() -> None:
    meter = procstat.CpuMeter(os.getpid())
    _burn(0.4)
    busy = meter.percent()
    meter.start()
    time.sleep(0.4)
    idle = meter.percent()
    assert 20.0 <= busy <= 110.0
    assert idle < busy
    assert idle < 15.0


def test_rss_grows_when_memory_is_touched_and_the_peak_remembers_it() -> None:
    pid = os.getpid()
    before = procstat.rss_bytes(pid)
    block = bytearray(os.urandom(1)) * (64 * 1024 * 1024)  # 64 MiB, every page written
    during = procstat.rss_bytes(pid)
    assert during - before >= 48 * 1024 * 1024
    assert procstat.peak_rss_bytes(pid) >= during
    del block


def test_another_process_is_measured_not_this_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        meter = procstat.CpuMeter(child.pid)
        _burn(0.3)  # this process is busy, the sleeping child is not
        assert meter.percent() < 10.0
        assert 1024 * 1024 < procstat.rss_bytes(child.pid) < procstat.rss_bytes(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_a_process_that_is_gone_is_named_in_the_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError, match=str(child.pid)):
        procstat.cpu_seconds(child.pid)
    with pytest.raises(ProcessLookupError, match=str(child.pid)):
        procstat.rss_bytes(child.pid)


def test_cpu_percent_needs_readings_in_order() -> None:
    first = procstat.CpuReading(cpu_s=1.0, wall_s=10.0)
    second = procstat.CpuReading(cpu_s=1.5, wall_s=11.0)
    assert procstat.cpu_percent(first, second) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="after"):
        procstat.cpu_percent(second, first)


def test_a_command_name_with_spaces_and_parentheses_is_parsed() -> None:
    # comm is what the kernel shows in /proc/<pid>/stat between parentheses: make it hostile.
    code = (
        "import ctypes, time; libc = ctypes.CDLL(None); "
        "libc.prctl(15, b'a) b (c', 0, 0, 0); "
        "deadline = time.monotonic() + 0.3\n"
        "while time.monotonic() < deadline: pass\n"
        "time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while "a) b (c" not in Path(f"/proc/{child.pid}/stat").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.4)  # the child has burnt its 0.3 s by now
        assert procstat.cpu_seconds(child.pid) >= 0.05
    finally:
        child.kill()
        child.wait()
