"""CPU time and memory of a process, read from /proc (Linux), for ``avd bench``.

CPU: ``utime + stime`` of ``/proc/<pid>/stat`` (all threads of the process, in clock ticks
of ``os.sysconf("SC_CLK_TCK")``, usually 100 per second); a ``CpuMeter`` turns two readings
into percent of one core over the wall time between them, the figure ``top`` shows.
Memory: ``VmRSS`` (resident now) and ``VmHWM`` (its peak) of ``/proc/<pid>/status``.

``tree=True`` counts the process and every descendant alive now (the receiver records in a
child process: its cost is the receiver's), plus the CPU of children already reaped
(``cutime``/``cstime``). Shared pages count once per process, so a tree's RSS overstates a
little; growth between two readings of the same tree does not.

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
_UTIME_INDEX, _STIME_INDEX, _CUTIME_INDEX, _CSTIME_INDEX = 11, 12, 13, 14


def _read(pid: int, name: str) -> str:
    try:
        return (PROC / str(pid) / name).read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(f"process {pid} does not exist (any more)") from None


def clock_ticks_per_second() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (children, their children, ...)."""
    found: list[int] = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        for child in children:
            found += [child, *descendants(child)]
    return found


def _tree(pid: int, tree: bool) -> list[int]:
    return [pid, *descendants(pid)] if tree else [pid]


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """User plus system CPU time the process (``tree``: and its descendants) used so far."""
    ticks = 0
    for index, member in enumerate(_tree(pid, tree)):
        try:
            fields = _read(member, "stat").rpartition(")")[2].split()
        except ProcessLookupError:
            if index == 0:
                raise
            continue  # a descendant that ended meanwhile: its parent reaps it into cutime
        ticks += int(fields[_UTIME_INDEX]) + int(fields[_STIME_INDEX])
        if tree:
            ticks += int(fields[_CUTIME_INDEX]) + int(fields[_CSTIME_INDEX])
    return ticks / clock_ticks_per_second()


def _status_kib(pid: int, key: str) -> int:
    for line in _read(pid, "status").splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])  # "VmRSS:	  123456 kB"
    raise ProcessLookupError(f"process {pid} has no {key} (a zombie or a kernel thread)")


def rss_bytes(pid: int, *, tree: bool = False) -> int:
    """Resident memory of the process (``tree``: and its descendants) now."""
    total = 0
    for index, member in enumerate(_tree(pid, tree)):
        try:
            total += _status_kib(member, "VmRSS") * 1024
        except ProcessLookupError:
            if index == 0:
                raise
    return total


def peak_rss_bytes(pid: int) -> int:
    """The highest resident memory the process has had (VmHWM)."""
    return _status_kib(pid, "VmHWM") * 1024


@dataclass(frozen=True, slots=True)
class CpuReading:
    cpu_s: float
    wall_s: float


def read_cpu(pid: int, *, tree: bool = False) -> CpuReading:
    return CpuReading(cpu_seconds(pid, tree=tree), time.monotonic())


def cpu_percent(before: CpuReading, after: CpuReading) -> float:
    """Percent of one core used between two readings (100 = one core busy throughout)."""
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        raise ValueError("the second CPU reading must come after the first")
    return 100.0 * (after.cpu_s - before.cpu_s) / wall


class CpuMeter:
    """CPU percent of one process (``tree``: with its descendants) since ``start()``."""

    def __init__(self, pid: int, *, tree: bool = False) -> None:
        self.pid, self.tree = pid, tree
        self._start = read_cpu(pid, tree=tree)

    def start(self) -> None:
        self._start = read_cpu(self.pid, tree=self.tree)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start.wall_s

    def percent(self) -> float:
        """Percent of one core since the start; the resolution is one clock tick (10 ms)."""
        return cpu_percent(self._start, read_cpu(self.pid, tree=self.tree))
