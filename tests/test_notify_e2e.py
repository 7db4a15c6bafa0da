"""The sd_notify protocol of the real daemons, against a listener standing in for systemd.

Each daemon runs as a subprocess (the conftest harness) with ``NOTIFY_SOCKET`` naming an
AF_UNIX datagram socket bound here and ``WATCHDOG_USEC`` set, as systemd sets them for a
``Type=notify`` unit with ``WatchdogSec=``. ``WATCHDOG_PID`` is left unset (valid: the
variable only narrows who the watchdog is meant for). The listener timestamps every
datagram on arrival and reads the sender's pid from ``SCM_CREDENTIALS``, as systemd does
to enforce ``NotifyAccess=main``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from avd.certs import CertPaths
from tests.conftest import (
    Credentials,
    Daemon,
    metric,
    receiver_env,
    sender_env,
    start_receiver,
    wait_until,
)

WATCHDOG_USEC = 2_000_000
# Pings are due every WATCHDOG_USEC/2; this much lateness is tolerated on a busy 2-core
# machine. Past WATCHDOG_USEC itself systemd would kill the daemon: never tolerated.
PING_SLACK_S = 0.8
_CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Notification:
    at: float  # time.monotonic() on arrival
    pid: int  # the sending process, from the kernel
    lines: tuple[str, ...]


class NotifyListener:
    """Collects every datagram sent to ``path`` on a thread, as systemd's manager would."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.received: list[Notification] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancillary, _, _ = self._sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
            note = Notification(time.monotonic(), pid, tuple(data.decode().split("\n")))
            with self._lock:
                self.received.append(note)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self._sock.close()

    def snapshot(self) -> list[Notification]:
        with self._lock:
            return list(self.received)

    def with_line(self, line: str) -> list[Notification]:
        return [n for n in self.snapshot() if line in n.lines]

    def statuses(self) -> list[str]:
        found = []
        for note in self.snapshot():
            found += [x.removeprefix("STATUS=") for x in note.lines if x.startswith("STATUS=")]
        return found

    def wait_for(self, line: str, timeout: float = 20.0) -> Notification:
        wait_until(lambda: self.with_line(line), timeout=timeout, interval=0.02)
        return self.with_line(line)[0]

    def wait_for_status(self, fragment: str, timeout: float = 20.0) -> str:
        wait_until(lambda: any(fragment in s for s in self.statuses()), timeout=timeout)
        return next(s for s in self.statuses() if fragment in s)

    def ping_times(self, since: float, until: float) -> list[float]:
        return [n.at for n in self.with_line("WATCHDOG=1") if since <= n.at <= until]


@pytest.fixture
def notify_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    # An outer service manager's values must not leak into the daemons under test.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def as_service(listener: NotifyListener) -> dict[str, str]:
    return {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def assert_pings_kept_up(listener: NotifyListener, since: float, until: float) -> None:
    """A ping at least every WATCHDOG_USEC/2 (plus slack) over [since, until]."""
    pings = listener.ping_times(since, until)
    due_s = WATCHDOG_USEC / 2 / 1e6
    assert len(pings) >= (until - since) / (due_s + PING_SLACK_S) - 1, pings
    gaps = [b - a for a, b in zip([since, *pings], [*pings, until], strict=True)]
    assert max(gaps) <= due_s + PING_SLACK_S, f"watchdog gaps {gaps}"


def assert_stops_cleanly(daemon: Daemon, listener: NotifyListener) -> None:
    assert daemon.stop(timeout=10) == 0  # SIGTERM, daemon.log_text()[-3000:]
    stopping = listener.with_line("STOPPING=1")
    assert len(stopping) == 1
    assert stopping[0].pid == daemon.proc.pid
    assert not [n for n in listener.snapshot() if n.at > stopping[0].at and "READY=1" in n.lines]


def test_receiver_ready_status_watchdog_stopping(
    pki: CertPaths,
    creds: Credentials,
    tmp_path: Path,
    notify_env: NotifyListener,
    daemons: list[Daemon],
) -> None:
    listener = notify_env
    env = receiver_env(pki, creds.tokens_file, **as_service(listener))
    receiver = start_receiver(env, tmp_path / "receiver.log")
    daemons.append(receiver.daemon)
    ready = listener.wait_for("READY=1")
    # READY=1 means "serving": a connection made right after it must be accepted.
    with socket.create_connection(("127.0.0.1", receiver.video_port), timeout=2):
        pass
    assert ready.pid == receiver.daemon.proc.pid  # NotifyAccess=main would accept it
    assert listener.wait_for_status("listening") == "listening, no senders connected"

    sender = Daemon(
        "sender",
        sender_env(pki, receiver, "cam1", creds.tokens["cam1"]),
        tmp_path / "sender.log",
    )
    daemons.append(sender)
    assert listener.wait_for_status("sender(s)") == "1 sender(s): cam1"
    wait_until(lambda: metric(receiver.metrics(), "avd_frames_received_total") > 20)

    assert_pings_kept_up(listener, ready.at, time.monotonic())
    assert sender.stop() == 0
    wait_until(lambda: listener.statuses()[-1] == "listening, no senders connected")
    assert_stops_cleanly(receiver.daemon, listener)
    assert len(listener.with_line("READY=1")) == 1
    # Every notification came from the main process, never from a child.
    assert {n.pid for n in listener.snapshot()} == {receiver.daemon.proc.pid}


def test_sender_ready_status_watchdog_through_an_outage(
    pki: CertPaths,
    creds: Credentials,
    tmp_path: Path,
    notify_env: NotifyListener,
    daemons: list[Daemon],
) -> None:
    listener = notify_env
    receiver = start_receiver(receiver_env(pki, creds.tokens_file), tmp_path / "receiver.log")
    daemons.append(receiver.daemon)
    env = sender_env(pki, receiver, "cam1", creds.tokens["cam1"], **as_service(listener))
    sender = Daemon("sender", env, tmp_path / "sender.log")
    daemons.append(sender)
    ready = listener.wait_for("READY=1")
    assert ready.pid == sender.proc.pid
    streaming = listener.wait_for_status(" fps")
    ports = f"{receiver.video_port}/{receiver.audio_port}"
    assert streaming.startswith(f"streaming video+audio to 127.0.0.1:{ports}, "), streaming
    fps = float(streaming.rsplit(", ", 1)[1].removesuffix(" fps"))
    assert 5 <= fps <= 40  # the test source runs at 20 fps

    # The receiver goes away: the status says so, and the watchdog must not care.
    assert receiver.daemon.stop() == 0
    outage_began = time.monotonic()
    waiting = listener.wait_for_status("waiting for receiver")
    assert "streaming" not in waiting
    time.sleep(WATCHDOG_USEC / 1e6 * 2)
    assert_pings_kept_up(listener, outage_began, time.monotonic())

    assert_stops_cleanly(sender, listener)
    assert len(listener.with_line("READY=1")) == 1
    assert_pings_kept_up(listener, ready.at, listener.with_line("STOPPING=1")[0].at)
    assert {n.pid for n in listener.snapshot()} == {sender.proc.pid}
