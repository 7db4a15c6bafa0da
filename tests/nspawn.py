"""Boot a real systemd as PID 1 in a throw-away container, run commands in it, tear it down.

``systemd-nspawn -D / --volatile=yes`` boots the host's own /usr on an empty tmpfs root in
about a second; everything written inside vanishes at power-off. Commands enter it with
``nsenter -a`` (all namespaces of its init) under a clean environment and a timeout.

The nspawn process is first moved into a cgroup of its own, in each hierarchy this machine
mounts, because ``--keep-unit`` makes nspawn build its ``payload``/``supervisor`` cgroups
under the caller's and leave them behind, empty, when it exits: in our own cgroup two runs
cannot collide, and the cleanup removes exactly what this run made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POWEROFF_TIMEOUT_S = 30.0
PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")


def unavailable_reason() -> str | None:
    """Why a container cannot be booted here, or None when it can."""
    if os.geteuid() != 0:
        return "booting systemd in a container needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container util-linux)"
    if not _cgroup_roots():
        return "no cgroup hierarchy is mounted under /sys/fs/cgroup"
    return None


@dataclass(frozen=True)
class Bind:
    """A host path made visible inside the container (read-only unless said otherwise)."""

    source: Path
    target: str = ""  # the same path inside when empty
    writable: bool = False

    def option(self) -> str:
        flag = "--bind" if self.writable else "--bind-ro"
        return f"{flag}={self.source}:{self.target or self.source}"


class Container:
    """A booted container; ``run`` executes a command inside as root."""

    def __init__(self, init_pid: int, console_log: Path) -> None:
        self.init_pid = init_pid
        self.console_log = console_log

    def host_path(self, inside: str) -> Path:
        """The host's view of a path inside (through /proc): for reading and writing files."""
        return Path(f"/proc/{self.init_pid}/root") / inside.lstrip("/")

    def run(
        self,
        *argv: str,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        clean = {"PATH": CLEAN_PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        command = ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i"]
        command += [f"{name}={value}" for name, value in clean.items()]
        result = subprocess.run(
            [*command, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the container, {' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def systemctl(
        self, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, timeout=timeout, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        result = self.systemctl("show", unit, "-p", ",".join(properties), timeout=15)
        return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, str]]:
        """Entries as JSON objects; binary fields (rare) come as lists and are skipped."""
        result = self.run("journalctl", "--no-pager", "-o", "json", *args, timeout=30)
        entries = []
        for line in result.stdout.splitlines():
            entry = json.loads(line)
            entries.append({k: v for k, v in entry.items() if isinstance(v, str)})
        return entries

    def console(self) -> str:
        return self.console_log.read_text(errors="replace")


def _cgroup_roots() -> list[Path]:
    roots = [root for root in CGROUP_ROOTS if (root / "cgroup.procs").exists()]
    plain = Path("/sys/fs/cgroup")
    return roots or ([plain] if (plain / "cgroup.procs").exists() else [])


def _wait_for_init(nspawn: subprocess.Popen[bytes], console_log: Path, timeout: float) -> int:
    """The container's init: nspawn's child once it runs systemd.

    Before that nspawn's first child is a helper that prepares the mounts: entering its
    namespaces would show the host's /run, where systemd is "offline".
    """
    children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            break
        with contextlib.suppress(OSError, ValueError):
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        time.sleep(0.05)
    tail = console_log.read_text(errors="replace")[-3000:]
    raise AssertionError(
        f"systemd-nspawn did not start a container (exit {nspawn.poll()}):\n{tail}"
    )


def _wait_until_booted(container: Container, timeout: float) -> None:
    """``is-system-running --wait``, retried until systemd's private socket exists."""
    deadline = time.monotonic() + timeout
    answer = ""
    while time.monotonic() < deadline:
        state = container.run(
            "systemctl", "is-system-running", "--wait", timeout=timeout, check=False
        )
        answer = (state.stdout + state.stderr).strip()
        if state.stdout.strip() in ("running", "degraded"):
            return
        time.sleep(0.1)
    raise AssertionError(f"the container did not boot within {timeout} s: {answer}")


def _power_off(nspawn: subprocess.Popen[bytes], init_pid: int | None) -> None:
    """SIGTERM asks nspawn for a clean shutdown; if that hangs, kill init and so everything."""
    if nspawn.poll() is None:
        nspawn.terminate()
        try:
            nspawn.wait(POWEROFF_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            pass
    if init_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init_pid, signal.SIGKILL)  # a PID namespace dies with its init
    if nspawn.poll() is None:
        nspawn.kill()
    nspawn.wait(10)


def _remove_cgroups(paths: Sequence[Path]) -> None:
    """Deepest first; the kernel may take a moment to let go of the last processes."""
    for root in paths:
        deadline = time.monotonic() + 10
        while root.exists() and time.monotonic() < deadline:
            for folder in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if folder.is_dir():
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()
            if root.exists():
                time.sleep(0.2)


@contextlib.contextmanager
def booted(
    binds: Sequence[Bind], workdir: Path, *, boot_timeout: float = 60.0
) -> Iterator[Container]:
    """Boot a container with ``binds``; power it off and remove its cgroups afterwards.

    ``workdir`` (host side) receives the console log.
    """
    name = f"avd-e2e-{uuid.uuid4().hex[:12]}"
    cgroups = [root / name for root in _cgroup_roots()]
    console_log = workdir / f"{name}.console.log"
    # The shell joins our cgroups, then becomes nspawn: nothing runs outside them.
    join = " ".join(f'echo $$ > "{cg}/cgroup.procs" &&' for cg in cgroups)
    command = ["systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit"]
    command += [f"--machine={name}", "--console=read-only", "--quiet"]
    command += [bind.option() for bind in binds]
    command += ["--boot", "--", "systemd.firstboot=off"]
    init_pid: int | None = None
    try:
        for cg in cgroups:
            cg.mkdir()
        with console_log.open("wb") as console:
            nspawn = subprocess.Popen(
                ["sh", "-c", f'{join} exec "$@"', "sh", *command],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        try:
            init_pid = _wait_for_init(nspawn, console_log, boot_timeout)
            container = Container(init_pid, console_log)
            _wait_until_booted(container, boot_timeout)
            yield container
        finally:
            _power_off(nspawn, init_pid)
    finally:
        _remove_cgroups(cgroups)
        # nspawn removes this empty folder itself, unless it had to be killed.
        with contextlib.suppress(OSError):
            (PROPAGATE_DIR / name).rmdir()
