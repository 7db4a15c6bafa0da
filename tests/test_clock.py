"""avd.clock: the monotonic µs clock and ClockSync's estimate from synthetic exchanges.

Each exchange is built from a known truth: the peer's clock is ``offset`` behind ours, our
heartbeat takes ``d_out`` to reach the peer, the peer holds it ``held`` before its own
heartbeat echoes it, and that reply takes ``d_back`` to come back.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from avd.clock import ClockSync, SyncSample, monotonic_us


def exchange(sync: ClockSync, *, t0: int, offset: int, d_out: int, held: int, d_back: int) -> None:
    """Feeds ``sync`` one heartbeat exchange started at local time ``t0``."""
    peer_sent_local = t0 + d_out + held  # when the peer replied, on our clock
    sync.add(
        local_now_us=peer_sent_local + d_back,
        peer_sent_us=peer_sent_local - offset,  # peer_clock + offset = local_clock
        echoed_us=t0,
        held_us=held,
    )


def test_symmetric_delays_give_the_exact_offset_and_rtt() -> None:
    for offset in (0, 123_456_789, -987_654):
        sync = ClockSync()
        exchange(sync, t0=5_000_000, offset=offset, d_out=700, held=20_000, d_back=700)
        assert sync.ready
        assert sync.offset_us == offset
        assert sync.rtt_us == 1400  # the peer's holding time is not part of the round trip
        assert sync.to_local(1_000) == 1_000 + offset


def test_asymmetric_delays_bias_the_offset_by_half_the_difference() -> None:
    sync = ClockSync()
    exchange(sync, t0=10_000, offset=50_000, d_out=100, held=0, d_back=900)
    assert sync.rtt_us == 1000
    assert sync.offset_us == 50_000 + (900 - 100) // 2


def test_the_smallest_round_trip_wins_whatever_its_position() -> None:
    offset = 3_000_000
    queued = [(5_000, 200), (300, 9_000), (40_000, 100), (2_000, 2_500)]  # (out, back)
    for position in range(len(queued) + 1):
        sync = ClockSync(window=16)
        delays = [*queued[:position], (150, 150), *queued[position:]]
        for i, (d_out, d_back) in enumerate(delays):
            exchange(
                sync, t0=1_000_000 * (i + 1), offset=offset, d_out=d_out, held=500, d_back=d_back
            )
        assert sync.best() == SyncSample(rtt_us=300, offset_us=offset)


def test_samples_without_an_echo_are_ignored() -> None:
    sync = ClockSync()
    sync.add(local_now_us=9_000, peer_sent_us=4_000, echoed_us=0, held_us=0)
    assert not sync.ready
    assert sync.best() is None
    assert sync.offset_us is None
    assert sync.rtt_us is None
    assert sync.to_local(1) is None

    exchange(sync, t0=1_000, offset=10, d_out=50, held=5, d_back=50)
    sync.add(local_now_us=9_000, peer_sent_us=9_000, echoed_us=0, held_us=0)  # would be rtt 0
    assert sync.best() == SyncSample(rtt_us=100, offset_us=10)


def test_a_negative_round_trip_is_ignored() -> None:
    sync = ClockSync()
    # Held longer than the whole exchange took: a broken or lying peer.
    sync.add(local_now_us=2_000, peer_sent_us=1_500, echoed_us=1_000, held_us=5_000)
    assert not sync.ready


def test_old_samples_leave_the_window() -> None:
    sync = ClockSync(window=4)
    exchange(sync, t0=1_000, offset=7, d_out=10, held=0, d_back=10)  # the best, but old
    for i in range(3):
        exchange(sync, t0=100_000 * (i + 1), offset=7, d_out=500, held=0, d_back=500)
    assert sync.rtt_us == 20
    exchange(sync, t0=900_000, offset=8, d_out=400, held=0, d_back=400)  # pushes it out
    assert sync.best() == SyncSample(rtt_us=800, offset_us=8)


@given(
    offset=st.integers(-(2**40), 2**40),
    exchanges=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6)),
        min_size=1,
        max_size=20,
    ),
)
def test_the_estimate_is_never_off_by_more_than_half_the_best_round_trip(
    offset: int, exchanges: list[tuple[int, int, int]]
) -> None:
    sync = ClockSync(window=32)
    t0 = 10**9
    for d_out, held, d_back in exchanges:
        exchange(sync, t0=t0, offset=offset, d_out=d_out, held=held, d_back=d_back)
        t0 += d_out + held + d_back + 1
    best = sync.best()
    assert best is not None
    assert best.rtt_us == min(d_out + d_back for d_out, _, d_back in exchanges)
    # NTP's bound: the true offset lies within half the round trip of the estimate.
    assert abs(best.offset_us - offset) <= best.rtt_us // 2 + 1


def test_monotonic_us_is_an_increasing_integer() -> None:
    readings = [monotonic_us() for _ in range(1000)]
    assert all(isinstance(reading, int) for reading in readings)
    assert readings == sorted(readings)
    assert readings[0] > 0


@given(
    window=st.integers(1, 5),
    exchanges=st.lists(
        st.tuples(st.integers(-50, 10**4), st.integers(-5, 10**4), st.integers(0, 10**4)),
        max_size=30,
    ),
)
def test_the_best_sample_is_the_smallest_round_trip_of_the_window_after_every_add(
    window: int, exchanges: list[tuple[int, int, int]]
) -> None:
    """The best sample is kept as samples come (it is read for every frame): the same as
    picking it afresh from the window's valid samples, after each one."""
    sync, kept, t0 = ClockSync(window=window), [], 10**9
    for d_out, offset, d_back in exchanges:  # a negative d_out makes an invalid round trip
        exchange(sync, t0=t0, offset=offset, d_out=d_out, held=0, d_back=d_back)
        t0 += 10**5
        if d_out + d_back >= 0:
            kept.append(d_out + d_back)
        best = sync.best()
        if not kept:
            assert best is None
            assert sync.to_local(123) is None
            continue
        assert best is not None
        assert best.rtt_us == min(kept[-window:])
        assert sync.to_local(1_000) == 1_000 + best.offset_us
