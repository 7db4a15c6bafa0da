"""avd.tls over real loopback sockets, with certificates made by avd.certs.

Each case runs one server thread (receiver_context) and one client (sender_context or a
deliberately wrong peer) on 127.0.0.1, port 0. A client always writes and then reads after
the handshake: under TLS 1.3 the client finishes its handshake before the server has checked
the client certificate, so a refusal under mutual TLS shows only on that first read.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from avd.certs import CertPaths, init_certs
from avd.errors import ConfigError
from avd.tls import describe_tls, key_permission_problems, receiver_context, sender_context

TIMEOUT = 10.0  # generous: only reached when something is already broken
TLS13_SUITES = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}


@dataclass
class Outcome:
    server_error: Exception | None = None
    client_error: Exception | None = None
    server_tls: tuple[str, str] = ("none", "none")
    client_tls: tuple[str, str] = ("none", "none")
    peer_common_name: str | None = None

    @property
    def accepted(self) -> bool:
        return self.server_error is None and self.client_error is None


Client = Callable[[int], tuple[str, str]]


def _serve_once(listener: socket.socket, context: ssl.SSLContext, outcome: Outcome) -> None:
    try:
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        with context.wrap_socket(conn, server_side=True) as tls:
            outcome.server_tls = describe_tls(tls)
            outcome.peer_common_name = _common_name(tls.getpeercert(binary_form=True))
            tls.sendall(tls.recv(64).upper())
    except Exception as exc:  # recorded for the test to assert on
        outcome.server_error = exc


def _common_name(der: bytes | None) -> str | None:
    if der is None:
        return None
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def run(server_context: ssl.SSLContext, client: Client) -> Outcome:
    """One connection: the server in a thread, ``client`` here; errors of both recorded."""
    outcome = Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        server = threading.Thread(target=_serve_once, args=(listener, server_context, outcome))
        server.start()
        try:
            outcome.client_tls = client(listener.getsockname()[1])
        except Exception as exc:
            outcome.client_error = exc
        server.join(TIMEOUT)
    assert not server.is_alive()
    return outcome


def tls_client(context: ssl.SSLContext, server_hostname: str = "localhost") -> Client:
    def connect(port: int) -> tuple[str, str]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            tls.sendall(b"ping")
            reply = tls.recv(64)
            if reply != b"PING":
                raise ConnectionError(f"no echo from the server, got {reply!r}")
            return describe_tls(tls)

    return connect


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certs(tmp_path_factory.mktemp("tls") / "certs", ["localhost", "127.0.0.1"])


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A second, unrelated CA and its leaves: valid certificates nobody here should trust."""
    return init_certs(tmp_path_factory.mktemp("tls-other") / "certs", ["localhost", "127.0.0.1"])


def server(certs: CertPaths, *, mutual: bool = False, allow_tls12: bool = False) -> ssl.SSLContext:
    return receiver_context(
        cert=certs.receiver_cert,
        key=certs.receiver_key,
        client_ca=certs.ca_cert if mutual else None,
        allow_tls12=allow_tls12,
    )


def tls12_only_client(ca: Path, ciphers: str | None = None) -> ssl.SSLContext:
    context = sender_context(ca=ca, allow_tls12=True)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


# --- connections -----------------------------------------------------------------------------


def test_default_connection_is_tls13_with_an_aead_suite(certs: CertPaths) -> None:
    outcome = run(server(certs), tls_client(sender_context(ca=certs.ca_cert)))
    assert outcome.accepted, outcome
    version, cipher = outcome.client_tls
    assert version == "TLSv1.3"
    assert cipher in TLS13_SUITES
    assert outcome.server_tls == outcome.client_tls
    assert outcome.peer_common_name is None  # no client certificate asked for


def test_the_receiver_is_reached_by_ip_address(certs: CertPaths) -> None:
    client = tls_client(sender_context(ca=certs.ca_cert), server_hostname="127.0.0.1")
    assert run(server(certs), client).accepted


def test_a_server_from_an_unknown_ca_is_refused(certs: CertPaths, other: CertPaths) -> None:
    outcome = run(server(other), tls_client(sender_context(ca=certs.ca_cert)))
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(outcome.client_error)
    assert isinstance(outcome.server_error, ssl.SSLError)


def test_a_wrong_host_name_is_refused(certs: CertPaths) -> None:
    client = tls_client(sender_context(ca=certs.ca_cert), server_hostname="evil.example")
    outcome = run(server(certs), client)
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(outcome.client_error)
    assert isinstance(outcome.server_error, ssl.SSLError)


def test_the_sender_certificate_cannot_serve_as_a_receiver(certs: CertPaths) -> None:
    impostor = receiver_context(cert=certs.sender_cert, key=certs.sender_key)
    context = sender_context(ca=certs.ca_cert)
    context.check_hostname = False  # isolate the key-usage check from the name check
    outcome = run(impostor, tls_client(context))
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "unsuitable certificate purpose" in str(outcome.client_error)


def test_a_plaintext_peer_is_refused(certs: CertPaths) -> None:
    def plaintext(port: int) -> tuple[str, str]:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            raw.sendall(b"hello, no TLS here\r\n")
            raw.recv(64)  # whatever the server answers, it answers in TLS or not at all
        return ("none", "none")

    outcome = run(server(certs), plaintext)
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert outcome.server_tls == ("none", "none")


def test_a_tls12_client_is_refused_by_default(certs: CertPaths) -> None:
    outcome = run(server(certs), tls_client(tls12_only_client(certs.ca_cert)))
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(outcome.server_error)
    assert isinstance(outcome.client_error, ssl.SSLError)


def test_a_tls12_client_is_accepted_with_allow_tls12_using_ecdhe_aead(certs: CertPaths) -> None:
    outcome = run(server(certs, allow_tls12=True), tls_client(tls12_only_client(certs.ca_cert)))
    assert outcome.accepted, outcome
    version, cipher = outcome.client_tls
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-ECDSA-")
    assert "GCM" in cipher or "CHACHA20" in cipher


def test_tls12_cbc_suites_are_refused_even_with_allow_tls12(certs: CertPaths) -> None:
    cbc_only = "ECDHE-ECDSA-AES128-SHA256"
    outcome = run(
        server(certs, allow_tls12=True), tls_client(tls12_only_client(certs.ca_cert, cbc_only))
    )
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert "NO_SHARED_CIPHER" in str(outcome.server_error)
    # Control: the same client is accepted by a server without avd's cipher policy, so the
    # refusal above comes from that policy and not from the client being unusable.
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.load_cert_chain(certs.receiver_cert, certs.receiver_key)
    lax.set_ciphers("ALL")
    control = run(lax, tls_client(tls12_only_client(certs.ca_cert, cbc_only)))
    assert control.accepted, control
    assert control.client_tls == ("TLSv1.2", cbc_only)


# --- mutual TLS ------------------------------------------------------------------------------


def test_mutual_tls_accepts_the_sender_certificate(certs: CertPaths) -> None:
    context = sender_context(ca=certs.ca_cert, cert=certs.sender_cert, key=certs.sender_key)
    outcome = run(server(certs, mutual=True), tls_client(context))
    assert outcome.accepted, outcome
    assert outcome.peer_common_name == "avd-sender"
    assert outcome.client_tls[0] == "TLSv1.3"


def test_mutual_tls_refuses_a_client_without_certificate(certs: CertPaths) -> None:
    outcome = run(server(certs, mutual=True), tls_client(sender_context(ca=certs.ca_cert)))
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(outcome.server_error)
    # Seen on the read after the handshake (an alert), or as a closed connection.
    assert isinstance(outcome.client_error, ssl.SSLError | ConnectionError)


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    certs: CertPaths, other: CertPaths
) -> None:
    context = sender_context(ca=certs.ca_cert, cert=other.sender_cert, key=other.sender_key)
    outcome = run(server(certs, mutual=True), tls_client(context))
    assert isinstance(outcome.server_error, ssl.SSLCertVerificationError)
    assert isinstance(outcome.client_error, ssl.SSLError | ConnectionError)


def test_mutual_tls_refuses_the_receiver_certificate_as_a_client(certs: CertPaths) -> None:
    context = sender_context(ca=certs.ca_cert, cert=certs.receiver_cert, key=certs.receiver_key)
    outcome = run(server(certs, mutual=True), tls_client(context))
    assert isinstance(outcome.server_error, ssl.SSLCertVerificationError)
    assert "unsuitable certificate purpose" in str(outcome.server_error)
    assert isinstance(outcome.client_error, ssl.SSLError | ConnectionError)


# --- context settings ------------------------------------------------------------------------


def test_context_settings(certs: CertPaths) -> None:
    plain = server(certs)
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_3
    assert plain.verify_mode == ssl.CERT_NONE
    assert plain.options & ssl.OP_NO_COMPRESSION
    assert plain.num_tickets == 0
    assert server(certs, mutual=True).verify_mode == ssl.CERT_REQUIRED
    assert server(certs, allow_tls12=True).minimum_version == ssl.TLSVersion.TLSv1_2
    client = sender_context(ca=certs.ca_cert)
    assert client.check_hostname
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.minimum_version == ssl.TLSVersion.TLSv1_3
    assert client.verify_flags & ssl.VERIFY_X509_STRICT
    assert len(client.get_ca_certs()) == 1  # only our CA, never the system store


def test_describe_tls_without_a_connection() -> None:
    assert describe_tls(None) == ("none", "none")


# --- configuration errors --------------------------------------------------------------------


@pytest.fixture
def junk(tmp_path: Path) -> Path:
    path = tmp_path / "junk.pem"
    path.write_text("not a certificate\n")
    return path


def expect_config_error(build: Callable[[], object], *fragments: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build()
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_receiver_file_errors_name_variable_path_and_reason(
    certs: CertPaths, other: CertPaths, junk: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.crt"
    cert, key = certs.receiver_cert, certs.receiver_key
    cases: list[tuple[Callable[[], object], tuple[str, ...]]] = [
        (lambda: receiver_context(cert=missing, key=key), (f"AVD_TLS_CERT={missing}", "no such")),
        (lambda: receiver_context(cert=cert, key=missing), (f"AVD_TLS_KEY={missing}", "no such")),
        (lambda: receiver_context(cert=tmp_path, key=key), (f"AVD_TLS_CERT={tmp_path}", "read")),
        (lambda: receiver_context(cert=junk, key=key), (f"AVD_TLS_CERT={junk}", "not a PEM")),
        (lambda: receiver_context(cert=key, key=key), (f"AVD_TLS_CERT={key}", "not a PEM")),
        (lambda: receiver_context(cert=cert, key=cert), (f"AVD_TLS_KEY={cert}", "not a PEM")),
        (
            lambda: receiver_context(cert=cert, key=other.receiver_key),
            (f"AVD_TLS_KEY={other.receiver_key}", "does not match"),
        ),
        (
            lambda: receiver_context(cert=cert, key=key, client_ca=junk),
            (f"AVD_TLS_CLIENT_CA={junk}", "not a PEM"),
        ),
        (
            lambda: receiver_context(cert=cert, key=key, client_ca=missing),
            (f"AVD_TLS_CLIENT_CA={missing}", "no such"),
        ),
    ]
    for build, fragments in cases:
        expect_config_error(build, *fragments)


def test_sender_file_errors_name_variable_path_and_reason(
    certs: CertPaths, junk: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.crt"
    expect_config_error(lambda: sender_context(ca=missing), f"AVD_TLS_CA={missing}", "no such")
    expect_config_error(lambda: sender_context(ca=junk), f"AVD_TLS_CA={junk}", "not a PEM")
    expect_config_error(
        lambda: sender_context(ca=certs.ca_cert, cert=certs.sender_cert), "set together"
    )
    expect_config_error(
        lambda: sender_context(ca=certs.ca_cert, cert=junk, key=certs.sender_key),
        f"AVD_TLS_CERT={junk}",
    )


def test_an_encrypted_key_is_refused_without_prompting(certs: CertPaths, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(certs.receiver_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    expect_config_error(
        lambda: receiver_context(cert=certs.receiver_cert, key=encrypted),
        f"AVD_TLS_KEY={encrypted}",
        "encrypted",
    )


# --- key permissions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (0o600, None),
        (0o400, None),
        (0o640, "readable by group (mode 0640)"),
        (0o620, "writable by group (mode 0620)"),
        (0o604, "readable by others (mode 0604)"),
        (0o644, "readable by group and others (mode 0644)"),
        (0o666, "readable and writable by group and others (mode 0666)"),
        (0o646, "readable by group, readable and writable by others (mode 0646)"),
    ],
)
def test_key_permission_problems(tmp_path: Path, mode: int, expected: str | None) -> None:
    """One line a file, naming every class of users at fault, with the command that mends it."""
    key = tmp_path / "receiver.key"
    key.write_text("secret\n")
    key.chmod(mode)
    problems = key_permission_problems(key)
    if expected is None:
        assert problems == []
        return
    (problem,) = problems
    assert problem.text == f"private key {key} is {expected}"
    assert problem.remedy == f"chmod 600 {key}"
    assert str(problem) == f"private key {key} is {expected}: run chmod 600 {key}"


def test_key_permission_problems_of_a_missing_file(tmp_path: Path) -> None:
    (problem,) = key_permission_problems(tmp_path / "missing.key")
    assert "cannot check" in problem.text
    assert problem.remedy == ""  # chmod would not help
    assert str(problem) == problem.text


def test_key_permission_problems_name_what_the_file_holds(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o640)
    (problem,) = key_permission_problems(token, "token")
    assert problem.text.startswith(f"token {token} is readable by group")
