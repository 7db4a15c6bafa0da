"""sd_notify without a dependency: readiness, status, stopping and watchdog pings to systemd.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (an ``@`` prefix means the abstract namespace). Outside systemd the
variable is unset and every call is a cheap no-op, so daemons call these unconditionally.

A failed send never raises: losing a status line must not take a daemon down (a missed
watchdog ping is caught by systemd itself). Nothing is removed from the environment, unlike
``sd_notify(unset_environment=1)``: child processes are not ours to notify from, and
``NotifyAccess=main`` already makes systemd ignore them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

_log = logging.getLogger(__name__)
# systemd reads the socket at once; a full queue for this long means it is wedged.
_SEND_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Notifier:
    """Talks to the service manager; ``address`` is None when not started by systemd."""

    address: str | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        return cls(address=_socket_address(env), watchdog_usec=_watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval_s(self) -> float | None:
        """How often to call ``watchdog()``: half the timeout, as sd_watchdog_enabled(3) advises."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status_lines(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status_lines(text))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """Announce a reload; call ``ready()`` when the new configuration is in force.

        MONOTONIC_USEC is required by systemd >= 253 with Type=notify-reload; 252 ignores it.
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def notify(self, *lines: str) -> bool:
        """Send the lines as one datagram; False (logged at debug) when not sent."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.sendto(payload, self.address)
        except OSError as error:
            _log.debug("sd_notify to %s failed: %s", self.address.lstrip("\0"), error)
            return False
        return True


def _socket_address(env: Mapping[str, str]) -> str | None:
    value = env.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    # Unset, empty or a scheme this systemd (252) does not use (vsock: came in 253).
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID absent or ours)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec)


def _status_lines(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # A newline would end STATUS= and start another assignment: keep it one line.
    return ("STATUS=" + " ".join(text.splitlines()),)
