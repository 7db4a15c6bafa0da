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


def test_only_a_waiting_consumer_is_woken() -> None:
    """A consumer busy elsewhere takes the next item on its own: no self-pipe wake-up."""

    async def scenario() -> list[int]:
        wakes: list[int] = []

        class Counting(DropOldestQueue[int]):
            def _wake(self) -> None:
                wakes.append(len(self))
                super()._wake()

        queue = Counting(10, asyncio.get_running_loop())
        for i in range(3):
            queue.put(i)  # nobody waits yet
        assert wakes == []
        assert [await queue.get() for _ in range(3)] == [0, 1, 2]
        waiting = asyncio.create_task(queue.get())
        await asyncio.sleep(0)  # now it waits
        queue.put(3)
        queue.put(4)  # woken already: one wake-up for both
        assert await asyncio.wait_for(waiting, 5) == 3
        assert await queue.get() == 4
        return wakes

    assert asyncio.run(scenario()) == [1]


def test_no_wake_up_is_lost_between_a_thread_and_the_loop() -> None:
    """One item at a time, the producer waiting for each to be taken: a put that raced the
    consumer going to sleep and skipped the wake-up would hang here."""
    rounds = 2000

    async def scenario() -> int:
        queue: DropOldestQueue[int] = DropOldestQueue(1, asyncio.get_running_loop())
        taken = threading.Semaphore(0)

        def produce() -> None:
            for i in range(rounds):
                queue.put(i)
                taken.acquire()
            queue.close()

        threading.Thread(target=produce, daemon=True).start()
        count = 0
        while (item := await asyncio.wait_for(queue.get(), 5)) is not None:
            assert item == count
            count += 1
            taken.release()
        return count

    assert asyncio.run(scenario()) == rounds
