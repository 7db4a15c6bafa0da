"""What both daemons share around their main coroutine: signals, sd_notify and watchdog.

Signal handlers only set an event (uvicorn's habit); the main coroutine decides what to do.
The watchdog is pinged from the event loop itself, so a wedged loop stops the pings and
systemd restarts the daemon, while a receiver outage (handled inside the sender) does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

from avd.systemd import Notifier


def install_signal_handlers(
    stop: asyncio.Event, on_reload: Callable[[], None] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)


async def keep_systemd_informed(
    notifier: Notifier, status: Callable[[], str], period_s: float = 2.0
) -> None:
    """Pings the watchdog at half of WatchdogSec and refreshes STATUS= while the loop runs."""
    interval = notifier.watchdog_interval_s()
    sleep_s = min(period_s, interval) if interval else period_s
    last_status = ""
    while True:
        if interval:
            notifier.watchdog()
        text = status()
        if text != last_status:
            notifier.status(text)
            last_status = text
        await asyncio.sleep(sleep_s)


async def cancel_quietly(*tasks: asyncio.Task[object] | asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
