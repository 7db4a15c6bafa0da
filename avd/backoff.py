"""How long a stream waits before reconnecting, and why it failed, in words for the log.

Pure: no sleeping, no clock reads, randomness injectable. Each stream owns one ``Backoff``
and reconnects for ever:

- the first retry comes within ``first_s`` (0.5 s), then the base doubles up to ``cap_s``
  (``AVD_RECONNECT_MAX_S``, 10 s by default);
- each delay is drawn from ``[base / 2, base]`` ("equal jitter" in the AWS Architecture
  Blog's "Exponential Backoff And Jitter"): the random half spreads senders that lost the
  same receiver, the fixed half keeps a floor so a retry is never near-immediate;
- a refused token, a hello turned away (its stream on the other port) or an untrusted
  certificate will not fix itself in half a second, so those retry at the cap, and the
  escalation stays there for whatever comes next; a refused hello waits at least
  ``AUTH_RETRY_S`` (65 s), so as not to lock itself out (below);
- a failure before the receiver's welcome escalates: a receiver that accepts and drops at
  once (or a network that does) must not put us in a tight loop;
- a welcomed session resets the escalation when it ends because the receiver went away
  (the connection dropped or timed out, or a goodbye that does not blame us: shutdown,
  timeout), however short it was: that is a receiver restarting, and the next one may come
  seconds later, so the first retry comes within ``first_s`` every time. The cost: a
  receiver that welcomes and drops at once is retried at that pace, each time one TLS
  handshake and one hello, which it brings on itself;
- a welcomed session the receiver ended with a cause (another sender took our id,
  ``REPLACED``; it is ``OVERLOADED``; a ``PROTOCOL_ERROR``) keeps escalating, so two senders
  with one id do not take the session from each other twice a second; it resets only if
  it was healthy (lasted ``healthy_after_s``);
- a refused connection (the receiver's host answers but nothing listens: the daemon is
  restarting) is retried every ``first_s / 2`` to ``first_s``, without escalating: each try
  costs the receiver's kernel one RST, and the stream is back within half a second of the
  receiver's return, where doubling delays would leave it waiting up to the cap.
"""

from __future__ import annotations

import enum
import random
import ssl

from avd.errors import AuthError, LocalProtocolError, ProtocolError


class FailureKind(enum.Enum):
    NOT_LISTENING = "not-listening"  # connection refused: the host is up, the daemon is not
    REFUSED = "refused"  # network: unreachable, timed out, reset
    TLS_VERIFY = "tls-verify"  # a certificate was not trusted (theirs by us, or ours by them)
    AUTH_REFUSED = "auth-refused"  # the receiver refused the hello's token
    HELLO_REFUSED = "hello-refused"  # the token was right; the hello not (its port, format)
    PROTOCOL = "protocol"  # the peer broke the protocol, or says that we did
    SESSION_LOST = "session-lost"  # the receiver ended a welcomed session, not blaming us
    TURNED_AWAY = "turned-away"  # it ended one for another sender with our id, or overloaded


# Failures a retry cannot fix until someone changes a file: retried at the cap.
SLOW_RETRY = frozenset(
    {FailureKind.AUTH_REFUSED, FailureKind.HELLO_REFUSED, FailureKind.TLS_VERIFY}
)
# Of those, the hellos the receiver turned away: retried no sooner than AUTH_RETRY_S.
REFUSED_HELLOS = frozenset({FailureKind.AUTH_REFUSED, FailureKind.HELLO_REFUSED})

# A refused token is retried no sooner than this, whatever the cap: over the receiver's
# default window (5 failed authentications from one address within 60 s refuse it for 10
# minutes, AVD_AUTH_*), so a sender's two streams fail at most twice in any such window,
# leaving room for the operator's `avd check sender` runs. At the 10 s cap, a sender with
# a wrong token locked its address out within 20 s: it was refused for 10 minutes more
# after its token was put right, and so was every other sender behind that address.
AUTH_RETRY_S = 65.0

# How a welcomed session ends when the receiver went away (killed, restarted, unplugged)
# rather than turned us away: such an end resets the escalation, however short the session.
RECEIVER_GONE = frozenset(
    {FailureKind.NOT_LISTENING, FailureKind.REFUSED, FailureKind.SESSION_LOST}
)


class Backoff:
    """Jittered, capped, exponential reconnect delays for one stream.

    ``attempts`` counts the failures since the last reset (creation, or a welcomed session
    that was healthy or ended because the receiver went away).
    """

    def __init__(
        self,
        first_s: float = 0.5,
        cap_s: float = 10.0,
        factor: float = 2.0,
        rng: random.Random | None = None,
        healthy_after_s: float = 10.0,
    ) -> None:
        if not first_s > 0:
            raise ValueError(f"Backoff first_s must be > 0, got {first_s}")
        if not cap_s > 0:
            raise ValueError(f"Backoff cap_s must be > 0, got {cap_s}")
        if not factor >= 1:
            raise ValueError(f"Backoff factor must be >= 1, got {factor}")
        if not healthy_after_s >= 0:
            raise ValueError(f"Backoff healthy_after_s must be >= 0, got {healthy_after_s}")
        self.first_s = min(first_s, cap_s)  # a cap below 0.5 s still bounds the first retry
        self.cap_s = cap_s
        self.factor = factor
        self.healthy_after_s = healthy_after_s
        self._rng = rng or random.Random()
        self._base = self.first_s
        self.attempts = 0

    def next_delay(self, failure: FailureKind) -> float:
        """Seconds to wait before the next attempt, after ``failure``; escalates."""
        self.attempts += 1
        if failure in SLOW_RETRY:
            self._base = self.cap_s
            if failure in REFUSED_HELLOS:
                return max(self.cap_s, AUTH_RETRY_S)
            return self.cap_s
        if failure is FailureKind.NOT_LISTENING:
            return min(self.cap_s, self._rng.uniform(self.first_s / 2, self.first_s))
        base = self._base
        # Kept as a base (not an exponent) so endless failures cannot overflow a float.
        self._base = min(self.cap_s, base * self.factor)
        return min(base, self._rng.uniform(base / 2, base))  # min(): uniform may round up

    def session_ended(self, duration_s: float, failure: FailureKind) -> None:
        """A welcomed session ended after ``duration_s`` because of ``failure``; call it
        before ``next_delay``. Resets the escalation if the session was healthy or if the
        receiver went away (``RECEIVER_GONE``); a receiver that turned us away does not."""
        if duration_s >= self.healthy_after_s or failure in RECEIVER_GONE:
            self._base = self.first_s
            self.attempts = 0


def classify(exc: BaseException) -> FailureKind:
    """Which kind of failure ``exc`` is. Order matters: ssl errors are OSErrors."""
    if isinstance(exc, AuthError):
        return FailureKind.AUTH_REFUSED
    if isinstance(exc, ProtocolError):
        return FailureKind.PROTOCOL
    if isinstance(exc, ssl.SSLCertVerificationError) or _certificate_alert(exc):
        return FailureKind.TLS_VERIFY
    # The peer went away during the TLS handshake: a network failure, not a TLS one.
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return FailureKind.REFUSED
    if isinstance(exc, ssl.SSLError):
        return FailureKind.PROTOCOL  # not speaking our TLS: wrong port, version, cipher
    if isinstance(exc, ConnectionRefusedError):
        return FailureKind.NOT_LISTENING
    if isinstance(exc, OSError | EOFError):  # ConnectionError and TimeoutError are OSErrors
        return FailureKind.REFUSED
    return FailureKind.PROTOCOL


def _certificate_alert(exc: BaseException) -> bool:
    """The peer refused our certificate (e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED)."""
    if not isinstance(exc, ssl.SSLError):
        return False
    reason = _ssl_reason(exc)
    return "CERTIFICATE" in reason or "UNKNOWN_CA" in reason


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's short reason; only errors raised by the ssl module itself carry one."""
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) and reason else str(exc)


def describe_failure(kind: FailureKind, exc: BaseException | None = None) -> str:
    """A short phrase for the log line. Never includes a token (nor the AuthError text)."""
    if kind is FailureKind.AUTH_REFUSED:
        return f"token refused by the receiver ({REFUSED_HELLO_HINT})"
    if kind is FailureKind.TLS_VERIFY:
        return _describe_tls(exc)
    if kind in (FailureKind.REFUSED, FailureKind.NOT_LISTENING):
        return _describe_network(exc)
    if kind is FailureKind.PROTOCOL:
        if isinstance(exc, LocalProtocolError):
            return f"protocol error on our side (a bug): {exc}"
        if isinstance(exc, ssl.SSLError):
            return f"TLS handshake failed: {_ssl_reason(exc)}"
        if exc is not None and not isinstance(exc, ProtocolError):
            return f"unexpected {type(exc).__name__}: {exc}"
        return _with_detail("receiver broke the protocol", exc)
    return _with_detail("session ended", exc)


# What to do about a refused token: the receiver never says why (a wrong id, a wrong token,
# a token it has not reloaded), so the sender names all three.
REFUSED_HELLO_HINT = (
    "check AVD_SENDER_ID, and that the receiver's tokens file has this token's hash and was "
    "reloaded since"
)

# What to do about the usual certificate failures, by OpenSSL's X509_V_ERR_* code: its
# messages ("unable to get local issuer certificate") do not say which setting is wrong.
_WRONG_CA = "is AVD_TLS_CA the ca.crt of the `avd certs init` that made the receiver's?"
_WRONG_NAME = (
    "AVD_RECEIVER_HOST (or AVD_TLS_SERVER_NAME) must be a name or address in the receiver's "
    "certificate: avd certs renew --hosts adds it"
)
_VERIFY_HINTS = {
    2: _WRONG_CA,  # unable to get issuer certificate
    18: _WRONG_CA,  # self-signed certificate
    19: _WRONG_CA,  # self-signed certificate in the chain
    20: _WRONG_CA,  # unable to get local issuer certificate
    21: _WRONG_CA,  # unable to verify the first certificate
    62: _WRONG_NAME,  # host name mismatch
    64: _WRONG_NAME,  # IP address mismatch
    9: "is this machine's clock right?",  # not yet valid
    10: "renew it on the receiver's machine: avd certs renew",  # expired
}


def verify_hint(exc: ssl.SSLCertVerificationError) -> str | None:
    """What to change when the receiver's certificate was not trusted, if known."""
    return _VERIFY_HINTS.get(getattr(exc, "verify_code", 0) or 0)


def _describe_tls(exc: BaseException | None) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = (getattr(exc, "verify_message", None) or _ssl_reason(exc)).rstrip(".")
        hint = verify_hint(exc)
        return f"receiver certificate not trusted: {why}" + (f" ({hint})" if hint else "")
    if isinstance(exc, ssl.SSLError):
        return f"receiver refused our client certificate: {_ssl_reason(exc)}"
    return _with_detail("certificate not trusted", exc)


def _describe_network(exc: BaseException | None) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "receiver refused the connection"
    if isinstance(exc, TimeoutError):
        return "receiver did not answer in time"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return "connection dropped (by the receiver or the network)"
    if isinstance(exc, ssl.SSLError | EOFError):
        return "connection dropped during the TLS handshake"
    if isinstance(exc, OSError) and exc.strerror:
        return f"receiver unreachable: {exc.strerror}"
    return _with_detail("receiver unreachable", exc)


def _with_detail(phrase: str, exc: BaseException | None) -> str:
    detail = str(exc) if exc is not None else ""
    return f"{phrase}: {detail}" if detail else phrase
