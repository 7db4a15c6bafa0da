"""SkewTracker: the video-minus-audio delay per sender."""

from __future__ import annotations

import pytest

from avd.media.base import StreamKind
from avd.skew import SkewTracker


def test_no_skew_until_both_streams_have_a_delay() -> None:
    tracker = SkewTracker()
    assert tracker.observe("cam1", StreamKind.VIDEO, 0.040) is None
    assert tracker.observe("cam1", StreamKind.AUDIO, 0.010) == pytest.approx(0.030)


def test_skew_converges_to_the_steady_difference_and_shrugs_off_one_late_frame() -> None:
    tracker = SkewTracker()
    for _ in range(100):
        tracker.observe("cam1", StreamKind.VIDEO, 0.050)
        tracker.observe("cam1", StreamKind.AUDIO, 0.020)
    assert tracker.skew("cam1") == pytest.approx(0.030, abs=1e-6)
    after_spike = tracker.observe("cam1", StreamKind.VIDEO, 1.0)
    assert after_spike is not None
    assert after_spike < 0.2  # one frame a second late moves it by a tenth


def test_senders_are_independent_and_an_ended_stream_is_forgotten() -> None:
    tracker = SkewTracker()
    tracker.observe("cam1", StreamKind.VIDEO, 0.05)
    tracker.observe("cam1", StreamKind.AUDIO, 0.01)
    tracker.observe("cam2", StreamKind.VIDEO, 0.01)
    assert tracker.skew("cam2") is None
    tracker.forget("cam1", StreamKind.AUDIO)
    assert tracker.skew("cam1") is None
