"""avd.backoff: delay bounds, escalation and when a session resets it, slow retries, and
failure classification.

Classification is checked on exceptions built by hand and on the real ones: TLS failures
provoked on loopback with certificates from ``avd.certs`` (the ``pki`` fixtures).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import random
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avd import certs
from avd.backoff import (
    AUTH_RETRY_S,
    RECEIVER_GONE,
    REFUSED_HELLOS,
    SLOW_RETRY,
    Backoff,
    FailureKind,
    classify,
    describe_failure,
)
from avd.certs import CertPaths, init_certs
from avd.config import ReceiverSettings, SenderSettings
from avd.errors import AuthError, FrameTooLarge, LocalProtocolError, RemoteProtocolError
from avd.tls import receiver_context, sender_context


class FixedRandom(random.Random):
    """Always draws ``value`` from [0, 1): pins ``uniform`` to one end of its range."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def bases(count: int, first: float = 0.5, cap: float = 10.0) -> list[float]:
    return [min(cap, first * 2**step) for step in range(count)]


# ---- delays ----------------------------------------------------------------------------


def test_delays_follow_the_doubling_base_with_equal_jitter() -> None:
    backoff = Backoff(rng=random.Random(7))
    for base in bases(12):
        delay = backoff.next_delay(FailureKind.REFUSED)
        assert base / 2 <= delay <= base


def test_jitter_range_ends_are_exactly_half_the_base_and_the_base() -> None:
    low = Backoff(rng=FixedRandom(0.0))
    assert [low.next_delay(FailureKind.REFUSED) for _ in range(8)] == [
        0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0
    ]  # fmt: skip
    high = Backoff(rng=FixedRandom(math.nextafter(1.0, 0.0)))
    delays = [high.next_delay(FailureKind.REFUSED) for _ in range(8)]
    assert delays == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0])
    assert max(delays) <= 10.0


def test_jitter_really_varies() -> None:
    sequences = {
        tuple(Backoff(rng=random.Random(seed)).next_delay(FailureKind.REFUSED) for _ in range(6))
        for seed in range(20)
    }
    assert len(sequences) == 20
    at_cap = Backoff(rng=random.Random(1))
    delays = [at_cap.next_delay(FailureKind.SESSION_LOST) for _ in range(40)][10:]
    assert len(set(delays)) > 20  # senders that lost the same receiver spread out


def test_first_retry_comes_within_half_a_second() -> None:
    for seed in range(200):
        assert 0 < Backoff(rng=random.Random(seed)).next_delay(FailureKind.REFUSED) <= 0.5
    # Even a cap below the first step bounds it.
    assert Backoff(cap_s=0.2, rng=random.Random(1)).next_delay(FailureKind.REFUSED) <= 0.2


def test_default_rng_stays_in_bounds() -> None:
    backoff = Backoff()
    assert 0.25 <= backoff.next_delay(FailureKind.REFUSED) <= 0.5


@pytest.mark.parametrize(
    ("failure", "wait"), [(FailureKind.AUTH_REFUSED, AUTH_RETRY_S), (FailureKind.TLS_VERIFY, 10.0)]
)
def test_refused_token_or_bad_certificate_retries_slowly(failure: FailureKind, wait: float) -> None:
    backoff = Backoff(cap_s=10.0, rng=random.Random(3))
    assert backoff.next_delay(failure) == wait  # straight to the cap or more, never a tight loop
    assert backoff.next_delay(failure) == wait
    # Whatever comes next stays slow: the escalation is at the cap now.
    assert 5.0 <= backoff.next_delay(FailureKind.REFUSED) <= 10.0
    assert backoff.attempts == 3


def test_a_session_the_receiver_turned_away_resets_only_if_healthy() -> None:
    backoff = Backoff(healthy_after_s=10.0, rng=random.Random(5))
    for _ in range(6):
        backoff.next_delay(FailureKind.REFUSED)
    assert backoff.attempts == 6
    backoff.session_ended(9.9, FailureKind.TURNED_AWAY)  # too short to count as healthy
    assert backoff.next_delay(FailureKind.TURNED_AWAY) >= 5.0
    assert backoff.attempts == 7
    backoff.session_ended(10.0, FailureKind.TURNED_AWAY)
    assert backoff.attempts == 0
    assert backoff.next_delay(FailureKind.TURNED_AWAY) <= 0.5
    assert backoff.attempts == 1


@pytest.mark.parametrize(
    "failure", [FailureKind.REFUSED, FailureKind.SESSION_LOST, FailureKind.NOT_LISTENING]
)
def test_a_welcomed_session_the_receiver_went_away_from_resets_however_short(
    failure: FailureKind,
) -> None:
    backoff = Backoff(rng=FixedRandom(math.nextafter(1.0, 0.0)))  # the longest delays
    for _ in range(6):
        backoff.next_delay(FailureKind.REFUSED)
    backoff.session_ended(0.05, failure)
    assert backoff.attempts == 0
    assert backoff.next_delay(FailureKind.REFUSED) <= 0.5


def test_a_receiver_killed_again_and_again_is_rejoined_within_first_s_each_time() -> None:
    """The bench's reconnect phase: the receiver is killed right after our first frame
    reaches it, and restarted, three times in a row."""
    backoff = Backoff(rng=FixedRandom(math.nextafter(1.0, 0.0)))  # the longest delays
    delays = []
    for _ in range(3):
        backoff.session_ended(0.1, FailureKind.REFUSED)  # welcomed, then the connection dropped
        delays.append(backoff.next_delay(FailureKind.REFUSED))
        delays += [backoff.next_delay(FailureKind.NOT_LISTENING) for _ in range(4)]  # restarting
    assert max(delays) <= 0.5, delays


@pytest.mark.parametrize("failure", [FailureKind.TURNED_AWAY, FailureKind.PROTOCOL])
def test_a_receiver_that_turns_welcomed_sessions_away_is_not_a_tight_loop(
    failure: FailureKind,
) -> None:
    """Two senders with one id take the session from each other (goodbye REPLACED): each
    must back off further every time, not reconnect two to four times a second."""
    backoff = Backoff(rng=FixedRandom(0.0))  # the shortest delays jitter allows
    delays = []
    for _ in range(10):
        backoff.session_ended(0.05, failure)
        delays.append(backoff.next_delay(failure))
    assert delays == sorted(delays)
    assert delays[-1] == 5.0
    assert sum(delays) >= 30.0  # ten reconnects take at least half a minute


def test_a_receiver_that_accepts_and_drops_before_the_welcome_is_not_a_tight_loop() -> None:
    backoff = Backoff(rng=FixedRandom(0.0))
    # Never welcomed: session_ended is not called, every failure escalates.
    delays = [backoff.next_delay(FailureKind.REFUSED) for _ in range(10)]
    assert delays == sorted(delays)
    assert sum(delays) >= 30.0


def test_only_the_receiver_going_away_resets_a_short_session() -> None:
    assert {
        FailureKind.NOT_LISTENING,
        FailureKind.REFUSED,
        FailureKind.SESSION_LOST,
    } == RECEIVER_GONE
    assert not RECEIVER_GONE & SLOW_RETRY


def test_slow_retry_kinds_are_the_fatal_ish_ones() -> None:
    assert {FailureKind.AUTH_REFUSED, FailureKind.HELLO_REFUSED, FailureKind.TLS_VERIFY} == (
        SLOW_RETRY
    )
    assert REFUSED_HELLOS < SLOW_RETRY


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: Backoff(first_s=0.0), "first_s"),
        (lambda: Backoff(cap_s=-1.0), "cap_s"),
        (lambda: Backoff(factor=0.5), "factor"),
        (lambda: Backoff(healthy_after_s=-1.0), "healthy_after_s"),
        (lambda: Backoff(first_s=math.nan), "first_s"),
    ],
)
def test_nonsense_settings_are_refused_by_name(make: Callable[[], Backoff], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()


kinds = st.sampled_from(FailureKind)
actions = kinds | st.tuples(st.floats(0.0, 100.0), kinds)  # a failure, or a session's end


@given(
    steps=st.lists(actions, max_size=60),
    first=st.floats(0.01, 2.0),
    cap=st.floats(0.05, 3600.0),
    factor=st.floats(1.0, 10.0),
    seed=st.integers(0, 2**32),
)
def test_any_sequence_keeps_every_delay_within_bounds(
    steps: list[FailureKind | tuple[float, FailureKind]],
    first: float,
    cap: float,
    factor: float,
    seed: int,
) -> None:
    backoff = Backoff(first_s=first, cap_s=cap, factor=factor, rng=random.Random(seed))
    fresh = True  # nothing has escalated since creation or the last reset
    for step in steps:
        if isinstance(step, tuple):
            duration, ended_by = step
            backoff.session_ended(duration, ended_by)
            resets = duration >= backoff.healthy_after_s or ended_by in RECEIVER_GONE
            fresh = fresh or resets
            continue
        delay = backoff.next_delay(step)
        if step in REFUSED_HELLOS:
            assert delay == max(cap, AUTH_RETRY_S)
            fresh = False
            continue
        assert min(first, cap) / 2 <= delay <= cap
        if step in SLOW_RETRY:
            assert delay == cap
        elif step is FailureKind.NOT_LISTENING:
            steady = min(first, cap)  # the backoff clamps its first step to the cap
            assert steady / 2 <= delay <= steady
            continue  # a steady retry: it does not escalate
        elif fresh:
            assert delay <= min(first, cap)
        fresh = False


# ---- classification --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (
            ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
            FailureKind.NOT_LISTENING,
        ),
        (ConnectionResetError(errno.ECONNRESET, "reset"), FailureKind.REFUSED),
        (BrokenPipeError(errno.EPIPE, "broken pipe"), FailureKind.REFUSED),
        (TimeoutError(), FailureKind.REFUSED),
        (OSError(errno.EHOSTUNREACH, "No route to host"), FailureKind.REFUSED),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), FailureKind.REFUSED),
        (asyncio.IncompleteReadError(b"AV", 8), FailureKind.REFUSED),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), FailureKind.REFUSED),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), FailureKind.TLS_VERIFY),
        (ssl.SSLError(1, "wrong version number"), FailureKind.PROTOCOL),
        (AuthError("the receiver refused this sender's token"), FailureKind.AUTH_REFUSED),
        (RemoteProtocolError("bad magic: not an avd peer"), FailureKind.PROTOCOL),
        (FrameTooLarge("media of 4294967295 bytes exceeds 8388625"), FailureKind.PROTOCOL),
        (LocalProtocolError("cannot send Media"), FailureKind.PROTOCOL),
        (ValueError("something unforeseen"), FailureKind.PROTOCOL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else value.name,
)
def test_classify_maps_exceptions_to_kinds(exc: BaseException, kind: FailureKind) -> None:
    assert classify(exc) is kind


@pytest.mark.parametrize(
    ("exc", "phrase"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "x"), "receiver refused the connection"),
        (TimeoutError(), "receiver did not answer in time"),
        (
            ConnectionResetError(errno.ECONNRESET, "x"),
            "connection dropped (by the receiver or the network)",
        ),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "receiver unreachable: Network"),
        (ssl.SSLEOFError(8, "EOF"), "connection dropped during the TLS handshake"),
        (RemoteProtocolError("bad magic: not an avd peer"), "receiver broke the protocol: bad"),
        (LocalProtocolError("cannot send Hello"), "protocol error on our side (a bug)"),
        (KeyError("x"), "unexpected KeyError"),
    ],
)
def test_descriptions_say_what_happened(exc: BaseException, phrase: str) -> None:
    assert describe_failure(classify(exc), exc).startswith(phrase)


def test_auth_description_never_repeats_the_error_text() -> None:
    exc = AuthError("token tk_SECRET_VALUE refused")  # even if some code put one there
    said = describe_failure(classify(exc), exc)
    assert said.startswith("token refused by the receiver (check AVD_SENDER_ID")
    assert "SECRET" not in said


def test_session_lost_description_with_and_without_a_cause() -> None:
    assert describe_failure(FailureKind.SESSION_LOST) == "session ended"
    cause = RuntimeError("receiver said goodbye: shutdown")
    assert describe_failure(FailureKind.SESSION_LOST, cause) == (
        "session ended: receiver said goodbye: shutdown"
    )


# ---- real failures on loopback ---------------------------------------------------------

Server = Callable[[socket.socket], None]


def fail_to_connect(
    serve: Server | None, client_context: ssl.SSLContext, server_name: str = "127.0.0.1"
) -> BaseException:
    """Runs ``serve`` on one accepted loopback connection; returns what the client raised."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if serve is None:
        listener.close()  # nothing listens on the port any more: connection refused
        thread = None
    else:
        thread = threading.Thread(target=accept_once, args=(listener, serve), daemon=True)
        thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            tls.sendall(b"AV")
            tls.recv(16)
    except Exception as exc:
        return exc
    finally:
        if thread is not None:
            thread.join(timeout=10)
    raise AssertionError("the connection unexpectedly worked")


def accept_once(listener: socket.socket, serve: Server) -> None:
    with listener:
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            # The server side's own view of the failure (an OSError) is not under test.
            with contextlib.suppress(OSError):
                serve(conn)


def tls_server(context: ssl.SSLContext) -> Server:
    def serve(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(16)

    return serve


def receiver(pki: CertPaths, client_ca: CertPaths | None = None) -> Server:
    ca = None if client_ca is None else client_ca.ca_cert
    return tls_server(receiver_context(cert=pki.receiver_cert, key=pki.receiver_key, client_ca=ca))


def test_real_receiver_certificate_from_another_ca(pki: CertPaths, other_pki: CertPaths) -> None:
    exc = fail_to_connect(receiver(pki), sender_context(ca=other_pki.ca_cert))
    assert classify(exc) is FailureKind.TLS_VERIFY
    assert describe_failure(classify(exc), exc) == (
        "receiver certificate not trusted: unable to get local issuer certificate (is "
        "AVD_TLS_CA the ca.crt of the `avd certs init` that made the receiver's?)"
    )


def test_real_receiver_certificate_for_another_name(pki: CertPaths) -> None:
    exc = fail_to_connect(receiver(pki), sender_context(ca=pki.ca_cert), "wrong.example")
    assert classify(exc) is FailureKind.TLS_VERIFY
    text = describe_failure(classify(exc), exc)
    assert text.startswith("receiver certificate not trusted: Hostname mismatch")
    assert "wrong.example" in text
    assert text.endswith(
        "(AVD_RECEIVER_HOST (or AVD_TLS_SERVER_NAME) must be a name or address in the "
        "receiver's certificate: avd certs renew --hosts adds it)"
    )


def test_real_expired_receiver_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class MonthAgo(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> MonthAgo:
            return cls.fromtimestamp((datetime.now(tz) - timedelta(days=30)).timestamp(), tz)

    monkeypatch.setattr(certs, "datetime", MonthAgo)
    expired = init_certs(tmp_path, ["127.0.0.1"], days=1)  # ended four weeks ago
    monkeypatch.undo()
    exc = fail_to_connect(receiver(expired), sender_context(ca=expired.ca_cert))
    assert classify(exc) is FailureKind.TLS_VERIFY
    assert describe_failure(classify(exc), exc) == (
        "receiver certificate not trusted: certificate has expired (renew it on the "
        "receiver's machine: avd certs renew)"
    )


def test_real_missing_client_certificate(pki: CertPaths) -> None:
    exc = fail_to_connect(receiver(pki, client_ca=pki), sender_context(ca=pki.ca_cert))
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError):
        # TLS 1.3: the server refuses the missing certificate after the client's handshake;
        # whether the client reads its alert or the reset that follows is a race.
        assert classify(exc) is FailureKind.REFUSED
        return
    assert classify(exc) is FailureKind.TLS_VERIFY
    assert describe_failure(classify(exc), exc).startswith(
        "receiver refused our client certificate: TLSV13_ALERT_CERTIFICATE_REQUIRED"
    )


def test_real_plain_text_server_is_a_protocol_failure(pki: CertPaths) -> None:
    def http(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    exc = fail_to_connect(http, sender_context(ca=pki.ca_cert))
    assert classify(exc) is FailureKind.PROTOCOL
    assert describe_failure(classify(exc), exc).startswith("TLS handshake failed: ")


def test_real_closed_port_and_dropped_handshake_are_network_failures(pki: CertPaths) -> None:
    refused = fail_to_connect(None, sender_context(ca=pki.ca_cert))
    assert isinstance(refused, ConnectionRefusedError)
    assert classify(refused) is FailureKind.NOT_LISTENING
    assert describe_failure(classify(refused), refused) == "receiver refused the connection"

    dropped = fail_to_connect(lambda conn: None, sender_context(ca=pki.ca_cert))
    assert classify(dropped) is FailureKind.REFUSED, repr(dropped)


def test_a_receiver_that_is_not_listening_is_retried_steadily_without_escalation() -> None:
    backoff = Backoff(first_s=0.5, cap_s=10.0, rng=random.Random(7))
    delays = [backoff.next_delay(FailureKind.NOT_LISTENING) for _ in range(50)]
    assert all(0.25 <= d <= 0.5 for d in delays), delays
    # ...and it does not feed the escalation of other failures either.
    assert backoff.next_delay(FailureKind.REFUSED) <= 0.5


def test_not_listening_never_exceeds_a_small_cap() -> None:
    backoff = Backoff(first_s=0.5, cap_s=0.6, rng=random.Random(3))
    assert all(backoff.next_delay(FailureKind.NOT_LISTENING) <= 0.6 for _ in range(20))


def test_a_refused_token_never_trips_the_receivers_default_lockout() -> None:
    """Both streams of a sender with a wrong token, retrying as the backoff says: in no
    60 s window do they fail AVD_AUTH_MAX_FAILURES (5) times, the receiver's defaults, nor
    even 3, so that two runs of `avd check sender` (a refused hello each) fit beside."""
    defaults = ReceiverSettings.model_fields
    max_failures = defaults["auth_max_failures"].default
    window_s = defaults["auth_window_s"].default
    failures: list[float] = []
    cap = SenderSettings.model_fields["reconnect_max_s"].default
    for _stream in ("video", "audio"):
        backoff, now = Backoff(cap_s=cap), 0.0
        for _ in range(40):
            failures.append(now)
            now += backoff.next_delay(FailureKind.AUTH_REFUSED)
    failures.sort()
    most = max(sum(1 for t in failures if start <= t < start + window_s) for start in failures)
    assert most <= max_failures - 3
