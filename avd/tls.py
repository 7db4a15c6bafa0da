"""The TLS contexts of the receiver (server) and the sender (client), and TLS diagnostics.

Policy, the same at both ends:

- TLS 1.3 only by default: every 1.3 cipher suite is an AEAD with forward secrecy. With
  ``allow_tls12`` (for old peers) TLS 1.2 is accepted too, limited to ECDHE key exchange with
  AES-GCM or ChaCha20-Poly1305: no RSA key transport, no CBC.
- The sender trusts only the CA it is given (not the system store) and checks the host name.
- With a client CA the receiver requires a client certificate signed by it (mutual TLS).
- Chains are checked with ``VERIFY_X509_STRICT`` (Python 3.13's default): certificates from
  ``avd.certs`` meet it, and malformed ones are refused rather than tolerated.

Files that cannot be used raise ConfigError naming the variable (``AVD_TLS_CERT``, ...), the
path and the reason, instead of OpenSSL's "PEM lib".
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path
from typing import NamedTuple

from avd.errors import ConfigError

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKER = b"PRIVATE KEY-----"


def receiver_context(
    *, cert: Path, key: Path, client_ca: Path | None = None, allow_tls12: bool = False
) -> ssl.SSLContext:
    """The server context: our certificate and key, and client certificates if ``client_ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(context, allow_tls12)
    # No session resumption: sessions are long-lived streams, so resuming would save one
    # handshake per reconnect at the price of ticket keys living in memory.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    _load_chain(context, cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, client_ca, "AVD_TLS_CLIENT_CA")
    return context


def sender_context(
    *, ca: Path, cert: Path | None = None, key: Path | None = None, allow_tls12: bool = False
) -> ssl.SSLContext:
    """The client context: trusts ``ca`` alone, checks the host name, may present a cert."""
    if (cert is None) != (key is None):
        raise ConfigError("AVD_TLS_CERT and AVD_TLS_KEY must be set together (for mutual TLS)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_policy(context, allow_tls12)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    _load_ca(context, ca, "AVD_TLS_CA")
    if cert is not None and key is not None:
        _load_chain(context, cert, key)
    return context


def describe_tls(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[str, str]:
    """``(version, cipher)`` of an established connection, e.g. ``("TLSv1.3", "TLS_AES_...")``."""
    if ssl_object is None:
        return ("none", "none")
    cipher = ssl_object.cipher()
    return (ssl_object.version() or "none", cipher[0] if cipher else "none")


class FileProblem(NamedTuple):
    text: str  # what is wrong, naming the file
    remedy: str  # the command that mends it; empty when there is none to give

    def __str__(self) -> str:
        return f"{self.text}: run {self.remedy}" if self.remedy else self.text


def key_permission_problems(path: Path, what: str = "private key") -> list[FileProblem]:
    """What is wrong with who may read or write a secret file (a private key, or ``what`` it
    is: a sender's token), in one line at most: every class of users at fault in it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        return [FileProblem(f"cannot check the permissions of {path}: {exc.strerror or exc}", "")]
    grants = []
    for who, read_bit, write_bit in (
        ("group", stat.S_IRGRP, stat.S_IWGRP),
        ("others", stat.S_IROTH, stat.S_IWOTH),
    ):
        access = " and ".join(
            verb for verb, bit in (("readable", read_bit), ("writable", write_bit)) if mode & bit
        )
        if access:
            grants.append((access, who))
    if not grants:
        return []
    if len({access for access, _ in grants}) == 1:  # "readable by group and others"
        said = f"{grants[0][0]} by {' and '.join(who for _, who in grants)}"
    else:  # "readable by group, readable and writable by others"
        said = ", ".join(f"{access} by {who}" for access, who in grants)
    return [FileProblem(f"{what} {path} is {said} (mode {mode:04o})", f"chmod 600 {path}")]


def _apply_policy(context: ssl.SSLContext, allow_tls12: bool) -> None:
    if allow_tls12:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # Applies to TLS 1.2 only; OpenSSL keeps the 1.3 suites (all AEAD) separately.
        context.set_ciphers(TLS12_CIPHERS)
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    # Compression under encryption leaks plaintext lengths (CRIME); the flag is on by default
    # in recent Pythons and set here so it never depends on that.
    context.options |= ssl.OP_NO_COMPRESSION
    context.verify_flags |= ssl.VERIFY_X509_STRICT


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    _require_pem(cert, "AVD_TLS_CERT", _CERT_MARKER, "a PEM certificate")
    _require_pem(key, "AVD_TLS_KEY", _KEY_MARKER, "a PEM private key")

    def refuse_encrypted_key() -> bytes:
        # Without this callback OpenSSL would prompt on the terminal of a daemon.
        raise ConfigError(
            f"AVD_TLS_KEY={key}: the key is encrypted; avd needs an unencrypted key"
            " protected by its file mode (0600)"
        )

    try:
        context.load_cert_chain(cert, key, password=refuse_encrypted_key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            reason = "the key does not match the certificate"
        else:
            reason = f"OpenSSL refused them: {exc}"
        raise ConfigError(f"AVD_TLS_CERT={cert}, AVD_TLS_KEY={key}: {reason}") from exc


def _load_ca(context: ssl.SSLContext, ca: Path, variable: str) -> None:
    _require_pem(ca, variable, _CERT_MARKER, "a PEM certificate")
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"{variable}={ca}: OpenSSL refused it: {exc}") from exc


def _require_pem(path: Path, variable: str, marker: bytes, what: str) -> None:
    """ConfigError unless ``path`` can be read and holds ``marker``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{variable}={path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{variable}={path}: cannot read it: {exc.strerror or exc}") from None
    if marker not in data:
        raise ConfigError(f"{variable}={path}: not {what}")
