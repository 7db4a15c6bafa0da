"""AuthLockout: examples, then properties checked by hypothesis against a plain model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avd.ratelimit import AuthLockout, source_key

# ---- examples -------------------------------------------------------------------------


def test_the_fifth_failure_in_the_window_locks_and_says_so_once() -> None:
    lockout = AuthLockout(max_failures=5, window_s=60, lockout_s=600)
    results = [lockout.record_failure("192.0.2.7", now=float(t)) for t in range(5)]
    assert results == [False, False, False, False, True]
    assert lockout.is_locked("192.0.2.7", now=5)
    # Attempts during the lockout neither announce it again nor extend it.
    assert not lockout.record_failure("192.0.2.7", now=300)
    assert lockout.is_locked("192.0.2.7", now=4 + 600 - 0.001)
    assert not lockout.is_locked("192.0.2.7", now=4 + 600)
    assert lockout.locked_count(now=10) == 1
    assert lockout.locked_count(now=604) == 0


def test_failures_spread_wider_than_the_window_never_lock() -> None:
    lockout = AuthLockout(max_failures=3, window_s=10, lockout_s=100)
    for t in range(0, 1000, 5):  # two failures in any 10 s window
        assert not lockout.record_failure("198.51.100.1", now=float(t))
        assert not lockout.is_locked("198.51.100.1", now=float(t))


def test_after_a_lockout_the_source_starts_again_from_zero() -> None:
    lockout = AuthLockout(max_failures=2, window_s=60, lockout_s=10)
    lockout.record_failure("192.0.2.1", 0)
    assert lockout.record_failure("192.0.2.1", 1)
    assert not lockout.record_failure("192.0.2.1", 11)  # the lockout ended at 11: one failure
    assert not lockout.is_locked("192.0.2.1", 11)
    assert lockout.record_failure("192.0.2.1", 12)


def test_success_forgets_failures_but_not_a_lockout_in_force() -> None:
    lockout = AuthLockout(max_failures=3, window_s=60, lockout_s=60)
    lockout.record_failure("192.0.2.1", 0)
    lockout.record_failure("192.0.2.1", 1)
    lockout.record_success("192.0.2.1", 2)
    assert not lockout.record_failure("192.0.2.1", 3)
    assert not lockout.record_failure("192.0.2.1", 4)
    assert lockout.record_failure("192.0.2.1", 5)
    lockout.record_success("192.0.2.1", 6)
    assert lockout.is_locked("192.0.2.1", 7)


def test_an_ipv6_slash_64_is_one_source() -> None:
    lockout = AuthLockout(max_failures=2, window_s=60, lockout_s=60)
    lockout.record_failure("2001:db8:1:2::1", 0)
    assert lockout.record_failure("2001:db8:1:2:ffff:ffff:ffff:ffff", 1)
    assert lockout.is_locked("2001:db8:1:2::abcd", 2)
    assert not lockout.is_locked("2001:db8:1:3::1", 2)  # the neighbouring /64
    assert len(lockout) == 1


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::/64"),
        ("2001:db8::1", "2001:db8::/64"),
        ("/run/avd.sock", "/run/avd.sock"),
    ],
)
def test_source_key(ip: str, key: str) -> None:
    assert source_key(ip) == key


def test_oldest_source_is_forgotten_past_max_tracked() -> None:
    lockout = AuthLockout(max_failures=2, window_s=60, lockout_s=600, max_tracked=3)
    lockout.record_failure("10.0.0.1", 0)
    for i in range(2, 5):
        lockout.record_failure(f"10.0.0.{i}", 1)
    assert len(lockout) == 3
    assert not lockout.record_failure("10.0.0.1", 2)  # its first failure was forgotten


def test_a_locked_source_that_keeps_knocking_is_not_evicted_first() -> None:
    lockout = AuthLockout(max_failures=1, window_s=60, lockout_s=600, max_tracked=2)
    assert lockout.record_failure("10.0.0.1", 0)
    lockout.record_failure("10.0.0.2", 1)
    assert lockout.is_locked("10.0.0.1", 2)  # touched: now the newest
    lockout.record_failure("10.0.0.3", 3)
    assert lockout.is_locked("10.0.0.1", 4)
    assert not lockout.is_locked("10.0.0.2", 4)


def test_expired_sources_are_pruned() -> None:
    lockout = AuthLockout(max_failures=2, window_s=10, lockout_s=30)
    for i in range(100):
        lockout.record_failure(f"10.0.{i}.1", float(i) / 100)
    lockout.record_failure("10.1.0.1", 31)
    assert len(lockout) == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_failures": 0}, "max_failures"),
        ({"window_s": 0}, "window_s"),
        ({"lockout_s": -1}, "lockout_s"),
        ({"max_tracked": 0}, "max_tracked"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AuthLockout(**kwargs)  # type: ignore[arg-type]


# ---- properties -----------------------------------------------------------------------

IPS = [f"10.0.0.{i}" for i in range(1, 7)]


@dataclass
class Model:
    """The rules, written the slow and obvious way (no eviction)."""

    max_failures: int
    window_s: float
    lockout_s: float
    failures: dict[str, list[float]] = field(default_factory=dict)
    locked_until: dict[str, float] = field(default_factory=dict)

    def is_locked(self, ip: str, now: float) -> bool:
        return now < self.locked_until.get(ip, float("-inf"))

    def record_failure(self, ip: str, now: float) -> bool:
        if self.is_locked(ip, now):
            return False
        recent = [t for t in self.failures.get(ip, []) if now - t < self.window_s] + [now]
        self.failures[ip] = recent
        if len(recent) < self.max_failures:
            return False
        self.failures[ip] = []
        self.locked_until[ip] = now + self.lockout_s
        return True

    def record_success(self, ip: str, now: float) -> None:
        if not self.is_locked(ip, now):
            self.failures.pop(ip, None)


# (ip index, seconds since the previous step, what): time never goes backwards.
steps = st.lists(
    st.tuples(
        st.integers(0, len(IPS) - 1),
        st.floats(0, 40, allow_nan=False),
        st.sampled_from(["fail", "fail", "fail", "check", "success"]),
    ),
    max_size=80,
)
params = st.tuples(st.integers(1, 6), st.floats(1, 100), st.floats(1, 200))


def run(
    lockout: AuthLockout, model: Model | None, script: list[tuple[int, float, str]]
) -> list[bool]:
    """Play ``script`` on both; returns what is_locked said for IPS[0] after every step."""
    now, seen = 0.0, []
    for index, dt, what in script:
        now += dt
        ip = IPS[index]
        if what == "fail":
            got = lockout.record_failure(ip, now)
            assert model is None or got == model.record_failure(ip, now)
        elif what == "success":
            lockout.record_success(ip, now)
            if model is not None:
                model.record_success(ip, now)
        assert model is None or lockout.is_locked(ip, now) == model.is_locked(ip, now)
        seen.append(lockout.is_locked(IPS[0], now))
    return seen


@given(params, steps)
def test_behaves_as_the_model_when_nothing_is_evicted(
    p: tuple[int, float, float], script: list[tuple[int, float, str]]
) -> None:
    lockout = AuthLockout(max_failures=p[0], window_s=p[1], lockout_s=p[2])
    run(lockout, Model(p[0], p[1], p[2]), script)


@given(params, steps)
def test_other_sources_do_not_change_whether_one_is_locked(
    p: tuple[int, float, float], script: list[tuple[int, float, str]]
) -> None:
    mixed = run(AuthLockout(*p), None, script)
    # The same clock, with every step on another source turned into a mere pause.
    alone = [(0, dt, what if i == 0 else "pause") for i, dt, what in script]
    assert run(AuthLockout(*p), None, alone) == mixed


@given(st.integers(1, 6), st.lists(st.floats(0, 1000, allow_nan=False), max_size=60))
def test_fewer_than_max_failures_in_any_window_never_locks(
    max_failures: int, times: list[float]
) -> None:
    window = 30.0
    times.sort()
    busiest = max((sum(1 for u in times if u <= t and t - u < window) for t in times), default=0)
    lockout = AuthLockout(max_failures=max_failures, window_s=window, lockout_s=100)
    locked = [lockout.record_failure("10.9.9.9", t) for t in times]
    if busiest < max_failures:
        assert not any(locked)
    else:
        assert any(locked)


@given(st.integers(1, 5), st.floats(1, 1000), st.lists(st.floats(0, 0.999)))
def test_a_lockout_ends_exactly_lockout_s_after_it_began(
    max_failures: int, lockout_s: float, during: list[float]
) -> None:
    lockout = AuthLockout(max_failures=max_failures, window_s=60, lockout_s=lockout_s)
    began = [lockout.record_failure("10.1.1.1", 5.0) for _ in range(max_failures)][-1]
    assert began
    for fraction in sorted(during):  # knocking during the lockout does not extend it
        now = 5.0 + fraction * lockout_s
        lockout.record_failure("10.1.1.1", now)
        assert lockout.is_locked("10.1.1.1", now)
    assert not lockout.is_locked("10.1.1.1", 5.0 + lockout_s)


@settings(max_examples=50)
@given(
    st.integers(1, 20),
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.floats(0, 5, allow_nan=False)), max_size=300),
)
def test_memory_stays_bounded(max_tracked: int, attempts: list[tuple[int, float]]) -> None:
    lockout = AuthLockout(max_failures=3, window_s=60, lockout_s=600, max_tracked=max_tracked)
    now = 0.0
    for address, dt in attempts:
        now += dt
        ip = f"{address >> 24}.{(address >> 16) & 255}.{(address >> 8) & 255}.{address & 255}"
        lockout.record_failure(ip, now)
        lockout.is_locked(ip, now)
        assert len(lockout) <= max_tracked
    assert lockout.locked_count(now) <= max_tracked
