"""LogThrottle: one line per kind and address per interval, with a count of the rest."""

from __future__ import annotations

from avd.logthrottle import MAX_KEYS, LogThrottle, suppressed_note


def test_first_is_logged_then_quiet_then_summed_up() -> None:
    throttle = LogThrottle(interval_s=60)
    assert throttle.admit("tls", "203.0.113.5", now=0) == 0
    assert throttle.admit("tls", "203.0.113.5", now=1) is None
    assert throttle.admit("tls", "203.0.113.5", now=2) is None
    assert throttle.admit("tls", "203.0.113.5", now=61) == 2
    assert suppressed_note(2) == " (2 more like it since the last report)"
    assert suppressed_note(0) == ""


def test_addresses_and_kinds_are_independent() -> None:
    throttle = LogThrottle()
    assert throttle.admit("tls", "a", now=0) == 0
    assert throttle.admit("tls", "b", now=0) == 0
    assert throttle.admit("limit", "a", now=0) == 0


def test_memory_is_bounded() -> None:
    throttle = LogThrottle()
    for i in range(MAX_KEYS * 2):
        throttle.admit("tls", f"10.0.{i // 256}.{i % 256}", now=0)
    assert len(throttle._last) == MAX_KEYS
