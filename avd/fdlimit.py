"""The receiver's budget of open files: enough descriptors for ``AVD_MAX_CONNECTIONS``.

Each connection holds a socket in the daemon, and, with recording on, each sender's
recording holds files in the recording process: the segment FFmpeg writes and the
descriptor that reads it back to see what reached the disk, twice while a backfill segment
is open beside the live one. Most systems start a process with a soft limit of 1024 open
files (systemd's default for services; login shells too), which a receiver of a few
hundred senders outgrows: its accept loop then pauses, and the recording process cannot
open the next segment.

So the daemon raises its soft limit, before the recording process starts (which inherits
it), to what its settings need, as far as the hard limit allows (524288 under systemd), as
servers written in Go do for every process. Python never uses ``select()`` on these
descriptors, so a limit over 1024 is safe. When the hard limit is too low, the daemon takes
no more connections than its files allow and says so, rather than failing at the
connection that finds the limit: a refused sender keeps its frames and retries.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Per connection, the worst case in the process that needs the most: with recording on, a
# video-only sender's one connection, a live and a backfill segment open at once in the
# recording process, and a reading descriptor for each; without, its socket.
FILES_PER_CONNECTION = 4
FILES_PER_CONNECTION_UNRECORDED = 1
# Everything else: the interpreter and its libraries, listening sockets, the recording
# process's pipes, the metrics server, the sound device, the files read at a reload.
FILES_BESIDES = 64


def _per_connection(recording: bool) -> int:
    return FILES_PER_CONNECTION if recording else FILES_PER_CONNECTION_UNRECORDED


def files_needed(max_connections: int, *, recording: bool = True) -> int:
    return _per_connection(recording) * max_connections + FILES_BESIDES


def connections_within(files: int, *, recording: bool = True) -> int:
    """The most connections ``files`` open files carry (at least one)."""
    return max(1, (files - FILES_BESIDES) // _per_connection(recording))


@dataclass(frozen=True, slots=True)
class FileBudget:
    wanted: int  # open files the settings may need
    before: int  # the soft limit the process started with
    soft: int  # the soft limit now
    hard: int
    error: str | None = None  # why raising failed, if it was tried and refused

    @property
    def raised(self) -> bool:
        return self.soft > self.before

    @property
    def enough(self) -> bool:
        return self.soft >= self.wanted

    def shortfall(self, max_connections: int, *, recording: bool = True) -> str:
        """The warning for a budget that is not ``enough``: what is capped, and the remedy."""
        why = f" (raising it failed: {self.error})" if self.error else ""
        return (
            f"AVD_MAX_CONNECTIONS={max_connections} may need {self.wanted} open files, but this "
            f"process may open {self.soft}{why}: taking at most "
            f"{connections_within(self.soft, recording=recording)} connections; raise the "
            f"limit (LimitNOFILE= in the unit, ulimit -n) or set AVD_MAX_CONNECTIONS to that"
        )


def _as_int(limit: int) -> int:
    return 2**62 if limit == resource.RLIM_INFINITY else limit


def ensure_open_files(wanted: int) -> FileBudget:
    """Raise this process's soft RLIMIT_NOFILE to ``wanted``, as far as the hard limit goes.

    Never lowers it. Children started afterwards inherit the new limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before, ceiling = _as_int(soft), _as_int(hard)
    if before >= wanted:
        return FileBudget(wanted, before, before, ceiling)
    target = min(wanted, ceiling)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:  # a seccomp filter, or a hard limit lowered meanwhile
        return FileBudget(wanted, before, before, ceiling, str(exc))
    return FileBudget(wanted, before, target, ceiling)
