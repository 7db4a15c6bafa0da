"""avd.certs: files, modes, extensions and chains of the certificates `avd certs init` makes."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from avd import certs, cli
from avd.certs import (
    CA_DAYS,
    CertPaths,
    cert_not_after,
    default_hosts,
    format_init_report,
    init_certs,
    renew_certs,
    seconds_until_expiry,
)
from avd.errors import CertsExistError, ConfigError

from .conftest import small_tmpfs

HOSTS = ["localhost", "avd.example", "127.0.0.1", "::1", "10.0.0.7"]
FILE_NAMES = {"ca.crt", "ca.key", "receiver.crt", "receiver.key", "sender.crt", "sender.key"}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """One set of certificates, made once: these tests only read it."""
    return init_certs(tmp_path_factory.mktemp("ro") / "certs", HOSTS, days=30)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_six_files_and_nothing_else(made: CertPaths) -> None:
    directory = made.ca_cert.parent
    assert {p.name for p in directory.iterdir()} == FILE_NAMES  # no temporary files left
    assert set(made.all()) == {directory / name for name in FILE_NAMES}
    assert set(made.secret()) == {made.ca_key, made.receiver_key, made.sender_key}


def test_modes_of_keys_certificates_and_new_directory(made: CertPaths) -> None:
    for key in made.secret():
        assert mode_of(key) == 0o600, key
    for cert in (made.ca_cert, made.receiver_cert, made.sender_cert):
        assert mode_of(cert) == 0o644, cert
    assert mode_of(made.ca_cert.parent) == 0o700


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        paths = init_certs(tmp_path / "certs", ["localhost"])
    finally:
        os.umask(old)
    assert mode_of(paths.receiver_key) == 0o600
    assert mode_of(paths.receiver_cert) == 0o644
    assert mode_of(tmp_path / "certs") == 0o700


def test_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    init_certs(tmp_path, ["localhost"])
    assert mode_of(tmp_path) == 0o755


def test_receiver_names_are_dns_names_and_ip_addresses(made: CertPaths) -> None:
    san = load_cert(made.receiver_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "avd.example"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
    ]


def test_chains_verify_under_a_strict_rfc5280_verifier(made: CertPaths) -> None:
    builder = PolicyBuilder().store(Store([load_cert(made.ca_cert)]))
    receiver, sender = load_cert(made.receiver_cert), load_cert(made.sender_cert)
    for name in (x509.DNSName("avd.example"), x509.IPAddress(ipaddress.ip_address("::1"))):
        chain = builder.build_server_verifier(name).verify(receiver, [])
        assert chain[-1] == load_cert(made.ca_cert)
    verified = builder.build_client_verifier().verify(sender, [])
    assert verified.subjects == [x509.DNSName("avd-sender")]


def test_each_leaf_is_good_for_its_own_purpose_only(made: CertPaths) -> None:
    builder = PolicyBuilder().store(Store([load_cert(made.ca_cert)]))
    with pytest.raises(VerificationError, match="EKU"):
        builder.build_client_verifier().verify(load_cert(made.receiver_cert), [])
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("avd-sender")).verify(
            load_cert(made.sender_cert), []
        )
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("other.example")).verify(
            load_cert(made.receiver_cert), []
        )


def test_leaves_do_not_verify_against_another_ca(made: CertPaths, tmp_path: Path) -> None:
    other = init_certs(tmp_path, ["localhost"])
    builder = PolicyBuilder().store(Store([load_cert(other.ca_cert)]))
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("localhost")).verify(
            load_cert(made.receiver_cert), []
        )


def test_ca_extensions(made: CertPaths) -> None:
    ca = load_cert(made.ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)


def test_leaf_extensions_and_names(made: CertPaths) -> None:
    ca = load_cert(made.ca_cert)
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    for path, usage, common_name in (
        (made.receiver_cert, ExtendedKeyUsageOID.SERVER_AUTH, "avd-receiver"),
        (made.sender_cert, ExtendedKeyUsageOID.CLIENT_AUTH, "avd-sender"),
    ):
        leaf = load_cert(path)
        leaf.verify_directly_issued_by(ca)
        extensions = leaf.extensions
        assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski
        assert not extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
        cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == common_name


def test_keys_are_p256_and_match_their_certificates(made: CertPaths) -> None:
    for key_path, cert_path in (
        (made.ca_key, made.ca_cert),
        (made.receiver_key, made.receiver_cert),
        (made.sender_key, made.sender_cert),
    ):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        assert key.public_key() == load_cert(cert_path).public_key()


def test_validity_starts_an_hour_back_and_lasts_the_given_days(tmp_path: Path) -> None:
    before = datetime.now(UTC)
    paths = init_certs(tmp_path, ["localhost"], days=10)
    after = datetime.now(UTC)
    # The leaves last the given days; the CA ten years, so that they can be renewed from it.
    for path, days in (
        (paths.ca_cert, CA_DAYS),
        (paths.receiver_cert, 10),
        (paths.sender_cert, 10),
    ):
        cert = load_cert(path)
        start = cert.not_valid_before_utc
        # Certificates store whole seconds: allow one second of truncation.
        assert before - timedelta(hours=1, seconds=1) <= start <= after - timedelta(hours=1)
        end = cert.not_valid_after_utc
        assert before + timedelta(days=days, seconds=-1) <= end <= after + timedelta(days=days)


def test_a_longer_validity_than_ten_years_stretches_the_ca_too(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, ["localhost"], days=CA_DAYS + 100)
    assert cert_not_after(paths.ca_cert) == cert_not_after(paths.receiver_cert)


# ---- renew ------------------------------------------------------------------------------


def test_renew_issues_new_leaves_from_the_same_ca(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, HOSTS, days=10)
    ca_files = {p: p.read_bytes() for p in (paths.ca_cert, paths.ca_key)}
    old = {p: p.read_bytes() for p in (paths.receiver_key, paths.sender_key)}
    old_san = load_cert(paths.receiver_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    end = renew_certs(tmp_path, days=400)
    assert {p: p.read_bytes() for p in ca_files} == ca_files  # senders keep their ca.crt
    for key, before in old.items():
        assert key.read_bytes() != before  # new keys, not only new dates
        assert mode_of(key) == 0o600
    assert end == cert_not_after(paths.receiver_cert) == cert_not_after(paths.sender_cert)
    assert timedelta(days=399) < end - datetime.now(UTC) <= timedelta(days=400)
    receiver = load_cert(paths.receiver_cert)
    new_san = receiver.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert new_san.value == old_san.value  # the host names kept
    ca = load_cert(paths.ca_cert)
    for leaf in (receiver, load_cert(paths.sender_cert)):
        leaf.verify_directly_issued_by(ca)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("avd.example"))
    verifier.verify(receiver, [])
    assert {p.name for p in tmp_path.iterdir()} == FILE_NAMES


def test_renew_with_hosts_replaces_the_host_names(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, ["localhost"], days=10)
    renew_certs(tmp_path, ["new.example", "192.0.2.10"])
    san = load_cert(paths.receiver_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["new.example"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.10")]


def test_a_renewed_leaf_ends_with_its_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(certs, "CA_DAYS", 40)  # a CA of an earlier avd: as short as its leaves
    paths = init_certs(tmp_path, ["localhost"], days=10)
    assert renew_certs(tmp_path, days=825) == cert_not_after(paths.ca_cert)


def test_renew_refuses_a_ca_near_its_end_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(certs, "CA_DAYS", 20)
    paths = init_certs(tmp_path, ["localhost"], days=10)
    before = {p: p.read_bytes() for p in paths.all()}
    with pytest.raises(ConfigError, match=r"ca\.crt ends on .*avd certs init --force"):
        renew_certs(tmp_path)
    assert {p: p.read_bytes() for p in paths.all()} == before


def test_renew_names_what_is_missing_or_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*ca\.crt.*avd certs init"):
        renew_certs(tmp_path / "nowhere")
    paths = init_certs(tmp_path / "a", ["localhost"], days=10)
    other = init_certs(tmp_path / "b", ["localhost"], days=10)
    paths.ca_key.write_bytes(other.ca_key.read_bytes())
    with pytest.raises(ConfigError, match=r"ca\.key is not the key of"):
        renew_certs(tmp_path / "a")
    paths.ca_key.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="not a usable CA"):
        renew_certs(tmp_path / "a")
    kept = init_certs(tmp_path / "c", ["localhost"], days=10)
    kept.receiver_cert.unlink()
    with pytest.raises(ConfigError, match="--hosts"):
        renew_certs(tmp_path / "c")
    assert not kept.receiver_key.with_name("receiver.crt").exists()  # nothing half-written
    with pytest.raises(ConfigError, match="1 day"):
        renew_certs(tmp_path / "c", ["localhost"], days=0)


def test_refuses_to_overwrite_and_names_the_files(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, ["localhost"])
    before = {p: p.read_bytes() for p in paths.all()}
    with pytest.raises(CertsExistError) as raised:
        init_certs(tmp_path, ["localhost"])
    for path in paths.all():
        assert str(path) in str(raised.value)
    assert {p: p.read_bytes() for p in paths.all()} == before


def test_one_existing_file_is_enough_to_refuse_and_nothing_is_written(tmp_path: Path) -> None:
    (tmp_path / "sender.key").write_text("a key the user made\n")
    with pytest.raises(CertsExistError, match=r"sender\.key") as raised:
        init_certs(tmp_path, ["localhost"])
    assert "ca.crt" not in str(raised.value)
    assert [p.name for p in tmp_path.iterdir()] == ["sender.key"]


def test_force_replaces_everything(tmp_path: Path) -> None:
    first = init_certs(tmp_path, ["localhost"])
    old_ca = load_cert(first.ca_cert)
    old_key = first.receiver_key.read_bytes()
    second = init_certs(tmp_path, ["localhost", "new.example"], force=True)
    assert second == first
    assert load_cert(second.ca_cert).serial_number != old_ca.serial_number
    assert second.receiver_key.read_bytes() != old_key
    assert mode_of(second.receiver_key) == 0o600
    load_cert(second.receiver_cert).verify_directly_issued_by(load_cert(second.ca_cert))
    assert {p.name for p in tmp_path.iterdir()} == FILE_NAMES


@pytest.mark.parametrize("hosts", [[], [""], ["bad host"], ["a/b"], ["ünïcode.example"]])
def test_unusable_hosts_are_refused_before_writing(tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(ConfigError):
        init_certs(tmp_path / "certs", hosts)
    assert not (tmp_path / "certs").exists()


def test_zero_days_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="1 day"):
        init_certs(tmp_path, ["localhost"], days=0)


def test_duplicate_hosts_appear_once(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, ["localhost", "localhost", "::1", "::1"])
    san = load_cert(paths.receiver_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert len(list(san.value)) == 2


def test_default_hosts() -> None:
    assert default_hosts() == ["localhost", "127.0.0.1", "::1", socket.gethostname()]


def test_cert_not_after_and_seconds_until_expiry(made: CertPaths) -> None:
    not_after = cert_not_after(made.receiver_cert)
    assert not_after.utcoffset() == timedelta(0)
    assert not_after == load_cert(made.receiver_cert).not_valid_after_utc
    now = not_after - timedelta(days=2, seconds=5)
    assert seconds_until_expiry(made.receiver_cert, now=now) == 2 * 86400 + 5
    assert seconds_until_expiry(made.receiver_cert, now=not_after + timedelta(hours=1)) == -3600
    remaining = seconds_until_expiry(made.receiver_cert)
    assert 29 * 86400 < remaining <= 30 * 86400


def test_expiry_helpers_refuse_naive_times_and_bad_files(made: CertPaths, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aware"):
        seconds_until_expiry(made.receiver_cert, now=datetime(2030, 1, 1))
    missing = tmp_path / "missing.crt"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        cert_not_after(missing)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        cert_not_after(made.receiver_key)


def test_report_lists_every_file_and_marks_the_keys_secret(made: CertPaths) -> None:
    lines = format_init_report(made).splitlines()
    for path in made.all():
        (line,) = [line for line in lines if str(path) in line]
        assert ("SECRET" in line) == (path in made.secret())
    assert "0600" in lines[-1]


def test_the_renew_command_says_what_it_wrote_and_what_is_left_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = init_certs(tmp_path, ["localhost"], days=10)
    old_ca = paths.ca_cert.read_bytes()
    assert cli.main(["certs", "renew", "--dir", str(tmp_path), "--days", "90"]) == 0
    out = capsys.readouterr().out
    for path in (paths.receiver_cert, paths.receiver_key, paths.sender_cert, paths.sender_key):
        assert f"wrote {path}" in out
    assert f"Valid until {cert_not_after(paths.receiver_cert):%Y-%m-%d %H:%M} UTC" in out
    offline = tmp_path / "offline" / "ca.key"  # kept away from the receiver, as advised
    offline.parent.mkdir()
    paths.ca_key.rename(offline)
    assert cli.main(["certs", "renew", "--dir", str(tmp_path), "--ca-key", str(offline)]) == 0
    assert not paths.ca_key.exists()  # the key stays where it is kept
    load_cert(paths.receiver_cert).verify_directly_issued_by(load_cert(paths.ca_cert))
    assert "senders keep their ca.crt" in out
    assert paths.ca_cert.read_bytes() == old_ca
    assert cli.main(["certs", "renew", "--dir", str(tmp_path / "nowhere")]) == cli.EX_CONFIG
    assert "cannot read" in capsys.readouterr().err


def test_a_full_disk_changes_no_file_and_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With 12 KiB free, `avd certs init` wrote the CA and a key, then died with a
    traceback: the half-made folder then refused the next try (files exist)."""
    with small_tmpfs(tmp_path / "small", "12k") as disk:
        folder = disk / "certs"
        assert cli.main(["certs", "init", "--dir", str(folder)]) == 1
        err = capsys.readouterr().err
        assert re.fullmatch(
            rf"avd certs init: cannot write {folder}/\S+: No space left on device; "
            r"no file was changed\n",
            err,
        ), err
        assert list(folder.iterdir()) == []
    # Renewing on a full disk keeps the old certificates and keys, every one of them.
    made = init_certs(tmp_path / "made", ["localhost"])
    with small_tmpfs(tmp_path / "full", "24k") as disk:  # six pages: the six files fill it
        for path in made.all():
            (disk / path.name).write_bytes(path.read_bytes())
        before = {p.name: p.read_bytes() for p in disk.iterdir()}
        assert cli.main(["certs", "renew", "--dir", str(disk)]) == 1
        assert "no file was changed" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == before
