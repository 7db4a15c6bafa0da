"""A private certificate authority and the two leaf certificates avd needs (`cryptography`).

``init_certs`` writes, into one directory:

- ``ca.crt`` / ``ca.key``: a self-signed CA that signs the two leaves below and nothing else;
- ``receiver.crt`` / ``receiver.key``: the receiver's server certificate, valid for the given
  host names and IP addresses (subjectAltName), extended key usage serverAuth only;
- ``sender.crt`` / ``sender.key``: a client certificate (CN and DNS name ``avd-sender``,
  clientAuth only) for mutual TLS.

Keys are ECDSA P-256: small, fast to sign and accepted by every TLS 1.3 stack. Keys are
created with mode 0600 before a byte of them is written, every file is written atomically
(a temporary file in the same directory, then ``os.replace``), and nothing is overwritten
without ``force``.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from avd.atomicfile import write_atomically
from avd.errors import CertsExistError, ConfigError

KEY_MODE = 0o600
CERT_MODE = 0o644
DIRECTORY_MODE = 0o700
# Certificates start one hour in the past so that a peer whose clock is a little behind
# still accepts a certificate made a moment ago.
CLOCK_SKEW = timedelta(hours=1)
SENDER_COMMON_NAME = "avd-sender"
RECEIVER_COMMON_NAME = "avd-receiver"


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where the six files of one ``init_certs`` run live."""

    ca_cert: Path
    ca_key: Path
    receiver_cert: Path
    receiver_key: Path
    sender_cert: Path
    sender_key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> CertPaths:
        return cls(
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            receiver_cert=directory / "receiver.crt",
            receiver_key=directory / "receiver.key",
            sender_cert=directory / "sender.crt",
            sender_key=directory / "sender.key",
        )

    def all(self) -> tuple[Path, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def secret(self) -> tuple[Path, ...]:
        """The private keys: the files that must never leave their machine or be group-readable."""
        return (self.ca_key, self.receiver_key, self.sender_key)


@dataclass(frozen=True, slots=True)
class _Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@dataclass(frozen=True, slots=True)
class _Validity:
    start: datetime
    end: datetime


def default_hosts() -> list[str]:
    """The names a receiver on this machine is reached by when no host is given."""
    return ["localhost", "127.0.0.1", "::1", socket.gethostname()]


def init_certs(
    directory: Path, hosts: Sequence[str], days: int = 825, force: bool = False
) -> CertPaths:
    """Make the CA, the receiver's and the sender's certificates in ``directory``.

    825 days is the longest validity the CA/Browser Forum allowed for a server certificate;
    clients that enforce such limits accept it. Raises CertsExistError naming the files that
    exist unless ``force``, and ConfigError for an unusable host name.
    """
    if days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, got {days}")
    alt_names = [_alt_name(host) for host in _unique(hosts)]
    if not alt_names:
        raise ConfigError("the receiver certificate needs at least one host name or address")
    paths = CertPaths.in_directory(directory)
    existing = [p for p in paths.all() if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise CertsExistError(f"refusing to overwrite {names} (use --force to replace them)")
    _make_directory(directory)
    # One validity for all three, so that no leaf outlives its CA.
    valid = _validity(days)
    ca = _make_ca(valid)
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    receiver = _make_leaf(ca, valid, RECEIVER_COMMON_NAME, server, alt_names)
    # The sender's name goes in a subjectAltName too: strict verifiers (RFC 5280 profiles,
    # `cryptography`'s own) refuse a leaf without one.
    sender_alt_names: list[x509.GeneralName] = [x509.DNSName(SENDER_COMMON_NAME)]
    sender = _make_leaf(ca, valid, SENDER_COMMON_NAME, client, sender_alt_names)
    # Keys first, so a certificate never sits on disk without its key.
    for issued, key_path, cert_path in (
        (ca, paths.ca_key, paths.ca_cert),
        (receiver, paths.receiver_key, paths.receiver_cert),
        (sender, paths.sender_key, paths.sender_cert),
    ):
        write_atomically(key_path, _key_pem(issued.key), mode=KEY_MODE)
        cert_pem = issued.cert.public_bytes(serialization.Encoding.PEM)
        write_atomically(cert_path, cert_pem, mode=CERT_MODE)
    return paths


def format_init_report(paths: CertPaths) -> str:
    """The lines ``avd certs init`` prints: what was written, what is secret and where it goes."""
    roles = [
        (paths.ca_cert, "CA certificate, public: AVD_TLS_CA (senders), AVD_TLS_CLIENT_CA"),
        (paths.ca_key, "CA key, SECRET: only to issue certificates; keep it offline"),
        (paths.receiver_cert, "receiver certificate, public: AVD_TLS_CERT (receiver)"),
        (paths.receiver_key, "receiver key, SECRET: AVD_TLS_KEY (receiver)"),
        (paths.sender_cert, "sender certificate, public: AVD_TLS_CERT (senders, mutual TLS)"),
        (paths.sender_key, "sender key, SECRET: AVD_TLS_KEY (senders, mutual TLS)"),
    ]
    width = max(len(str(path)) for path, _ in roles)
    lines = [f"wrote {path!s:<{width}}  {role}" for path, role in roles]
    lines.append(
        "Keys have mode 0600: copy each only to the machine that uses it, over a secure channel."
    )
    return "\n".join(lines)


def cert_not_after(path: Path) -> datetime:
    """The end of a PEM certificate's validity, as an aware UTC datetime."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate: {exc}") from exc
    return cert.not_valid_after_utc


def seconds_until_expiry(path: Path, now: datetime | None = None) -> float:
    """Seconds from ``now`` (default: the current time) until the certificate expires."""
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return (cert_not_after(path) - now).total_seconds()


def _unique(hosts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(hosts))


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or not host.isascii() or any(c.isspace() or c in "/:@" for c in host):
        raise ConfigError(f"{host!r} is neither an IP address nor a DNS host name")
    return x509.DNSName(host.lower())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "avd"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> _Validity:
    now = datetime.now(UTC)
    return _Validity(now - CLOCK_SKEW, now + timedelta(days=days))


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, valid: _Validity
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid.start)
        .not_valid_after(valid.end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _make_ca(valid: _Validity) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix tells apart the CAs of two `certs init` runs in logs and trust stores.
    name = _name(f"avd CA {secrets.token_hex(4)}")
    cert = (
        _builder(name, name, key.public_key(), valid)
        # path_length=0: this CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _Issued(key, cert)


def _make_leaf(
    ca: _Issued,
    valid: _Validity,
    common_name: str,
    usage: x509.ObjectIdentifier,
    alt_names: list[x509.GeneralName],
) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(_name(common_name), ca.cert.subject, key.public_key(), valid)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        # One purpose per leaf: the sender's key cannot pose as a receiver, nor the reverse.
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    )
    return _Issued(key, builder.sign(ca.key, hashes.SHA256()))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # A CA signs certificates (and CRLs); a leaf signs TLS handshakes (ECDSA: digitalSignature).
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: daemons start unattended; the file mode is the protection.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    directory.mkdir(parents=True, mode=DIRECTORY_MODE)
    directory.chmod(DIRECTORY_MODE)  # mkdir's mode is filtered by the umask
