"""``avd check sender|receiver [--env-file F]``: is this daemon's configuration sound?

For operators, before (or instead of) reading logs: it validates the role's settings,
files and their permissions, the certificates' expiry, and, for a sender, that it can reach
the receiver and authenticate (TLS handshake and a probe hello, which the receiver answers
without starting a stream or disturbing a running sender of the same id). Each problem is
one line with its remedy. Exit status: 0 when all is well, 1 when anything is wrong
(2 when there are only warnings).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import socket
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from avd import eventloop, protocol
from avd.backoff import REFUSED_HELLO_HINT, verify_hint
from avd.certs import EXPIRY_WARNING_DAYS, seconds_until_expiry
from avd.certwatch import renewal_remedy
from avd.clock import monotonic_us
from avd.config import (
    CommonSettings,
    ReceiverSettings,
    SenderSettings,
    credentials_directory,
    join_host_port,
    load_settings,
    unknown_variables,
)
from avd.errors import AvdError, ConfigError, DeviceError
from avd.fdlimit import FileBudget, files_needed
from avd.media.base import StreamKind
from avd.protocol import Role
from avd.tls import key_permission_problems, receiver_context, sender_context
from avd.tokens import TokenStore, read_sender_token


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    errors: int = 0
    warnings: int = 0

    def ok(self, text: str) -> None:
        self.lines.append(f"ok       {text}")

    def warn(self, text: str, remedy: str) -> None:
        self.warnings += 1
        self.lines.append(f"WARNING  {text} -> {remedy}")

    def error(self, text: str, remedy: str) -> None:
        self.errors += 1
        self.lines.append(f"ERROR    {text} -> {remedy}")

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 2 if self.warnings else 0


def check_certificate(report: Report, path: Path, variable: str) -> None:
    try:
        days = seconds_until_expiry(path) / 86400
    except AvdError as exc:
        report.error(f"{variable}: {exc}", "point it at a PEM certificate")
        return
    if days <= 0:
        report.error(f"{variable}: {path} expired {-days:.0f} days ago", renewal_remedy(variable))
    elif days < EXPIRY_WARNING_DAYS:
        report.warn(f"{variable}: {path} expires in {days:.0f} days", renewal_remedy(variable))
    else:
        report.ok(f"{variable}: {path} valid for {days:.0f} more days")


def check_key(report: Report, path: Path | None, variable: str, what: str = "private key") -> None:
    if path is None:
        return
    problems = key_permission_problems(path, what)
    for problem in problems:
        report.warn(
            f"{variable}: {problem.text}",
            problem.remedy or f"check that {variable} names a file this user can read",
        )
    if not problems:
        report.ok(f"{variable}: {path} is private")


def check_receiver(settings: ReceiverSettings, report: Report) -> None:
    try:
        receiver_context(
            cert=settings.tls_cert,
            key=settings.tls_key,
            client_ca=settings.tls_client_ca,
            allow_tls12=settings.allow_tls12,
        )
        report.ok("TLS certificate and key load and match")
    except ConfigError as exc:
        report.error(str(exc), "fix the file or the variable")
    check_certificate(report, settings.tls_cert, "AVD_TLS_CERT")
    if settings.tls_client_ca is not None:  # as the daemon watches it (cli.run_receiver)
        check_certificate(report, settings.tls_client_ca, "AVD_TLS_CLIENT_CA")
    check_key(report, settings.tls_key, "AVD_TLS_KEY")
    try:
        store = TokenStore.load(settings.tokens_file)
        if len(store):
            report.ok(
                f"AVD_TOKENS_FILE: {len(store)} sender(s): {', '.join(sorted(store.sender_ids()))}"
            )
        else:
            report.warn("AVD_TOKENS_FILE: no senders", "add one with: avd token new --sender-id ID")
    except ConfigError as exc:
        report.error(str(exc), "fix that line")
    if settings.record_dir is not None:
        check_record_dir(report, settings)
    if settings.playback != "none":
        check_playback(report, settings.playback)
    check_open_files(report, settings)
    read_by_the_unit = [("AVD_TOKENS_FILE", settings.tokens_file)]
    read_by_the_unit += [("AVD_TLS_CERT", settings.tls_cert)]
    if settings.tls_client_ca is not None:
        read_by_the_unit.append(("AVD_TLS_CLIENT_CA", settings.tls_client_ca))
    check_readable_by_the_unit(report, "receiver", read_by_the_unit)


# Where deploy/install.sh puts the units.
UNITS_DIR = Path("/etc/systemd/system")


def check_open_files(report: Report, settings: ReceiverSettings) -> None:
    """Whether this shell's hard limit of open files lets the daemon reserve what
    AVD_MAX_CONNECTIONS needs (it raises its soft limit itself, as far as the hard one
    goes). Under the installed unit systemd sets the limits (524288 hard): not this shell's."""
    if (UNITS_DIR / "avd-receiver.service").exists():
        return
    recording = settings.record_dir is not None
    wanted = files_needed(settings.max_connections, recording=recording)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < wanted:
        budget = FileBudget(wanted, before=hard, soft=hard, hard=hard)
        report.warn(
            f"open files: {budget.shortfall(settings.max_connections, recording=recording)}",
            "a daemon started from this shell would; its hard limit is the container's or the "
            "login's (ulimit -Hn)",
        )


def check_readable_by_the_unit(report: Report, role: str, files: list[tuple[str, Path]]) -> None:
    """With the unit installed, the daemon runs as a transient user (DynamicUser=): the
    files it reads itself (secrets come as credentials) must be readable by others, or it
    stops at start. Checked as root (`sudo avd check`), a file of mode 0600 reads fine."""
    if not (UNITS_DIR / f"avd-{role}.service").exists():
        return
    for variable, path in files:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # said by the check of the file itself
        if not mode & 0o004:
            report.error(
                f"{variable}: {path} is not readable by others (mode {mode & 0o777:04o}): the "
                f"avd-{role} unit's transient user cannot read it",
                f"chmod 644 {path} (it holds nothing secret)",
            )


def check_playback(report: Report, spec: str) -> None:
    """The speaker AVD_PLAYBACK names exists."""
    check_audio_device(
        report,
        f"AVD_PLAYBACK: {spec!r}",
        spec,
        input=False,
        remedy="AVD_PLAYBACK=none for no speaker, or a device avd devices lists (the streams "
        "are received and recorded either way)",
    )


def check_audio_device(report: Report, what: str, device: str, *, input: bool, remedy: str) -> None:
    """The audio device ``device`` ("default", an index or a name) exists. Not opened: a
    running daemon may hold it, and a device that is missing is what a fresh installation
    gets wrong."""
    from avd.media.pa import find_device, open_pyaudio  # noqa: PLC0415 - PyAudio loads slowly

    pa = None
    try:
        pa = open_pyaudio()  # DeviceError if PortAudio cannot start at all
        index = find_device(pa, device, input=input)
        if index is not None:
            info = pa.get_device_info_by_index(index)
        elif input:
            info = pa.get_default_input_device_info()
        else:
            info = pa.get_default_output_device_info()
        report.ok(f"{what} is the audio device {info['name']!r}")
    except (DeviceError, OSError) as exc:
        report.warn(f"{what}: {exc}", remedy)
    finally:
        if pa is not None:
            pa.terminate()


def check_spool_dir(report: Report, folder: Path) -> None:
    """The sender runs without it (spooling in memory), so a folder it cannot write is a
    warning: what an outage leaves unsent is lost at the next stop."""
    existing = writable_as(folder)
    if existing is None:
        report.warn(
            f"AVD_SPOOL_DIR: {folder} is not writable",
            "fix its owner or permissions (the sender would spool in memory only)",
        )
        return
    free_gb = shutil.disk_usage(existing).free / 1024**3
    report.ok(f"AVD_SPOOL_DIR: {folder} writable, {free_gb:.1f} GB free")


def check_sources(report: Report, settings: SenderSettings) -> None:
    """The camera and microphone (or files) the sender would open are there. A missing one
    does not stop the sender, which retries it and streams the other: hence warnings."""
    from avd.media.specs import is_mic_spec, is_wav_spec, parse_mic_spec  # noqa: PLC0415
    from avd.media.video import is_camera, video_source_problem  # noqa: PLC0415 - loads cv2

    video = settings.video_source
    if (problem := video_source_problem(video)) is not None:
        where = "avd devices lists the cameras" if is_camera(video) else "fix the path"
        report.warn(
            f"AVD_VIDEO_SOURCE: {video}: {problem}",
            f"{where} (the sender starts anyway and retries it)",
        )
    audio = settings.audio_source
    if is_mic_spec(audio):  # a well-formed one: the settings refuse the others
        check_audio_device(
            report,
            f"AVD_AUDIO_SOURCE: {audio!r}",
            parse_mic_spec(audio),
            input=True,
            remedy="avd devices lists the microphones (the sender starts anyway and retries it)",
        )
    elif is_wav_spec(audio) and not os.access(audio, os.R_OK):
        report.warn(
            f"AVD_AUDIO_SOURCE: {audio}: no such file, or not readable",
            "fix the path (the sender starts anyway and retries it)",
        )


def writable_as(folder: Path) -> Path | None:
    """The folder, or the nearest parent that exists (a daemon creates its folder itself),
    if this user can make a file there: tried, as permission bits do not say it for root,
    nor for a read-only file system. None if not."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".avd-check-"):
            return existing
    except OSError:
        return None


def check_record_dir(report: Report, settings: ReceiverSettings) -> None:
    folder = settings.record_dir
    assert folder is not None
    existing = writable_as(folder)
    if existing is None:
        report.error(f"AVD_RECORD_DIR: {folder} is not writable", "fix its owner or permissions")
        return
    free_gb = shutil.disk_usage(existing).free / 1024**3
    floor = settings.min_free_gb or 0
    if free_gb < floor:
        report.warn(
            f"AVD_RECORD_DIR: {free_gb:.1f} GB free, under AVD_MIN_FREE_GB={floor}",
            "free space; retention will delete the oldest segments",
        )
    else:
        report.ok(f"AVD_RECORD_DIR: {folder} writable, {free_gb:.1f} GB free")


def check_sender(settings: SenderSettings, report: Report, timeout_s: float) -> None:
    check_sources(report, settings)  # first: whatever stops the checks below
    if settings.spool_dir is not None:
        check_spool_dir(report, settings.spool_dir)
    try:
        token = read_sender_token(
            token_file=settings.token_file,
            credentials_directory=credentials_directory(),
            token_env=settings.token.get_secret_value() if settings.token else None,
        )
        report.ok("token found")
    except ConfigError as exc:
        report.error(str(exc), "give the sender its token")
        return
    try:
        context = sender_context(
            ca=settings.tls_ca,
            cert=settings.tls_cert,
            key=settings.tls_key,
            allow_tls12=settings.allow_tls12,
        )
    except ConfigError as exc:
        report.error(str(exc), "fix the file or the variable")
        return
    check_certificate(report, settings.tls_ca, "AVD_TLS_CA")
    if settings.tls_cert is not None:
        check_certificate(report, settings.tls_cert, "AVD_TLS_CERT")
    check_key(report, settings.tls_key, "AVD_TLS_KEY")
    check_key(report, settings.token_file, "AVD_TOKEN_FILE", "token")
    read_by_the_unit = [("AVD_TLS_CA", settings.tls_ca)]
    if settings.tls_cert is not None:
        read_by_the_unit.append(("AVD_TLS_CERT", settings.tls_cert))
    check_readable_by_the_unit(report, "sender", read_by_the_unit)
    streams = [
        kind
        for kind, source in (
            (StreamKind.VIDEO, settings.video_source),
            (StreamKind.AUDIO, settings.audio_source),
        )
        if source != "none"
    ]
    eventloop.run(
        probe_streams(
            settings,
            streams,
            context=context,
            token=token.as_bytes(),
            report=report,
            timeout_s=timeout_s,
        ),
        settings.event_loop,
    )


async def probe_streams(
    settings: SenderSettings,
    streams: list[StreamKind],
    *,
    context: ssl.SSLContext,
    token: bytes,
    report: Report,
    timeout_s: float,
) -> None:
    """Each stream's port as the sender will use it: TLS, then a probe hello. After one
    refusal the other stream's hello is not sent: each refusal counts toward the lockout
    of this address (AVD_AUTH_MAX_FAILURES), and the second would say nothing new."""
    refused = False
    for kind in streams:
        answer = await probe_receiver(
            settings,
            context=context,
            token=None if refused else token,
            kind=kind,
            report=report,
            timeout_s=timeout_s,
        )
        refused = refused or answer is False


async def probe_receiver(
    settings: SenderSettings,
    *,
    context: ssl.SSLContext,
    token: bytes | None,
    kind: StreamKind,
    report: Report,
    timeout_s: float,
) -> bool | None:
    """True if the receiver welcomed the hello, False if it refused it, None otherwise
    (unreachable, no answer, or no hello sent: ``token`` None)."""
    port = settings.video_port if kind is StreamKind.VIDEO else settings.audio_port
    where = f"{join_host_port(settings.receiver_host, port)} ({kind.label})"
    started = monotonic_us()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                settings.receiver_host, port, ssl=context, server_hostname=settings.server_name
            )
    except (OSError, TimeoutError) as exc:
        report.error(f"cannot reach the receiver at {where}: {_reason(exc)}", _network_remedy(exc))
        return None
    handshake_ms = (monotonic_us() - started) / 1000
    version = writer.get_extra_info("ssl_object").version()
    report.ok(f"TLS with {where}: {version}, certificate verified, {handshake_ms:.0f} ms")
    try:
        if token is None:
            return None  # the token was refused on the other stream already
        return await _say_hello(
            settings,
            kind,
            token=token,
            reader=reader,
            writer=writer,
            report=report,
            timeout_s=timeout_s,
        )
    except (OSError, TimeoutError, AvdError) as exc:
        report.error(
            f"no answer to the hello from {where}: {_reason(exc)}", "check the receiver's log"
        )
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _say_hello(
    settings: SenderSettings,
    kind: StreamKind,
    *,
    token: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    report: Report,
    timeout_s: float,
) -> bool | None:
    """A probe hello: True welcomed, False refused (the token), None turned away (the
    token right, the hello not: the receiver says why)."""
    fmt = settings.video_format if kind is StreamKind.VIDEO else settings.audio_format
    conn = protocol.Connection(Role.SENDER)
    writer.write(conn.send(protocol.Hello(settings.sender_id, kind, fmt, token, probe=True)))
    async with asyncio.timeout(timeout_s):
        answer = await _first_answer(reader, conn)
    if isinstance(answer, protocol.Welcome):
        report.ok(
            f"the receiver accepted sender {settings.sender_id!r} and its token ({kind.label})"
        )
        writer.write(conn.send(protocol.Goodbye(protocol.GoodbyeReason.BYE, "avd check")))
        return True
    if isinstance(answer, protocol.Goodbye):  # the token was right: it says what is not
        report.error(
            f"the receiver turned the {kind.label} stream away: {answer.text}",
            "fix the setting it names",
        )
        return None
    report.error(f"the receiver refused sender {settings.sender_id!r}", REFUSED_HELLO_HINT)
    return False


async def _first_answer(reader: asyncio.StreamReader, conn: protocol.Connection) -> protocol.Event:
    while True:
        event = conn.next_event()
        if isinstance(event, protocol.Welcome | protocol.Refused | protocol.Goodbye):
            return event
        if isinstance(event, protocol.ConnectionClosed):
            raise ConnectionResetError("the receiver closed the connection")
        if event is None:
            conn.receive_data(await reader.read(4096))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    return str(exc) or type(exc).__name__


def _network_remedy(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            verify_hint(exc) or "AVD_TLS_CA must be the CA that signed the receiver's certificate"
        )
    if isinstance(exc, ConnectionRefusedError):
        return "is avd-receiver running, and are AVD_RECEIVER_HOST and the ports right?"
    return "check AVD_RECEIVER_HOST, the ports and the firewall"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="avd check",
        description="Check a daemon's settings, its files and their permissions, its "
        "certificates' expiry, the devices it would open (looked for, not opened) and, for "
        "a sender, that it reaches both of the receiver's ports and authenticates. One line "
        "a check, each problem with its remedy. Exit status: 0 all is well, 1 errors, 2 "
        "warnings only.",
    )
    parser.add_argument("role", choices=["sender", "receiver"], help="which daemon's settings")
    parser.add_argument("--env-file", type=Path, help="read AVD_* settings from this file")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for network steps (5)")
    args = parser.parse_args(argv)
    report = Report()
    cls: type[CommonSettings] = SenderSettings if args.role == "sender" else ReceiverSettings
    settings: CommonSettings | None = None
    try:
        settings = load_settings(cls, args.env_file)
    except ConfigError as exc:
        for problem in str(exc).split("; "):
            report.error(problem, "fix this setting (see config.example.env)")
    else:
        report.ok(f"settings of avd-{args.role} are valid")
    for unknown in unknown_variables(args.env_file):
        report.warn(unknown.text, unknown.remedy)
    if settings is not None:
        if isinstance(settings, ReceiverSettings):
            check_receiver(settings, report)
        else:
            assert isinstance(settings, SenderSettings)
            check_sender(settings, report, args.timeout)
    print("\n".join(report.lines))
    verdict = (
        "all is well"
        if report.exit_code == 0
        else f"{report.errors} error(s), {report.warnings} warning(s)"
    )
    print(f"avd check {args.role}: {verdict}")
    return report.exit_code
