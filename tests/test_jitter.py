"""avd.media.jitter: reordering, gaps, late and duplicate chunks, the bound, and start-up.

Unit tests pin each rule on a small script of puts and pulls; hypothesis then drives the
buffer with any interleaving of arrivals (reordered, duplicated, dropped, far ahead) and
pulls, and checks the invariants against an independent account kept by the test.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avd.media.jitter import Arrival, JitterBuffer

CHUNK_US = 20_000  # 20 ms chunks: target 60 ms = 3 chunks, max 200 ms = 10 chunks
SILENCE = b"\x00\x00"


def chunk(seq: int) -> bytes:
    return seq.to_bytes(4, "big", signed=True)  # never equal to SILENCE


def buffer(target_ms: int = 60, max_ms: int = 200) -> JitterBuffer:
    return JitterBuffer(CHUNK_US, target_ms, max_ms, silence=SILENCE)


def pull(jb: JitterBuffer, n: int) -> list[bytes | None]:
    return [jb.next_chunk() for _ in range(n)]


def test_sizes_in_chunks_round_the_target_up_and_the_limit_down() -> None:
    jb = JitterBuffer(23_219, 60, 500, silence=SILENCE)  # 1024 frames at 44.1 kHz
    assert (jb.target_chunks, jb.max_chunks) == (3, 21)
    assert JitterBuffer(23_219, 0, 0, silence=SILENCE).target_chunks == 1


@pytest.mark.parametrize(("chunk_us", "target", "limit"), [(0, 60, 500), (20_000, 100, 50)])
def test_rejects_nonsense_sizes(chunk_us: int, target: int, limit: int) -> None:
    with pytest.raises(ValueError):
        JitterBuffer(chunk_us, target, limit, silence=SILENCE)


def test_buffers_until_the_target_is_held_then_plays_in_order() -> None:
    jb = buffer()
    assert jb.put(10, chunk(10)) is Arrival.QUEUED
    assert jb.put(11, chunk(11)) is Arrival.QUEUED
    assert pull(jb, 3) == [None, None, None]  # 40 ms held, 60 wanted
    jb.put(12, chunk(12))
    assert pull(jb, 3) == [chunk(10), chunk(11), chunk(12)]
    assert jb.stats.played == 3


def test_out_of_order_arrivals_before_the_start_are_kept() -> None:
    jb = buffer()
    for seq in (7, 5, 6):
        jb.put(seq, chunk(seq))
    assert pull(jb, 3) == [chunk(5), chunk(6), chunk(7)]


def test_a_missing_chunk_becomes_silence_and_its_late_arrival_is_dropped() -> None:
    jb = buffer()
    for seq in (0, 2, 3):
        jb.put(seq, chunk(seq))  # span 0..3 reaches the target although 1 is missing
    assert pull(jb, 2) == [chunk(0), SILENCE]
    assert jb.stats.gaps == 1
    assert jb.put(1, chunk(1)) is Arrival.LATE
    assert pull(jb, 2) == [chunk(2), chunk(3)]
    assert (jb.stats.late, jb.stats.played) == (1, 3)


def test_duplicates_are_dropped_whether_held_or_already_played() -> None:
    jb = buffer()
    for seq in (0, 1, 2):
        jb.put(seq, chunk(seq))
    assert jb.put(2, b"other") is Arrival.DUPLICATE
    assert pull(jb, 1) == [chunk(0)]
    assert jb.put(0, chunk(0)) is Arrival.LATE  # its slot is gone: late, not played twice
    assert pull(jb, 2) == [chunk(1), chunk(2)]
    assert (jb.stats.duplicates, jb.stats.late) == (1, 1)


def test_running_dry_goes_back_to_buffering_without_skipping_slots() -> None:
    jb = buffer()
    for seq in (0, 1, 2):
        jb.put(seq, chunk(seq))
    assert pull(jb, 3) == [chunk(0), chunk(1), chunk(2)]
    assert pull(jb, 2) == [None, None]
    assert jb.stats.underruns == 1
    assert jb.stats.gaps == 0
    # The next chunk in sequence is not late: the timeline waited for it.
    assert jb.put(3, chunk(3)) is Arrival.QUEUED
    assert jb.put(4, chunk(4)) is Arrival.QUEUED
    assert pull(jb, 1) == [None]  # buffering again: 40 of 60 ms
    jb.put(5, chunk(5))
    assert pull(jb, 3) == [chunk(3), chunk(4), chunk(5)]


def test_over_the_limit_the_oldest_are_dropped_back_to_the_target() -> None:
    jb = buffer()  # max 10 chunks
    for seq in range(10):
        jb.put(seq, chunk(seq))
    assert jb.held == 10
    assert jb.stats.overflow == 0
    jb.put(10, chunk(10))  # span 11 > 10: keep the newest 3
    assert jb.held == 3
    assert jb.stats.overflow == 8
    assert jb.put(7, chunk(7)) is Arrival.LATE
    assert pull(jb, 3) == [chunk(8), chunk(9), chunk(10)]


def test_a_jump_far_ahead_drops_what_came_before_it() -> None:
    jb = buffer()
    for seq in (0, 1, 2):
        jb.put(seq, chunk(seq))
    jb.put(1_000_000, chunk(1_000_000))
    assert jb.held == 1
    assert jb.stats.overflow == 3
    # The slots before the jump inside the target are gaps; then the chunk plays.
    assert pull(jb, 3) == [SILENCE, SILENCE, chunk(1_000_000)]


def test_finish_plays_out_what_is_held_even_under_the_target() -> None:
    jb = buffer()
    jb.put(0, chunk(0))
    assert pull(jb, 1) == [None]
    jb.finish()
    drained_before = jb.drained
    assert pull(jb, 2) == [chunk(0), None]
    assert (drained_before, jb.drained) == (False, True)
    assert jb.stats.underruns == 0  # the end of a stream is not an underrun


# --- properties -------------------------------------------------------------------------


@dataclass(frozen=True)
class Put:
    seq: int


@dataclass(frozen=True)
class Pull:
    pass


ops = st.lists(
    st.one_of(st.builds(Put, st.integers(0, 40)), st.just(Pull())),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, target_ms=st.integers(0, 100), extra_ms=st.integers(0, 200))
def test_any_arrival_order_plays_in_order_with_every_chunk_accounted_for(
    ops: list[Put | Pull], target_ms: int, extra_ms: int
) -> None:
    jb = buffer(target_ms, target_ms + extra_ms)
    played: list[int] = []
    outputs = puts = 0
    for op in ops:
        if isinstance(op, Put):
            puts += 1
            jb.put(op.seq, chunk(op.seq))
        else:
            out = jb.next_chunk()
            if out is not None:
                outputs += 1
                if out != SILENCE:
                    played.append(int.from_bytes(out, "big", signed=True))
        assert jb.held <= jb.max_chunks  # memory stays bounded after every step
    s = jb.stats
    assert played == sorted(set(played))  # strictly increasing: in order, never twice
    assert outputs == s.played + s.gaps
    assert s.played == len(played)
    # Every put is queued, late or a duplicate; every queued chunk is played, dropped for
    # overflow, or still held.
    queued = puts - s.late - s.duplicates
    assert queued == s.played + s.overflow + jb.held


@settings(max_examples=200, deadline=None)
@given(
    order=st.permutations(list(range(8))),
    target_ms=st.integers(0, 160),
)
def test_a_reordered_burst_within_the_limit_plays_whole(order: list[int], target_ms: int) -> None:
    jb = buffer(target_ms, 200)
    for seq in order:
        jb.put(seq, chunk(seq))
    jb.finish()
    out = [jb.next_chunk() for _ in range(9)]
    assert out == [chunk(seq) for seq in range(8)] + [None]
    assert (jb.stats.gaps, jb.stats.late, jb.stats.overflow) == (0, 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    lost=st.sets(st.integers(1, 18)),
    delay=st.integers(0, 2),
)
def test_a_live_stream_with_losses_plays_every_chunk_that_came(lost: set[int], delay: int) -> None:
    """Chunk n arrives at period n + delay unless lost; one pull per period; then the end.

    Losses cost gaps or a return to buffering, never a late chunk (nothing arrives after
    its slot), and every chunk that arrived is played, in order.
    """
    jb = buffer(40, 500)  # target 2 chunks; the limit (25) is never reached
    outputs: list[bytes | None] = []
    for period in range(20 + delay):
        seq = period - delay
        if 0 <= seq < 20 and seq not in lost:
            jb.put(seq, chunk(seq))
        outputs.append(jb.next_chunk())
    jb.finish()
    while not jb.drained:
        outputs.append(jb.next_chunk())
    played = [int.from_bytes(o, "big", signed=True) for o in outputs if o not in (None, SILENCE)]
    assert played == [seq for seq in range(20) if seq not in lost]
    assert jb.stats.late == 0
    assert jb.stats.gaps <= len(lost)
