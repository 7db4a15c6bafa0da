"""DropOldestQueue: bounded, drops the oldest, never blocks the producer thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from avd.queues import DropOldestQueue


def test_drops_the_oldest_and_counts() -> None:
    async def scenario() -> None:
        queue: DropOldestQueue[int] = DropOldestQueue(3, asyncio.get_running_loop())
        evicted = [queue.put(i) for i in range(5)]
        assert evicted == [0, 0, 0, 1, 1]
        assert queue.dropped == 2
        assert [await queue.get() for _ in range(3)] == [2, 3, 4]

    asyncio.run(scenario())


def test_get_waits_for_a_producer_thread_and_ends_when_closed() -> None:
    async def scenario() -> list[int | None]:
        queue: DropOldestQueue[int] = DropOldestQueue(1000, asyncio.get_running_loop())

        def produce() -> None:
            for i in range(100):
                queue.put(i)
            queue.close()

        threading.Thread(target=produce).start()
        got: list[int | None] = []
        while (item := await asyncio.wait_for(queue.get(), 5)) is not None:
            got.append(item)
        return got

    assert asyncio.run(scenario()) == list(range(100))


def test_a_put_after_the_loop_closed_is_harmless() -> None:
    loop = asyncio.new_event_loop()
    queue: DropOldestQueue[int] = DropOldestQueue(2, loop)
    loop.close()
    queue.put(1)
    assert len(queue) == 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        DropOldestQueue(0, asyncio.new_event_loop())
