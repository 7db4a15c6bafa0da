"""What a process holds, read from /proc: resident memory and open file descriptors; and
which processes are still running (a daemon's recording process may outlive it a moment).

The hostile-clients tests watch the receiver daemon with these: after each attack its
descriptors must come back to normal and its memory stay bounded.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line (a zombie?)")


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> Counter[str]:
    """Open descriptors by kind (socket, pipe, anon_inode, file), for failure messages."""
    kinds: Counter[str] = Counter()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except FileNotFoundError:  # closed while we looked
            continue
        kinds[target.split(":", 1)[0] if ":" in target else "file"] += 1
    return kinds


def pids_with_argument(fragment: str) -> list[int]:
    """Processes whose command line has an argument containing ``fragment``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if any(fragment.encode() in arg for arg in argv):
            found.append(int(entry.name))
    return found
