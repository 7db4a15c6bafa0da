"""QualityController and FrameDecimator: the dynamic-quality decisions, pure."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from avd.quality import FrameDecimator, LinkReport, QualityController, QualityState

CONGESTED = LinkReport(dropped=3, max_wait_s=0.0)
SLOW = LinkReport(dropped=0, max_wait_s=0.6)
HEALTHY = LinkReport(dropped=0, max_wait_s=0.01)


def controller() -> QualityController:
    return QualityController(
        quality=70, fps=20, min_quality=30, min_fps=5, settle_s=2, recover_s=10
    )


def test_congestion_lowers_quality_first_then_frame_rate_to_the_floors() -> None:
    c = controller()
    states = []
    for t in range(0, 40, 2):
        if (new := c.observe(CONGESTED, t)) is not None:
            states.append(new)
    assert [s.quality for s in states[:4]] == [60, 50, 40, 30]
    assert all(s.fps == 20 for s in states[:4])
    assert [s.fps for s in states[4:]] == [15, 10, 5]
    assert c.state == QualityState(30, 5)
    assert c.observe(CONGESTED, 100) is None  # at the floors


def test_a_slow_link_without_drops_counts_as_congested() -> None:
    c = controller()
    assert c.observe(SLOW, 0) == QualityState(60, 20)


def test_steps_down_wait_for_the_link_to_settle() -> None:
    c = controller()
    assert c.observe(CONGESTED, 0) is not None
    assert c.observe(CONGESTED, 1) is None
    assert c.observe(CONGESTED, 2) is not None


def test_recovery_restores_frame_rate_first_then_quality_one_step_per_period() -> None:
    c = controller()
    for t in range(0, 40, 2):
        c.observe(CONGESTED, t)
    assert c.state == QualityState(30, 5)
    restored = []
    for t in range(40, 400):
        if (new := c.observe(HEALTHY, t)) is not None:
            restored.append((t, new))
    steps = [s for _, s in restored]
    assert [s.fps for s in steps[:3]] == [10, 15, 20]
    assert [s.quality for s in steps[3:]] == [40, 50, 60, 70]
    times = [t for t, _ in restored]
    assert all(b - a >= 10 for a, b in itertools.pairwise(times))
    assert c.state == QualityState(70, 20)


def test_one_congested_report_restarts_the_recovery_clock() -> None:
    c = controller()
    c.observe(CONGESTED, 0)
    for t in range(1, 9):
        c.observe(HEALTHY, t)
    c.observe(SLOW, 9)  # settle_s passed: steps down again
    assert c.observe(HEALTHY, 15) is None
    assert c.state.quality == 50


@given(st.lists(st.booleans(), max_size=200))
def test_state_always_within_floor_and_best(congestion: list[bool]) -> None:
    c = controller()
    for t, congested in enumerate(congestion):
        c.observe(CONGESTED if congested else HEALTHY, float(t))
        assert 30 <= c.state.quality <= 70
        assert 5 <= c.state.fps <= 20


def test_decimator_halves_a_20_fps_source_to_10() -> None:
    d = FrameDecimator(20)
    d.fps = 10
    kept = [d.keep(i * 50_000) for i in range(40)]
    assert sum(kept) == 20
    assert kept[:4] == [True, False, True, False]


def test_decimator_keeps_everything_at_the_source_rate_despite_jitter() -> None:
    d = FrameDecimator(20)
    jitter = [0, 3_000, -4_000, 2_000, -1_000]
    kept = [d.keep(i * 50_000 + jitter[i % 5]) for i in range(100)]
    assert all(kept)


def test_decimator_keeps_a_catch_up_after_a_stall_at_the_full_rate() -> None:
    """A file source 70 ms late delivers its next frames back to back (its pacer catches up
    within 200 ms): at the full rate none is dropped. A 59-of-60 recording of a file under
    load came from this."""
    d = FrameDecimator(20)
    times = [0, 50_000, 120_000, 121_000, 150_000, 200_000, 250_000]
    assert all(d.keep(t) for t in times)


def test_decimator_reduces_again_after_a_return_to_the_full_rate() -> None:
    d = FrameDecimator(20)
    d.fps = 10
    assert [d.keep(i * 50_000) for i in range(4)] == [True, False, True, False]
    d.fps = 20
    assert all(d.keep(i * 50_000) for i in range(4, 8))
    d.fps = 10
    assert [d.keep(i * 50_000) for i in range(8, 12)] == [True, False, True, False]


def test_backfill_intervals_are_neutral() -> None:
    c = controller()
    busy = LinkReport(dropped=5, max_wait_s=1.0, backfilled=40)
    assert all(c.observe(busy, t) is None for t in range(0, 60, 2))
    assert c.state == QualityState(70, 20)
