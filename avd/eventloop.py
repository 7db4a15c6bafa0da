"""The event loop the daemons run on: uvloop by default, asyncio's own on request.

uvloop (libuv, Cython) wakes up and moves TLS records with less Python on the way than
asyncio's selector loop. Measured here with ``avd bench``'s latency and throughput phases,
on the same machine in the same hour: 20 fps latency p99 3.2-3.5 ms on asyncio against
2.7-2.8 ms on uvloop, and about 5 % more frames per second unthrottled. ``AVD_EVENT_LOOP``
switches back to asyncio's loop, should uvloop misbehave somewhere; the code is the same on
both (the test suite runs the daemons on uvloop and its in-process tests on asyncio).
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
