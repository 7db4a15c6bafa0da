"""A private certificate authority and the two leaf certificates avd needs (`cryptography`).

``init_certs`` writes, into one directory:

- ``ca.crt`` / ``ca.key``: a self-signed CA that signs the two leaves below and nothing else,
  valid for ``CA_DAYS`` (ten years) so that ``renew_certs`` can issue new leaves from it
  while every sender keeps its ``ca.crt``;
- ``receiver.crt`` / ``receiver.key``: the receiver's server certificate, valid for the given
  host names and IP addresses (subjectAltName), extended key usage serverAuth only;
- ``sender.crt`` / ``sender.key``: a client certificate (CN and DNS name ``avd-sender``,
  clientAuth only) for mutual TLS.

Keys are ECDSA P-256: small, fast to sign and accepted by every TLS 1.3 stack. Keys are
created with mode 0600 before a byte of them is written, every file is written atomically
(a temporary file in the same directory, then ``os.replace``), and nothing is overwritten
without ``force``. ``renew_certs`` replaces the two leaves (new keys, the receiver's host
names kept unless given) and leaves the CA alone.
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

from avd.atomicfile import write_all_atomically
from avd.errors import CertsExistError, ConfigError

KEY_MODE = 0o600
CERT_MODE = 0o644
DIRECTORY_MODE = 0o700
# Certificates start one hour in the past so that a peer whose clock is a little behind
# still accepts a certificate made a moment ago.
CLOCK_SKEW = timedelta(hours=1)
# The CA outlives its leaves, so that they can be renewed without a new ca.crt on every sender.
CA_DAYS = 3650
# From this many days before a certificate's end, the daemons and `avd check` warn, and
# `avd certs renew` will not issue leaves from a CA that has less left.
EXPIRY_WARNING_DAYS = 30
# For the throwaway certificates of `avd demo`, `avd bench` and the soak: long enough that
# the daemons do not warn of their end.
SHORT_LIVED_DAYS = EXPIRY_WARNING_DAYS + 1
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
    clients that enforce such limits accept it. The CA lasts CA_DAYS (or ``days``, if
    longer): ``renew_certs`` issues new leaves from it. Raises CertsExistError naming the
    files that exist unless ``force``, and ConfigError for an unusable host name.
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
    start = datetime.now(UTC) - CLOCK_SKEW
    ca = _make_ca(_Validity(start, start + CLOCK_SKEW + timedelta(days=max(days, CA_DAYS))))
    leaves = _Validity(start, start + CLOCK_SKEW + timedelta(days=days))
    _issue_leaves(paths, ca, leaves, alt_names, with_ca=True)
    return paths


def renew_certs(
    directory: Path,
    hosts: Sequence[str] | None = None,
    days: int = 825,
    ca_key: Path | None = None,
) -> datetime:
    """Issue the receiver and the sender new certificates and keys from the CA in
    ``directory`` (its key from ``ca_key`` if it is kept elsewhere); returns their end.
    Senders keep their ``ca.crt``.

    The receiver's host names are those of the current ``receiver.crt`` unless ``hosts`` are
    given. A leaf never outlives its CA: it ends with the CA if that comes first. Raises
    ConfigError naming the file or the host at fault, and when the CA itself has less than
    EXPIRY_WARNING_DAYS left (then only a new CA, and its ca.crt on every sender, will do).
    """
    if days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, got {days}")
    paths = CertPaths.in_directory(directory)
    ca = _load_ca(paths.ca_cert, ca_key or paths.ca_key)
    if hosts:
        alt_names = [_alt_name(host) for host in _unique(hosts)]
    else:
        alt_names = _receiver_alt_names(paths.receiver_cert)
    start = datetime.now(UTC) - CLOCK_SKEW
    ca_end = ca.cert.not_valid_after_utc
    if ca_end - start < timedelta(days=EXPIRY_WARNING_DAYS):
        raise ConfigError(
            f"the CA {paths.ca_cert} ends on {ca_end:%Y-%m-%d}: make a new one with "
            "`avd certs init --force` and give its ca.crt to every sender"
        )
    end = min(start + CLOCK_SKEW + timedelta(days=days), ca_end)
    _issue_leaves(paths, ca, _Validity(start, end), alt_names, with_ca=False)
    return cert_not_after(paths.receiver_cert)  # as stored: whole seconds


def _issue_leaves(
    paths: CertPaths,
    ca: _Issued,
    valid: _Validity,
    alt_names: list[x509.GeneralName],
    *,
    with_ca: bool,
) -> None:
    """Make the receiver's and the sender's certificates and write them (and, ``with_ca``,
    the CA's files) atomically, each key before its certificate."""
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    receiver = _make_leaf(ca, valid, RECEIVER_COMMON_NAME, server, alt_names)
    # The sender's name goes in a subjectAltName too: strict verifiers (RFC 5280 profiles,
    # `cryptography`'s own) refuse a leaf without one.
    sender_alt_names: list[x509.GeneralName] = [x509.DNSName(SENDER_COMMON_NAME)]
    sender = _make_leaf(ca, valid, SENDER_COMMON_NAME, client, sender_alt_names)
    issued = [
        (receiver, paths.receiver_key, paths.receiver_cert),
        (sender, paths.sender_key, paths.sender_cert),
    ]
    if with_ca:
        issued.insert(0, (ca, paths.ca_key, paths.ca_cert))
    # All or none (a full disk changes nothing); keys first, so that a certificate never
    # sits on disk without its key.
    files: list[tuple[Path, bytes, int]] = []
    for made, key_path, cert_path in issued:
        files.append((key_path, _key_pem(made.key), KEY_MODE))
        files.append((cert_path, made.cert.public_bytes(serialization.Encoding.PEM), CERT_MODE))
    write_all_atomically(files)


def _load_ca(cert_path: Path, key_path: Path) -> _Issued:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(
            f"cannot read {exc.filename}: {exc.strerror or exc} (renewing needs the CA's "
            "ca.crt and ca.key from `avd certs init`; --ca-key if the key is kept elsewhere)"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{cert_path} or {key_path} is not a usable CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} is not the key of {cert_path}")
    return _Issued(key, cert)


def _receiver_alt_names(receiver_cert: Path) -> list[x509.GeneralName]:
    try:
        cert = x509.load_pem_x509_certificate(receiver_cert.read_bytes())
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise ConfigError(
            f"cannot take the host names from {receiver_cert} ({exc}): give them with --hosts"
        ) from None


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
