"""Spool: frames held until acknowledged, bounded by bytes and capture-time age."""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from avd.media.base import CapturedFrame
from avd.spool import Spool


def frame(ms: int, size: int = 10) -> CapturedFrame:
    return CapturedFrame(capture_us=ms * 1000, data=b"x" * size)


def test_holds_frames_in_order_until_acknowledged() -> None:
    spool = Spool(max_bytes=1000, max_age_us=10**9)
    for seq in range(5):
        spool.add(seq, frame(seq))
    assert spool.floor() == 0
    assert spool.ack(2) == 3
    assert spool.oldest_seq() == 3
    assert spool.floor() == 3
    assert len(spool) == 2
    assert spool.bytes == 20


def test_next_after_walks_unsent_frames_oldest_first() -> None:
    spool = Spool(max_bytes=1000, max_age_us=10**9)
    for seq in (4, 5, 7, 9):
        spool.add(seq, frame(seq))
    found = spool.next_after(-1)
    assert found is not None
    assert found[0] == 4
    assert [spool.next_after(s)[0] for s in (4, 5, 6, 7)] == [5, 7, 7, 9]  # type: ignore[index]
    assert spool.next_after(9) is None


def test_evicts_the_oldest_past_the_byte_cap_and_counts_them_lost() -> None:
    spool = Spool(max_bytes=35, max_age_us=10**9)
    evicted = [spool.add(seq, frame(seq)) for seq in range(5)]
    assert evicted == [0, 0, 0, 1, 1]
    assert spool.lost == 2
    assert spool.oldest_seq() == 2


def test_evicts_frames_older_than_the_window() -> None:
    spool = Spool(max_bytes=10**9, max_age_us=30_000_000)  # AVD_SPOOL_SECONDS=30
    spool.add(0, frame(0))
    spool.add(1, frame(29_000))
    assert spool.lost == 0
    spool.add(2, frame(31_000))  # frame 0 is now 31 s older than the newest
    assert spool.lost == 1
    assert spool.oldest_seq() == 1


def test_floor_of_an_empty_spool_is_past_everything_seen() -> None:
    spool = Spool(max_bytes=15, max_age_us=10**9)
    assert spool.floor() == 0
    spool.add(0, frame(0))
    spool.ack(0)
    assert spool.floor() == 1
    spool.add(1, frame(1, size=100))  # over the cap at once: evicted unsent
    assert len(spool) == 0
    assert spool.floor() == 2
    assert spool.lost == 1


def test_frames_already_acknowledged_are_not_kept_again() -> None:
    spool = Spool(max_bytes=1000, max_age_us=10**9)
    spool.ack(10)
    assert spool.add(7, frame(7)) == 0
    assert len(spool) == 0


def test_a_capture_thread_and_the_loop_may_use_it_at_once() -> None:
    spool = Spool(max_bytes=10**9, max_age_us=10**12)

    def capture() -> None:
        for seq in range(20_000):
            spool.add(seq, frame(seq, 1))

    thread = threading.Thread(target=capture)
    thread.start()
    acked = -1
    while thread.is_alive() or acked < 19_999:
        oldest = spool.oldest_seq()
        if oldest is not None:
            acked = oldest
            spool.ack(acked)
    thread.join()
    assert len(spool) == 0
    assert spool.bytes == 0


@given(st.lists(st.tuples(st.integers(1, 50), st.booleans()), max_size=200))
def test_bounds_always_hold_and_every_frame_is_held_acked_or_lost(
    ops: list[tuple[int, bool]],
) -> None:
    spool = Spool(max_bytes=300, max_age_us=5_000)
    acked_count = 0
    for seq, (size, ack_now) in enumerate(ops):
        spool.add(seq, CapturedFrame(capture_us=seq * 1000, data=b"x" * size))
        assert spool.bytes <= 300
        if ack_now:
            acked_count += spool.ack(seq - 2)
        oldest = spool.oldest_seq()
        if oldest is not None:
            assert seq * 1000 - oldest * 1000 <= 5_000
    assert len(spool) + acked_count + spool.lost == len(ops)
