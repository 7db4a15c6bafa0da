"""avd.certwatch: a daemon says in its log, well before the end, that a certificate it loaded
is about to expire; and, once renewed on disk, that a restart is what is left to do."""

from __future__ import annotations

import asyncio
import logging
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from avd import certs
from avd.certs import EXPIRY_WARNING_DAYS, CertPaths, cert_not_after, init_certs
from avd.certwatch import LoadedCertificate, loaded_certificates, watch_expiry

from .conftest import Daemon, ReceiverHandle, receiver_env, sender_env, start_receiver


@pytest.fixture(scope="module")
def ten_days(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certs(tmp_path_factory.mktemp("ten-days"), ["localhost"], days=10)


def loaded(path: Path, variable: str = "AVD_TLS_CERT") -> LoadedCertificate:
    (certificate,) = loaded_certificates([(variable, path)])
    return certificate


def test_silent_until_the_warning_window(ten_days: CertPaths) -> None:
    cert = loaded(ten_days.receiver_cert)
    before_window = cert.not_after - timedelta(days=EXPIRY_WARNING_DAYS, seconds=1)
    assert cert.problem(before_window) is None
    found = cert.problem(cert.not_after - timedelta(days=12, hours=1))
    assert found is not None
    level, line = found
    assert level == logging.WARNING
    assert line.startswith(f"AVD_TLS_CERT: certificate {ten_days.receiver_cert} expires in 12 days")
    assert f"on {cert.not_after:%Y-%m-%d %H:%M} UTC" in line
    assert line.endswith("renew it (avd certs renew) and restart the daemon")


def test_the_last_day_and_after_the_end(ten_days: CertPaths) -> None:
    cert = loaded(ten_days.receiver_cert)
    last_day = cert.problem(cert.not_after - timedelta(hours=3))
    assert last_day is not None
    assert "expires in less than a day" in last_day[1]
    expired = cert.problem(cert.not_after + timedelta(seconds=1))
    assert expired is not None
    assert expired[0] == logging.ERROR
    assert "expired on" in expired[1]


def test_a_ca_is_renewed_by_a_new_ca_on_every_sender(ten_days: CertPaths) -> None:
    cert = loaded(ten_days.receiver_cert, "AVD_TLS_CA")  # its dates, named as a CA
    found = cert.problem(cert.not_after - timedelta(days=1, hours=1))
    assert found is not None
    assert "avd certs init --force" in found[1]
    assert "ca.crt to every sender" in found[1]


def test_a_renewed_file_is_not_what_is_served_until_a_restart(
    ten_days: CertPaths, tmp_path: Path
) -> None:
    path = tmp_path / "receiver.crt"
    shutil.copy(ten_days.receiver_cert, path)
    cert = loaded(path)  # as the daemon loaded it at start
    renewed = init_certs(tmp_path / "renewed", ["localhost"], days=400)
    shutil.copy(renewed.receiver_cert, path)
    found = cert.problem(cert.not_after - timedelta(days=2))
    assert found is not None  # still the old certificate that peers see
    assert found[1].endswith("the renewed file takes effect when the daemon restarts")
    path.unlink()  # gone meanwhile: the line still says what is served
    found = cert.problem(cert.not_after - timedelta(days=2))
    assert found is not None
    assert found[1].endswith("avd certs renew) and restart the daemon")


def test_only_the_settings_given_and_readable_are_watched(
    ten_days: CertPaths, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not PEM\n")
    watched = loaded_certificates(
        [("AVD_TLS_CERT", ten_days.receiver_cert), ("AVD_TLS_CLIENT_CA", None), ("X", garbage)]
    )
    assert [c.variable for c in watched] == ["AVD_TLS_CERT"]
    assert watched[0].not_after == cert_not_after(ten_days.receiver_cert)


def test_watch_logs_at_start_and_again_each_period(
    ten_days: CertPaths, caplog: pytest.LogCaptureFixture
) -> None:
    cert = loaded(ten_days.receiver_cert)
    far = loaded(init_certs(ten_days.receiver_cert.parent / "far", ["localhost"]).receiver_cert)
    caplog.set_level(logging.INFO, logger="avd.certs")

    async def watch_three_rounds() -> None:
        watching = asyncio.create_task(watch_expiry([cert, far], every_s=0.05))
        async with asyncio.timeout(10):
            while len(caplog.records) < 3:  # noqa: ASYNC110 - at start, then once a period
                await asyncio.sleep(0.01)
        watching.cancel()

    asyncio.run(watch_three_rounds())
    # Only the one near its end, once a round; the ten-year one never.
    assert all("AVD_TLS_CERT" in r.getMessage() for r in caplog.records)
    assert all("expires in" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert not any(str(far.path) in r.getMessage() for r in caplog.records)


def test_a_receiver_warns_at_start_of_a_certificate_near_its_end(
    ten_days: CertPaths, tmp_path: Path, daemons: list[Daemon]
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    handle = start_receiver(receiver_env(ten_days, tokens), tmp_path / "receiver.log")
    daemons.append(handle.daemon)
    line = handle.daemon.wait_for_log(r"WARNING avd\.certs: AVD_TLS_CERT: .*").group(0)
    assert str(ten_days.receiver_cert) in line
    assert "expires in 10 days" in line or "expires in 9 days" in line


def test_a_sender_warns_at_start_of_a_ca_near_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, daemons: list[Daemon]
) -> None:
    monkeypatch.setattr(certs, "CA_DAYS", 10)  # a CA of an earlier avd, ten days from its end
    pki = init_certs(tmp_path / "pki", ["localhost"], days=10)
    nowhere = ReceiverHandle(None, 1, 1, "")  # type: ignore[arg-type] # no receiver is needed
    env = sender_env(pki, nowhere, "cam1", "t" * 43, AVD_AUDIO_SOURCE="none")
    sender = Daemon("sender", env, tmp_path / "sender.log")
    daemons.append(sender)
    line = sender.wait_for_log(r"WARNING avd\.certs: AVD_TLS_CA: .*").group(0)
    assert str(pki.ca_cert) in line
    assert "avd certs init --force" in line
