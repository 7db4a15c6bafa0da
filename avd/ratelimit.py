"""Per-source lockout of authentication failures: pure, the caller passes the time in.

The receiver asks ``is_locked`` before any TLS work and reports each refused token with
``record_failure``. After ``max_failures`` failures within ``window_s`` seconds, the source is
refused for ``lockout_s`` seconds, the way motion and Frigate lock out password guessers
(and fail2ban's ``maxretry``/``findtime``/``bantime``). ``record_failure`` returns True only
on the failure that starts a lockout, so the caller logs it once. A lockout is not extended
by attempts made during it: it ends ``lockout_s`` after it began, and the source starts
again from zero failures.

Sources, not addresses: an IPv4 address is one source; an IPv6 address counts as its /64
network, because one host is normally given a whole /64 and could otherwise step through
2^64 addresses to escape the lockout. IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``, seen
on dual-stack sockets) count as the IPv4 address. A peer name that is not an IP address is
its own source.

Memory is bounded: at most ``max_tracked`` sources are remembered; past that the source
touched longest ago is forgotten (an attacker who keeps trying keeps being touched), and
sources whose failures and lockout have all expired are pruned as time passes.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass, field

IPV6_SOURCE_PREFIX = 64


def source_key(ip: str) -> str:
    """The source an address belongs to: itself for IPv4, its /64 network for IPv6."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])  # a zone id names a link, not a host
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, IPV6_SOURCE_PREFIX), strict=False)
        return str(network)
    return str(address)


@dataclass
class _Source:
    last_seen: float
    failures: deque[float] = field(default_factory=deque)
    locked_until: float | None = None

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and now < self.locked_until


class AuthLockout:
    """Locks out a source after repeated authentication failures, for a while."""

    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 60,
        lockout_s: float = 600,
        max_tracked: int = 10000,
    ) -> None:
        for name, value in (("max_failures", max_failures), ("max_tracked", max_tracked)):
            if value < 1:
                raise ValueError(f"AuthLockout {name} must be at least 1, got {value}")
        for name, seconds in (("window_s", window_s), ("lockout_s", lockout_s)):
            if not seconds > 0:
                raise ValueError(f"AuthLockout {name} must be positive, got {seconds}")
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_tracked = max_tracked
        # Ordered by last touch, oldest first: the front is what expires or is evicted first.
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def __len__(self) -> int:
        """How many sources are remembered (bounded by ``max_tracked``)."""
        return len(self._sources)

    def is_locked(self, ip: str, now: float) -> bool:
        """True while ``ip``'s source is locked out: refuse its connection unread."""
        key = source_key(ip)
        source = self._sources.get(key)
        if source is None or not source.locked(now):
            return False
        self._touch(key, source, now)  # a source still knocking stays remembered
        return True

    def record_failure(self, ip: str, now: float) -> bool:
        """Count one failure; True when this one starts a lockout (log it, once)."""
        self._prune(now)
        key = source_key(ip)
        source = self._sources.get(key)
        if source is None:
            source = _Source(last_seen=now)
            self._sources[key] = source
        self._touch(key, source, now)
        if source.locked(now):
            return False  # already refused; attempts during a lockout do not extend it
        failures = source.failures
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        failures.append(now)
        self._evict_past_bound()
        if len(failures) < self.max_failures:
            return False
        failures.clear()  # after the lockout the source starts again from zero
        source.locked_until = now + self.lockout_s
        return True

    def record_success(self, ip: str, now: float) -> None:
        """A good token from ``ip``: forget its failures (a lockout in force stays)."""
        key = source_key(ip)
        source = self._sources.get(key)
        if source is not None and not source.locked(now):
            del self._sources[key]
        self._prune(now)

    def locked_count(self, now: float) -> int:
        """How many sources are locked out at ``now`` (for a gauge)."""
        return sum(1 for source in self._sources.values() if source.locked(now))

    def _touch(self, key: str, source: _Source, now: float) -> None:
        source.last_seen = max(source.last_seen, now)
        self._sources.move_to_end(key)

    def _prune(self, now: float) -> None:
        # Past this horizon since its last touch, a source has neither a failure inside the
        # window nor a lockout in force; the front of the order is touched longest ago.
        horizon = max(self.window_s, self.lockout_s)
        while self._sources:
            key, source = next(iter(self._sources.items()))
            if now - source.last_seen < horizon:
                return
            del self._sources[key]

    def _evict_past_bound(self) -> None:
        while len(self._sources) > self.max_tracked:
            self._sources.popitem(last=False)
