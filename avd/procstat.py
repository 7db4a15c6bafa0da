"""CPU time and memory of a process, read from /proc (Linux), for ``avd bench``.

CPU: ``utime + stime`` of ``/proc/<pid>/stat`` (all threads of the process, in clock ticks
of ``os.sysconf("SC_CLK_TCK")``, usually 100 per second); a ``CpuMeter`` turns two readings
into percent of one core over the wall time between them, the figure ``top`` shows.
Memory: ``VmRSS`` (resident now) and ``VmHWM`` (its peak) of ``/proc/<pid>/status``.

A pid that has gone away raises ``ProcessLookupError`` naming it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# Fields of /proc/<pid>/stat after the ")" that ends the command name, which may itself
# hold spaces and parentheses: field 3 (state) is index 0, so utime (14) is 11, stime 12.
_UTIME_INDEX, _STIME_INDEX = 11, 12


def _read(pid: int, name: str) -> str:
    try:
        return (PROC / str(pid) / name).read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(f"process {pid} does not exist (any more)") from None


def clock_ticks_per_second() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far, in seconds."""
    fields = _read(pid, "stat").rpartition(")")[2].split()
    ticks = int(fields[_UTIME_INDEX]) + int(fields[_STIME_INDEX])
    return ticks / clock_ticks_per_second()


def _status_kib(pid: int, key: str) -> int:
    for line in _read(pid, "status").splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])  # "VmRSS:	  123456 kB"
    raise ProcessLookupError(f"process {pid} has no {key} (a zombie or a kernel thread)")


def rss_bytes(pid: int) -> int:
    """Resident memory of the process now."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """The highest resident memory the process has had (VmHWM)."""
    return _status_kib(pid, "VmHWM") * 1024


@dataclass(frozen=True, slots=True)
class CpuReading:
    cpu_s: float
    wall_s: float


def read_cpu(pid: int) -> CpuReading:
    return CpuReading(cpu_seconds(pid), time.monotonic())


def cpu_percent(before: CpuReading, after: CpuReading) -> float:
    """Percent of one core used between two readings (100 = one core busy throughout)."""
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        raise ValueError("the second CPU reading must come after the first")
    return 100.0 * (after.cpu_s - before.cpu_s) / wall


class CpuMeter:
    """CPU percent of one process since ``start()`` (or since it was made)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = read_cpu(pid)

    def start(self) -> None:
        self._start = read_cpu(self.pid)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start.wall_s

    def percent(self) -> float:
        """Percent of one core since the start; the resolution is one clock tick (10 ms)."""
        return cpu_percent(self._start, read_cpu(self.pid))
