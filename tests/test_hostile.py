"""Hostile clients against the real receiver daemon, while a good sender streams alongside.

Issue 5: plaintext on the TLS ports, random bytes before and after the handshake, huge and
truncated length fields, unknown message kinds, floods of idle connections and of
handshakes, wrong tokens, another sender's token, a good token with a wrong client
certificate under mutual TLS. After each attack the receiver is alive, its descriptors come
back to where they were, its memory stays bounded, and the good sender's frame rate never
dips: every 1 s window (sampled every 0.5 s) holds at least 70 % of its 20 frames.

Attackers connect from loopback addresses of their own (all of 127/8 is local), a few
connections per address, so that per-address limits and lockouts fall on them and never on
the good sender at 127.0.0.1; where a test wants a limit to bite, it uses one address on
purpose. Run with ``-s`` to see the figures measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from avd.certs import CertPaths
from avd.media.base import AudioFormat, StreamKind, VideoFormat
from avd.media.fanout import FanoutSink
from avd.metrics import ReceiverMetrics
from avd.protocol import HEADER, MAGIC, VERSION, Connection, Hello, MessageType, Role
from avd.receiver import Receiver

from .conftest import (
    Credentials,
    Daemon,
    ReceiverHandle,
    metric,
    receiver_env,
    receiver_settings,
    scrape,
    sender_env,
    start_receiver,
    wait_until,
)
from .procwatch import fd_kinds, open_fds, rss_kb

pytestmark = pytest.mark.slow

HANDSHAKE_TIMEOUT_S = 2.0  # short, so that stalled attackers are dropped within the test
IDLE_TIMEOUT_S = 3.0
FPS = 20
MIN_SHARE = 0.7  # of FPS in every 1 s window: generous, the machine is shared
FD_SLACK = 3
MIN_WATCH_S = 2.2  # a short attack is still watched over a few 1 s windows
RSS_GROWTH_LIMIT_KB = 30 * 1024
REFUSED = HEADER.pack(MAGIC, VERSION, MessageType.REFUSED, 0)
WELCOME_SIZE = HEADER.size + 12
T = TypeVar("T")


# ---- the receiver under attack ----------------------------------------------------------


@dataclass
class Target:
    """A receiver daemon, its good sender (cam1, video), and what "normal" looks like."""

    handle: ReceiverHandle
    sender: Daemon
    tokens: dict[str, str]
    pki: CertPaths
    client_cert: tuple[Path, Path] | None = None
    base_fds: int = 0
    base_rss_kb: int = 0
    figures: list[str] = field(default_factory=list)
    _sources: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def pid(self) -> int:
        return self.handle.daemon.proc.pid

    def source(self) -> str:
        """A loopback address no other attacker has used yet (never 127.0.0.1)."""
        n = next(self._sources)
        return f"127.1.{n // 250}.{n % 250 + 1}"

    def counter(self, name: str, **labels: str) -> float:
        return metric(self.handle.metrics(), name, **labels)

    def frames(self) -> float:
        return self.counter("avd_frames_received_total", sender="cam1", stream="video")

    def context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if cert is not None:
            context.load_cert_chain(*cert)
        return context

    def assert_alive(self) -> None:
        assert self.handle.daemon.proc.poll() is None, self.handle.daemon.log_text()[-3000:]

    def wait_fds_back(self, timeout: float = HANDSHAKE_TIMEOUT_S + 8) -> int:
        deadline = time.monotonic() + timeout
        while (fds := open_fds(self.pid)) > self.base_fds + FD_SLACK:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"receiver holds {fds} descriptors, {self.base_fds} before the attack: "
                    f"{dict(fd_kinds(self.pid))}"
                )
            time.sleep(0.1)
        return fds


def _start_target(tmp: Path, pki: CertPaths, mutual_tls: bool = False) -> Target:
    creds = Credentials(tmp / "tokens")
    creds.add("cam1")
    creds.add("cam2")  # an insider: a valid token, used by some attacks
    extra = {
        "AVD_HANDSHAKE_TIMEOUT_S": str(HANDSHAKE_TIMEOUT_S),
        "AVD_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
    }
    sender_extra = {"AVD_AUDIO_SOURCE": "none"}
    cert = None
    if mutual_tls:
        extra["AVD_TLS_CLIENT_CA"] = str(pki.ca_cert)
        cert = (pki.sender_cert, pki.sender_key)
        sender_extra.update(AVD_TLS_CERT=str(pki.sender_cert), AVD_TLS_KEY=str(pki.sender_key))
    handle = start_receiver(receiver_env(pki, creds.tokens_file, **extra), tmp / "receiver.log")
    env = sender_env(pki, handle, "cam1", creds.tokens["cam1"], **sender_extra)
    target = Target(handle, Daemon("sender", env, tmp / "sender.log"), creds.tokens, pki, cert)
    try:
        wait_until(lambda: target.frames() > 2 * FPS, 20)
        time.sleep(1)  # let the heap and the descriptors settle
        target.base_fds, target.base_rss_kb = open_fds(target.pid), rss_kb(target.pid)
    except BaseException:
        _stop(target)
        raise
    return target


def _stop(target: Target) -> int:
    target.sender.kill()
    return target.handle.daemon.stop()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, pki: CertPaths) -> Iterator[Target]:
    t = _start_target(tmp_path_factory.mktemp("hostile"), pki)
    yield t
    log = t.handle.daemon.log_text()
    print("\n" + "\n".join(t.figures))
    assert _stop(t) == 0, log[-3000:]
    for token in t.tokens.values():
        assert token not in log


# ---- watching the good sender ------------------------------------------------------------


class RateWatch:
    """Samples the good sender's received-frame counter every 0.5 s, in a thread."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.samples: list[tuple[float, float]] = []
        self.error: BaseException | None = None
        self.peak_rss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RateWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                frames = self.target.frames()
                self.samples.append(((started + time.monotonic()) / 2, frames))
                self.peak_rss_kb = max(self.peak_rss_kb, rss_kb(self.target.pid))
                self._stop.wait(max(0.0, 0.5 - (time.monotonic() - started)))
        except BaseException as exc:  # reported by check(), in the test's thread
            self.error = exc

    def windows(self) -> list[float]:
        """Frames per second over each window of about 1 s between two samples."""
        rates = []
        for i, (t0, n0) in enumerate(self.samples):
            later = [(t, n) for t, n in self.samples[i + 1 :] if t - t0 >= 0.95]
            if later:
                t1, n1 = later[0]
                rates.append((n1 - n0) / (t1 - t0))
        return rates

    def check(self, name: str) -> str:
        if self.error is not None:
            raise AssertionError(f"{name}: the metrics endpoint failed") from self.error
        rates = self.windows()
        assert len(rates) >= 2, f"{name}: too few samples {self.samples}"
        low = min(rates)
        assert low >= MIN_SHARE * FPS, f"{name}: the good sender dipped to {low:.1f} fps: {rates}"
        return f"min {low:.1f} fps over {len(rates)} windows"


@contextlib.contextmanager
def attack(target: Target, name: str) -> Iterator[None]:
    """Watch the good sender during the attack; then check the receiver came back to normal."""
    target.assert_alive()
    started = time.monotonic()
    with RateWatch(target) as watch:
        yield
        fds = target.wait_fds_back()  # still watching: the clean-up must not hurt either
        time.sleep(max(0.0, started + MIN_WATCH_S - time.monotonic()))
    rate = watch.check(name)
    target.assert_alive()
    growth = rss_kb(target.pid) - target.base_rss_kb
    peak = watch.peak_rss_kb - target.base_rss_kb
    target.figures.append(
        f"{name}: {rate}; fds {fds} (base {target.base_fds}); "
        f"RSS {growth:+d} KiB over base (peak {peak:+d})"
    )
    assert growth < RSS_GROWTH_LIMIT_KB, f"{name}: RSS grew by {growth} KiB"


# ---- attacker's tools --------------------------------------------------------------------


def connect(port: int, source: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def tls_connect(
    target: Target, port: int, source: str, cert: tuple[Path, Path] | None = None
) -> ssl.SSLSocket:
    raw = connect(port, source)
    return target.context(cert).wrap_socket(raw, server_hostname="localhost")


def until_closed(sock: socket.socket, timeout: float = HANDSHAKE_TIMEOUT_S + 3) -> bytes:
    """All the receiver sends until it closes; fails if it leaves the connection open."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def hello(sender_id: str, token: str, kind: StreamKind = StreamKind.VIDEO) -> bytes:
    fmt = (
        VideoFormat(640, 480, FPS, 70)
        if kind is StreamKind.VIDEO
        else AudioFormat(44100, 1, 2, 1024)
    )
    return Connection(Role.SENDER).send(Hello(sender_id, kind, fmt, token.encode()))


def header(kind: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, length)


def insider(target: Target, source: str) -> ssl.SSLSocket:
    """A session authenticated with cam2's good token, past the welcome."""
    tls = tls_connect(target, target.handle.video_port, source, target.client_cert)
    tls.sendall(hello("cam2", target.tokens["cam2"]))
    welcome = b""
    while len(welcome) < WELCOME_SIZE:
        chunk = tls.recv(WELCOME_SIZE - len(welcome))
        assert chunk, "the receiver closed an insider's session during the hello"
        welcome += chunk
    assert welcome[:4] == header(MessageType.WELCOME, 12)[:4], welcome
    return tls


def in_parallel(fn: Callable[..., T], calls: list[tuple[Any, ...]], workers: int = 16) -> list[T]:
    """``fn(*args)`` for each of ``calls`` on a pool of threads; results in order."""
    with ThreadPoolExecutor(workers) as pool:
        return [f.result() for f in [pool.submit(fn, *args) for args in calls]]


def ports(target: Target) -> tuple[int, int]:
    return (target.handle.video_port, target.handle.audio_port)


def failures(target: Target, *reasons: str) -> float:
    return sum(target.counter("avd_handshake_failures_total", reason=r) for r in reasons)


# ---- the attacks -------------------------------------------------------------------------


def test_plaintext_and_random_bytes_before_the_handshake(target: Target) -> None:
    rng = random.Random(5)
    payloads = [
        b"GET / HTTP/1.1\r\nHost: receiver\r\n\r\n",
        hello("cam2", target.tokens["cam2"]),  # a sender that forgot TLS
        *(rng.randbytes(n) for n in (1, 7, 100, 4096, 65536)),
        b"\x16\x03\x01\xff\xff" + rng.randbytes(200),  # a TLS record header, then nonsense
    ]
    before = failures(target, "tls-error", "tls-timeout")

    def one(port: int, payload: bytes) -> bytes:
        with connect(port, target.source()) as sock:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(payload)
            return until_closed(sock)

    with attack(target, "plaintext and random bytes before TLS"):
        replies = in_parallel(one, [(p, d) for p in ports(target) for d in payloads])
        n = len(replies)
        wait_until(lambda: failures(target, "tls-error", "tls-timeout") - before == n, 10)
    for reply in replies:
        assert len(reply) < 100, reply  # at most a TLS alert, and never a hint of avd


def test_random_bytes_and_truncated_messages_after_the_handshake(target: Target) -> None:
    rng = random.Random(6)
    closing = [  # each ends in a protocol error at once
        rng.randbytes(64),
        rng.randbytes(70_000),
        b"AV" + rng.randbytes(30),
        b"AV\x02\x01" + struct.pack(">I", 10) + bytes(10),  # an unknown version
        b"\x00" * 64,
        hello("cam2", target.tokens["cam2"])[:20],  # a hello cut short, then EOF
        header(MessageType.HELLO, 100) + bytes(10),  # a promised body, then EOF
        b"AV\x01",  # a header cut short, then EOF
    ]
    stalling = [b"A", b"AV\x01\x01\x00", header(MessageType.HELLO, 100) + bytes(10)]
    before_errors = failures(target, "protocol-error")
    before_timeouts = failures(target, "hello-timeout")

    def one(port: int, payload: bytes, then_close: bool) -> bytes:
        with tls_connect(target, port, target.source()) as tls:
            tls.sendall(payload)
            if then_close:
                with contextlib.suppress(OSError):
                    tls.unwrap()  # close_notify then EOF: "the peer closed"
                return b""
            return until_closed(tls)

    calls = [(p, d, d in closing[-3:]) for p in ports(target) for d in closing]
    calls += [(p, d, False) for p in ports(target) for d in stalling]
    with attack(target, "random and truncated bytes after TLS"):
        replies = in_parallel(one, calls)
        wait_until(lambda: failures(target, "protocol-error") - before_errors == 2 * len(closing))
        wait_until(lambda: failures(target, "hello-timeout") - before_timeouts == 2 * len(stalling))
    for reply in replies:
        assert reply == b"", reply  # nothing at all for a peer that never said hello


def test_huge_length_fields_are_refused_from_the_header(target: Target) -> None:
    before = failures(target, "protocol-error")
    lengths = [2**32 - 1, 2**31, 8 * 2**20 + 18, 513]
    started = time.monotonic()

    def one(length: int) -> float:
        with tls_connect(target, target.handle.video_port, target.source()) as tls:
            tls.sendall(header(MessageType.HELLO, length) + bytes(100))
            until_closed(tls)
        return time.monotonic() - started

    with attack(target, "huge length fields before auth"):
        in_parallel(one, [(n,) for n in lengths])
        # Refused from the header alone: counted as protocol errors, not hello timeouts.
        wait_until(lambda: failures(target, "protocol-error") - before == len(lengths))


def test_an_insider_with_huge_truncated_and_unknown_messages(target: Target) -> None:
    """cam2 holds a good token; whatever it sends, only its own session ends."""
    media_limit = 8 * 2**20 + 17
    at_once = [
        header(MessageType.MEDIA, 2**32 - 1),
        header(MessageType.MEDIA, media_limit + 1) + bytes(1000),
        header(MessageType.MEDIA, 5) + bytes(5),  # shorter than the media prefix
        header(MessageType.HEARTBEAT, 21) + bytes(21),  # a fixed size, not kept
        header(MessageType.GOODBYE, 300) + bytes(300),
        *(header(kind, 4) + bytes(4) for kind in (0, 8, 99, 255)),  # unknown kinds
        header(MessageType.HELLO, 10) + bytes(10),  # known kinds out of turn
        header(MessageType.WELCOME, 12) + bytes(12),
        header(MessageType.ACK, 8) + bytes(8),
        random.Random(7).randbytes(5000),
    ]
    truncated = header(MessageType.MEDIA, 1000) + bytes(500)  # the rest never comes

    def one(payload: bytes) -> float:
        with insider(target, target.source()) as tls:
            tls.sendall(payload)
            started = time.monotonic()
            until_closed(tls, timeout=IDLE_TIMEOUT_S + 3)
            return time.monotonic() - started

    with attack(target, "insider: huge, truncated, unknown messages"):
        # One at a time: a second cam2 video session would replace the first.
        quick = [one(payload) for payload in at_once]
        slow = one(truncated)
        wait_until(lambda: target.counter("avd_connections_active", stream="video") == 1)
    assert target.counter("avd_frames_received_total", sender="cam2") == 0
    # A broken message ends the session at once; a truncated one waits for the idle timeout.
    assert max(quick) < 2, quick
    assert IDLE_TIMEOUT_S - 0.5 < slow < IDLE_TIMEOUT_S + 3, slow


def test_wrong_tokens_and_another_senders_token(target: Target) -> None:
    tokens = target.tokens
    attempts = [
        ("cam1", "x" * 43),  # the good sender's id, a made-up token
        ("cam1", tokens["cam2"]),  # the good sender's id, another sender's token
        ("cam2", tokens["cam1"]),  # another sender's token
        ("intruder", tokens["cam1"]),  # an id nobody issued
        ("cam2", tokens["cam2"][:-1] + ("A" if tokens["cam2"][-1] != "A" else "B")),
    ]
    flood = [
        ("cam1", "".join(random.Random(i).choices("abcdef0123456789", k=43))) for i in range(100)
    ]
    before = target.counter("avd_auth_failures_total")
    sources = {i: target.source() for i in range(len(attempts) + len(flood))}

    def one(i: int, sender_id: str, token: str) -> bytes:
        # Four attempts per source at most: below any lockout threshold.
        with tls_connect(target, target.handle.video_port, sources[i // 4 * 4]) as tls:
            tls.sendall(hello(sender_id, token))
            return until_closed(tls)

    calls = [(i, s, t) for i, (s, t) in enumerate(attempts + flood)]
    with attack(target, "wrong tokens, another sender's token, 100 guesses"):
        replies = in_parallel(one, calls, workers=8)
        n = len(replies)
        wait_until(lambda: target.counter("avd_auth_failures_total") - before == n)
    assert all(reply == REFUSED for reply in replies), set(replies)
    log = target.handle.daemon.log_text()
    assert "cam1 reconnected" not in log  # the good sender's session was never displaced
    assert target.counter("avd_connections_active", stream="video") == 1
    for token in tokens.values():
        assert token not in log


@dataclass
class FloodReport:
    """What one slowloris flood did to a fresh receiver; the tests below judge it."""

    refused: float = 0
    tls_timeouts: float = 0
    hello_timeouts: float = 0
    newcomer_welcomed: bool = False
    fds_while_held: str = ""  # "" if the receiver dropped every idle connection by itself
    rates: list[float] = field(default_factory=list)
    rss_base_kb: int = 0
    rss_peak_kb: int = 0
    rss_after_kb: int = 0


CROWDED, SPREAD, DRIPPING = 100, 4 * 50, 20
PER_ADDRESS_LIMIT = 64  # AVD_MAX_CONNECTIONS_PER_IP's default


def _drip_hellos(target: Target, n: int) -> threading.Thread:
    """``n`` TLS connections sending their hello one byte every 0.25 s, in a thread."""

    def run() -> None:
        socks = [tls_connect(target, target.handle.audio_port, target.source()) for _ in range(n)]
        data = hello("cam2", target.tokens["cam2"], StreamKind.AUDIO)
        until = time.monotonic() + HANDSHAKE_TIMEOUT_S + 1
        try:
            for i in range(len(data)):
                if time.monotonic() > until:
                    break
                for sock in socks:
                    with contextlib.suppress(OSError):  # dropped by the receiver already
                        sock.sendall(data[i : i + 1])
                time.sleep(0.25)
        finally:
            for sock in socks:
                sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def idle_flood(tmp_path_factory: pytest.TempPathFactory, pki: CertPaths) -> FloodReport:
    """Slowloris on a receiver of its own (the memory it takes is not given back to the OS).

    300 raw connections that never start TLS (100 from one address, where the per-address
    limit bites; 4 x 50 from others), and 20 TLS connections that drip their hello a byte
    every 0.25 s. Meanwhile a newcomer with a good token tries to get in.
    """
    target = _start_target(tmp_path_factory.mktemp("flood"), pki)
    report = FloodReport(rss_base_kb=target.base_rss_kb)
    before = {r: failures(target, r) for r in ("too-many-connections", "tls-timeout")}
    before_hello = failures(target, "hello-timeout")
    held: list[socket.socket] = []
    try:
        with RateWatch(target) as watch:
            video, crowded = target.handle.video_port, target.source()
            held += [connect(video, crowded) for _ in range(CROWDED)]
            held += [
                connect(video, s) for s in [target.source() for _ in range(4)] for _ in range(50)
            ]
            with contextlib.suppress(AssertionError, OSError), insider(target, "127.0.0.1"):
                report.newcomer_welcomed = True
            drip = _drip_hellos(target, DRIPPING)
            try:  # the attacker still holds its raw sockets: the receiver must drop them
                target.wait_fds_back()
            except AssertionError as exc:
                report.fds_while_held = str(exc)
            drip.join(10)
            time.sleep(1)  # watch the good sender a little longer after the flood
        report.rates = watch.windows()
        report.rss_peak_kb = watch.peak_rss_kb
        report.refused = failures(target, "too-many-connections") - before["too-many-connections"]
        report.tls_timeouts = failures(target, "tls-timeout") - before["tls-timeout"]
        report.hello_timeouts = failures(target, "hello-timeout") - before_hello
        report.rss_after_kb = rss_kb(target.pid)
    finally:
        for sock in held:
            sock.close()
        _stop(target)
    print(f"\nidle flood: {report}")
    return report


def test_an_idle_flood_is_refused_past_the_per_address_limit_and_counted(
    idle_flood: FloodReport,
) -> None:
    assert idle_flood.refused == CROWDED - PER_ADDRESS_LIMIT
    # Every admitted raw connection is dropped at the handshake timeout, and counted.
    assert idle_flood.tls_timeouts == CROWDED + SPREAD - idle_flood.refused
    assert idle_flood.hello_timeouts == DRIPPING


def test_an_idle_flood_does_not_keep_a_newcomer_out(idle_flood: FloodReport) -> None:
    assert idle_flood.newcomer_welcomed


def test_an_idle_flood_is_dropped_by_the_receiver_itself(idle_flood: FloodReport) -> None:
    assert idle_flood.fds_while_held == ""


def test_an_idle_flood_does_not_slow_the_good_sender(idle_flood: FloodReport) -> None:
    assert len(idle_flood.rates) >= 4
    assert min(idle_flood.rates) >= MIN_SHARE * FPS, idle_flood.rates


def test_an_idle_flood_costs_bounded_memory(idle_flood: FloodReport) -> None:
    peak = idle_flood.rss_peak_kb - idle_flood.rss_base_kb
    after = idle_flood.rss_after_kb - idle_flood.rss_base_kb
    assert peak < RSS_GROWTH_LIMIT_KB, f"RSS peaked {peak} KiB over base during the flood"
    assert after < RSS_GROWTH_LIMIT_KB, f"RSS stayed {after} KiB over base after the flood"


def test_silent_tls_peers_are_dropped_at_the_hello_timeout(target: Target) -> None:
    before = failures(target, "hello-timeout")
    with attack(target, "10 silent TLS peers"):
        held = in_parallel(
            tls_connect, [(target, target.handle.video_port, target.source()) for _ in range(10)]
        )
        try:
            wait_until(lambda: failures(target, "hello-timeout") - before == 10, 10)
            # The attacker still holds its end: the receiver must let go by itself.
            target.wait_fds_back(timeout=3)
        finally:
            for sock in held:
                sock.close()


def test_a_flood_of_handshakes(target: Target) -> None:
    sources = [target.source() for _ in range(4)]

    def one(i: int) -> str:
        with tls_connect(target, ports(target)[i % 2], sources[i % 4]) as tls:
            return str(tls.version())

    with attack(target, "200 TLS handshakes"):
        versions = in_parallel(one, [(i,) for i in range(200)], workers=8)
    assert versions == ["TLSv1.3"] * 200


def test_repeated_wrong_tokens_lock_the_address_out(target: Target) -> None:
    guesser, bystander = target.source(), target.source()
    lockouts = target.counter("avd_auth_lockouts_total")
    locked_out = target.counter("avd_auth_locked_out_connections_total")

    def guess(source: str, token: str = "y" * 43) -> bytes:
        try:
            with tls_connect(target, target.handle.video_port, source) as tls:
                tls.sendall(hello("cam2", token))
                return until_closed(tls)
        except (ssl.SSLError, ConnectionError):
            return b"<refused before TLS>"

    with attack(target, "lockout: 8 wrong tokens from one address"):
        replies = [guess(guesser) for _ in range(8)]
        # Locked out: even the good token is refused, before any TLS work.
        good_from_guesser = guess(guesser, target.tokens["cam2"])
        other = guess(bystander)
    assert replies[:5] == [REFUSED] * 5
    assert all(r == b"<refused before TLS>" for r in replies[5:]), replies
    assert good_from_guesser == b"<refused before TLS>"
    assert other == REFUSED  # another address is not affected
    assert target.counter("avd_auth_lockouts_total") - lockouts == 1
    assert target.counter("avd_auth_locked_out_connections_total") - locked_out >= 4
    log = target.handle.daemon.log_text()
    about = re.compile(rf"\b(INFO|WARNING|ERROR)\b.*{re.escape(guesser)}\b")
    lines = [line for line in log.splitlines() if about.search(line) and "lock" in line.lower()]
    assert len(lines) == 1, lines  # logged once, whatever the later attempts


def test_mutual_tls_refuses_a_good_token_with_a_wrong_certificate(
    tmp_path: Path, pki: CertPaths, other_pki: CertPaths
) -> None:
    target = _start_target(tmp_path, pki, mutual_tls=True)
    exit_code = None
    try:
        wrong: list[tuple[Path, Path] | None] = [
            None,  # no certificate at all
            (other_pki.sender_cert, other_pki.sender_key),  # another CA's sender
            (pki.receiver_cert, pki.receiver_key),  # our CA, but a server's certificate
        ]
        before = failures(target, "tls-error")

        def one(cert: tuple[Path, Path] | None) -> bytes:
            try:
                with tls_connect(target, target.handle.video_port, target.source(), cert) as tls:
                    tls.sendall(hello("cam2", target.tokens["cam2"]))
                    return until_closed(tls)
            except (ssl.SSLError, ConnectionError):
                return b""

        with attack(target, "mutual TLS: good token, wrong certificate"):
            replies = [one(cert) for cert in wrong for _ in range(3)]
            wait_until(lambda: failures(target, "tls-error") - before == len(replies))
            # The right certificate with the same token gets in: the token was never the problem.
            with insider(target, target.source()):
                pass
        assert replies == [b""] * len(replies)
        assert target.counter("avd_frames_received_total", sender="cam2") == 0
        print("\n" + "\n".join(target.figures))
    finally:
        exit_code = _stop(target)
    assert exit_code == 0


def test_afterwards_the_good_sender_lost_nothing(target: Target) -> None:
    """Runs last: the whole module's attacks are behind us."""
    target.assert_alive()
    assert target.counter("avd_frames_lost_total", sender="cam1") == 0
    assert target.counter("avd_connections_active", stream="video") == 1
    growth = rss_kb(target.pid) - target.base_rss_kb
    target.figures.append(
        f"after all attacks: RSS {rss_kb(target.pid)} KiB ({growth:+d} over base "
        f"{target.base_rss_kb}), fds {open_fds(target.pid)} (base {target.base_fds})"
    )
    assert growth < RSS_GROWTH_LIMIT_KB
    assert scrape(target.handle.metrics_url)


def test_an_ipv6_host_stepping_through_its_64_is_one_source_for_the_per_address_limit(
    pki: CertPaths, creds: Credentials, caplog: pytest.LogCaptureFixture
) -> None:
    """Each connection from another address of one /64, as the lockout already counts them:
    per address, a host given a /64 (the usual) passed AVD_MAX_CONNECTIONS_PER_IP at will
    and got a log line per connection. The peers' addresses are what the kernel would report
    for IPv6 peers; the sockets are local pairs (no such network here)."""

    async def scenario() -> tuple[float, float]:
        settings = receiver_settings(pki, creds.tokens_file, max_connections_per_ip=2)
        metrics = ReceiverMetrics()
        receiver = Receiver(settings, FanoutSink([]), metrics)
        pairs = [socket.socketpair() for _ in range(5)]
        try:
            one_64 = [f"2001:db8:1:2::{n}" for n in range(1, 4)]  # 3 from one /64: 1 too many
            other_64 = ["2001:db8:1:3::1", "2001:db8:1:4::1"]
            for (ours, _), address in zip(pairs, one_64 + other_64, strict=True):
                ours.setblocking(False)
                receiver._spawn(StreamKind.VIDEO, ours, (address, 50000, 0, 0))
            await asyncio.sleep(0.2)
            refused = metrics.handshake_failures.labels(reason="too-many-connections")._value.get()
            return refused, len(receiver._handlers)
        finally:
            await receiver.shutdown(deadline_s=5)
            for _, theirs in pairs:
                theirs.close()

    with caplog.at_level(logging.WARNING, logger="avd.receiver"):
        refused, waiting = asyncio.run(scenario())
    assert (refused, waiting) == (1, 4)
    lines = [r.getMessage() for r in caplog.records if "too many connections" in r.getMessage()]
    assert lines == [
        "refused connection from [2001:db8:1:2::3]:50000: too many connections "
        "(AVD_MAX_CONNECTIONS_PER_IP=2)"
    ]
