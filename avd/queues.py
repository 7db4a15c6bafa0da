"""A bounded hand-off from a capture thread to the event loop that drops the oldest item.

Live video must never drift behind real time and capture must never block on the
network: when the consumer is slow or away, ``put`` evicts the oldest frame and counts it.
``put`` is called from any thread; ``get`` is awaited on the event loop that built the
queue, and is woken with ``call_soon_threadsafe`` only when it is waiting: a loop already
busy sending takes the next item without a wake-up (a self-pipe write and a GIL hand-off,
a tenth of the sender's time when it streams flat out).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    def __init__(self, capacity: int, loop: asyncio.AbstractEventLoop) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._loop = loop
        self._ready = asyncio.Event()
        self._waiting = False  # the consumer is (about to be) asleep in get(): wake it
        self.dropped = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> int:
        """Add ``item``; returns how many old items were dropped to make room (0 or 1)."""
        with self._lock:
            evicted = 0
            if len(self._items) >= self.capacity:
                self._items.popleft()
                evicted = 1
                self.dropped += 1
            self._items.append(item)
            wake, self._waiting = self._waiting, False
        if wake:  # else the consumer is busy and takes it on its next get(): no wake-up
            self._wake()
        return evicted

    def close(self) -> None:
        """No more items will come: ``get`` returns None once the queue is empty."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        # A closed loop means the daemon is exiting and nobody is waiting.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._ready.set)

    def get_nowait(self) -> T | None:
        with self._lock:
            return self._items.popleft() if self._items else None

    def drain(self) -> list[T]:
        """Take everything queued (used to discard stale frames on reconnect)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            return items

    async def get(self) -> T | None:
        """The oldest item, waiting for one; None once closed and empty."""
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            if self.closed:
                return None
            self._ready.clear()
            with self._lock:
                if self._items or self.closed:
                    continue
                self._waiting = True
            await self._ready.wait()
