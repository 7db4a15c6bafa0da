"""AckWatermark: cumulative acknowledgement over frames that finish out of order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from avd.acks import MAX_PENDING, AckWatermark


def test_in_order_frames_advance_one_by_one() -> None:
    mark = AckWatermark(first_seq=10)
    assert mark.acked == 9
    assert mark.done(10)
    assert mark.done(11)
    assert mark.acked == 11


def test_a_gap_holds_the_watermark_until_it_fills() -> None:
    mark = AckWatermark(first_seq=0)
    for seq in (1, 2, 3):  # live frames overtook frame 0, which is being backfilled
        assert not mark.done(seq)
    assert mark.acked == -1
    assert mark.done(0)
    assert mark.acked == 3
    assert mark.pending == 0


def test_frames_below_the_watermark_or_repeated_change_nothing() -> None:
    mark = AckWatermark(first_seq=5)
    assert not mark.done(4)
    mark.done(5)
    assert not mark.done(5)
    assert mark.acked == 5


def test_the_senders_floor_passes_frames_it_evicted() -> None:
    mark = AckWatermark(first_seq=0)
    for seq in (3, 4, 6):
        mark.done(seq)
    assert mark.floor(3)  # frames 0..2 were evicted by the sender: nothing will come
    assert mark.acked == 4
    assert not mark.floor(2)
    assert mark.done(5)
    assert mark.acked == 6


def test_pending_frames_are_bounded() -> None:
    mark = AckWatermark(first_seq=0)
    for seq in range(1, MAX_PENDING + 3):
        mark.done(seq)
    assert mark.pending <= MAX_PENDING
    assert mark.acked > 0


@given(st.permutations(list(range(60))), st.integers(0, 60))
def test_any_completion_order_ends_with_everything_acknowledged(
    order: list[int], floor: int
) -> None:
    mark = AckWatermark(first_seq=0)
    mark.floor(floor)
    previous = mark.acked
    for seq in order:
        mark.done(seq)
        assert mark.acked >= previous  # never goes back
        previous = mark.acked
        # Never acknowledges a frame that is neither done nor below the floor.
        done_or_floored = set(order[: order.index(seq) + 1]) | set(range(floor))
        assert all(s in done_or_floored for s in range(mark.acked + 1))
    assert mark.acked == 59
    assert mark.pending == 0
