"""Certificates that expire while a daemon runs unattended: said in its log before they do.

``avd certs init`` issues certificates for 825 days, and a daemon left running for months
will meet the end of one. Each daemon notes the validity of the certificates it loaded at
start (the receiver's own and the client CA it trusts; the sender's CA and client
certificate) and checks them at start and every ``CHECK_EVERY_S``: a warning from
``EXPIRY_WARNING_DAYS`` before the end, an error once it has passed (the peers then refuse
the connection). The check is on what the daemon serves, not on the file: a certificate
renewed on disk takes effect at the next start, and the log says so until then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from avd.certs import EXPIRY_WARNING_DAYS, cert_not_after
from avd.errors import ConfigError

log = logging.getLogger("avd.certs")

CHECK_EVERY_S = 6 * 3600.0  # four lines a day at most: a month of them before the end


@dataclass(frozen=True)
class LoadedCertificate:
    """A certificate a daemon loaded at start, by the setting that names it."""

    variable: str
    path: Path
    not_after: datetime

    def problem(self, now: datetime) -> tuple[int, str] | None:
        """(log level, line) if it expires within EXPIRY_WARNING_DAYS of ``now``, else None."""
        days = (self.not_after - now).total_seconds() / 86400
        if days >= EXPIRY_WARNING_DAYS:
            return None
        end = self.not_after.strftime("%Y-%m-%d %H:%M UTC")
        if days <= 0:
            level, state = logging.ERROR, f"expired on {end}: peers refuse it"
        else:
            left = "less than a day" if days < 1 else f"{days:.0f} days"
            level, state = logging.WARNING, f"expires in {left}, on {end}"
        return level, f"{self.variable}: certificate {self.path} {state}; {self._remedy()}"

    def _remedy(self) -> str:
        if self._renewed_on_disk():
            return "the renewed file takes effect when the daemon restarts"
        return renewal_remedy(self.variable) + " and restart the daemon"

    def _renewed_on_disk(self) -> bool:
        try:
            return cert_not_after(self.path) > self.not_after
        except ConfigError:  # being replaced right now, or gone: nothing newer to say
            return False


def renewal_remedy(variable: str) -> str:
    """How the certificate a setting names is renewed: a leaf from the same CA, a CA anew."""
    if variable.endswith("_CA"):  # AVD_TLS_CA, AVD_TLS_CLIENT_CA
        return "make a new CA (avd certs init --force), give its ca.crt to every sender"
    return "renew it (avd certs renew)"


def loaded_certificates(named: Iterable[tuple[str, Path | None]]) -> list[LoadedCertificate]:
    """The validity of each (setting, path) given, as the daemon loads them at start."""
    loaded = []
    for variable, path in named:
        if path is None:
            continue
        try:
            loaded.append(LoadedCertificate(variable, path, cert_not_after(path)))
        except ConfigError as exc:  # TLS loaded it: only its dates could not be read here
            log.debug("not watching %s: %s", variable, exc)
    return loaded


async def watch_expiry(
    certificates: list[LoadedCertificate],
    every_s: float = CHECK_EVERY_S,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Logs every certificate near or past its end, now and every ``every_s``; runs until
    cancelled."""
    while True:
        now = clock()
        for certificate in certificates:
            found = certificate.problem(now)
            if found is not None:
                log.log(*found)
        await asyncio.sleep(every_s)
