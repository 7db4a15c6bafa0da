"""``Overflow``: the frames a full recorder queue drops, their count, report and log lines."""

from __future__ import annotations

import logging

import pytest

from avd.logs import LogEvent
from avd.media.base import StreamKind
from avd.media.done import LEFT_OUT_QUIET_S, Overflow

LOGGER = "test.overflow"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture
def overflow(clock: _Clock) -> Overflow:
    return Overflow(
        "the queue is full (8 MiB)", "look at X", logging.getLogger(LOGGER), clock=clock
    )


def _drop(overflow: Overflow, sender_id: str) -> None:
    """The sender's next frame, dropped: its seqs count up from 0."""
    overflow.add(sender_id, StreamKind.VIDEO, overflow.dropped.get(sender_id, 0))


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    records = [r for r in caplog.records if r.name == LOGGER]
    for record in records:  # each line carries its journal MESSAGE_ID
        starts = record.getMessage().startswith("recorder: the queue is full")
        event = LogEvent.FRAMES_LEFT_OUT if starts else LogEvent.FRAMES_LEFT_OUT_OVER
        assert getattr(record, "avd_event", None) is event
    return [r.getMessage() for r in records]


def test_an_incident_is_two_lines_however_many_frames(
    overflow: Overflow, clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    for n in range(500):  # hovering at the limit: a frame in, a frame out, for 5 s
        clock.now += 0.01
        if n % 2:
            _drop(overflow, "kitchen" if n % 3 else "garage")
        else:
            overflow.admitted()
    assert _lines(caplog) == [
        "recorder: the queue is full (8 MiB): frames are left out of the recordings until it "
        "catches up (the first from kitchen); look at X"
    ]
    clock.now += LEFT_OUT_QUIET_S - 0.001
    overflow.admitted()
    assert len(_lines(caplog)) == 1, "not over until a whole quiet interval has passed"
    clock.now += 0.002
    overflow.admitted()
    assert _lines(caplog)[1] == (
        "recorder: caught up; frames left out of the recordings: 250 over 5.0 s "
        "(kitchen 167, garage 83)"
    )
    overflow.admitted()
    overflow.finish()
    assert len(_lines(caplog)) == 2, "said once"


def test_the_next_incident_starts_afresh(
    overflow: Overflow, clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    _drop(overflow, "a")
    clock.now += 60
    overflow.admitted()
    _drop(overflow, "b")
    overflow.finish()
    assert _lines(caplog)[1:] == [
        "recorder: caught up; frames left out of the recordings: 1 over 0.0 s (a 1)",
        "recorder: the queue is full (8 MiB): frames are left out of the recordings until it "
        "catches up (the first from b); look at X",
        "recorder: caught up; frames left out of the recordings: 1 over 0.0 s (b 1)",
    ]


def test_the_summary_names_the_five_hardest_hit_then_counts_the_rest(
    overflow: Overflow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    for n in range(1, 9):
        for _ in range(n):
            _drop(overflow, f"cam{n}")
    overflow.finish()
    assert _lines(caplog)[-1].endswith(
        "frames left out of the recordings: 36 over 0.0 s "
        "(cam8 8, cam7 7, cam6 6, cam5 5, cam4 4 and 3 more senders)"
    )


def test_nothing_is_said_while_nothing_is_left_out(
    overflow: Overflow, clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    for _ in range(100):
        clock.now += 1
        overflow.admitted()
    overflow.finish()
    assert _lines(caplog) == []


def test_dropped_frames_are_counted_and_each_reported_done_once(overflow: Overflow) -> None:
    for seq in (5, 6, 7, 9):  # two runs
        overflow.add("a", StreamKind.VIDEO, seq)
    overflow.add("a", StreamKind.AUDIO, 6)
    overflow.add("b", StreamKind.VIDEO, 1)
    assert sorted(overflow.take()) == sorted(
        [("a", StreamKind.VIDEO, s) for s in (5, 6, 7, 9)]
        + [("a", StreamKind.AUDIO, 6), ("b", StreamKind.VIDEO, 1)]
    )
    assert overflow.take() == []
    overflow.add("b", StreamKind.VIDEO, 2)
    assert overflow.take() == [("b", StreamKind.VIDEO, 2)]
    assert overflow.dropped == {"a": 5, "b": 2}, "the counts outlive the reports"
