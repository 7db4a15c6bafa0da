"""The event loop the daemons run on: uvloop by default, asyncio's own on request.

uvloop (libuv, Cython) wakes up and moves TLS records with less Python on the way than
asyncio's selector loop. Measured here in 4 paired runs of ``avd bench``'s unthrottled
stream: 1210 against 1118 frames/s on average (+4 % to +17 %), with less CPU per frame. At
20 fps its latency was the same as asyncio's within this shared machine's noise (p99 median
of 6 paired runs 3.3 against 3.1 ms). ``AVD_EVENT_LOOP=asyncio`` switches back to asyncio's
loop, should uvloop misbehave somewhere; the code is the same on both (the test suite runs
the daemons on uvloop, its in-process tests on asyncio, and ``avd.accept`` on both).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

EventLoopName = Literal["uvloop", "asyncio"]
T = TypeVar("T")


def loop_factory(name: EventLoopName) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What ``asyncio.Runner`` makes its loop with; None means asyncio's default."""
    if name == "asyncio":
        return None
    import uvloop  # noqa: PLC0415 - only the loop that is asked for is imported

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], loop: EventLoopName = "uvloop") -> T:
    """``asyncio.run(main)`` on the named event loop."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
