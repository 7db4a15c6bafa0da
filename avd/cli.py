"""Command lines: ``avd-receiver``, ``avd-sender`` and the admin tool ``avd``.

Every entry point is ``main(argv) -> int``. Settings are built once here and passed down.
Exit codes: 0 after a clean stop (SIGTERM or SIGINT), 78 (EX_CONFIG) for a bad setting,
with one line naming the variable and no traceback, 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from avd import __version__, eventloop
from avd.config import (
    CommonSettings,
    ReceiverSettings,
    SenderSettings,
    load_settings,
    settings_help,
    unknown_variables,
)
from avd.daemon import cancel_quietly, install_signal_handlers, keep_systemd_informed
from avd.errors import AvdError, CertsExistError, ConfigError, ListenError
from avd.fdlimit import connections_within, ensure_open_files, files_needed
from avd.logs import LogEvent, log_event, setup_logging
from avd.media.base import MediaSink
from avd.media.done import FrameDone, OnDone
from avd.media.fanout import FanoutSink
from avd.metrics import ReceiverMetrics, RecorderCollector, SenderMetrics, serve
from avd.systemd import Notifier

if TYPE_CHECKING:
    from avd.media.recorder_process import RecorderProcess
    from avd.receiver import Receiver

EX_CONFIG = 78
log = logging.getLogger("avd")


def _daemon_parser(
    prog: str, summary: str, settings: type[CommonSettings]
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (environment variables, or KEY=value lines in --env-file; "
        "the environment wins):\n" + settings_help(settings),
    )
    parser.add_argument("--env-file", type=Path, help="read AVD_* settings from this file")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# OpenCV and its FFmpeg print their own lines on stderr (a camera's retries, a stream's
# hiccups), which under systemd become loose journal entries. avd logs those events itself,
# once per change of state; the libraries keep only their errors. Read when cv2 loads.
QUIET_LIBRARIES = {"OPENCV_LOG_LEVEL": "ERROR", "OPENCV_FFMPEG_LOGLEVEL": "16"}


def _run_daemon(role: str, settings_cls: type[CommonSettings], env_file: Path | None) -> int:
    for variable, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(variable, value)
    try:
        settings = load_settings(settings_cls, env_file)
    except ConfigError as exc:
        # Logging is not set up yet; under systemd, <3> files the line as an error.
        priority = "<3>" if os.environ.get("INVOCATION_ID") else ""
        print(f"{priority}{role}: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(role=role, log_format=settings.log_format, level=settings.log_level)
    for unknown in unknown_variables(env_file):
        log.warning("%s: %s", unknown.text, unknown.remedy)
    try:
        if isinstance(settings, ReceiverSettings):
            return eventloop.run(run_receiver(settings), settings.event_loop)
        assert isinstance(settings, SenderSettings)
        return eventloop.run(run_sender(settings), settings.event_loop)
    except ConfigError as exc:
        log.error("%s", exc)
        return EX_CONFIG
    except ListenError as exc:
        log.error("%s", exc)
        return 1  # the port may be free by the next start
    except KeyboardInterrupt:
        return 0
    except Exception:
        # One log record (one journal entry with its traceback), not loose stderr lines.
        log.exception("%s crashed", role)
        return 1


def _serve_metrics(
    settings: CommonSettings, registry: CollectorRegistry
) -> tuple[Callable[[], None] | None, str]:
    """Start the Prometheus endpoint if configured: (stop function, text for the log)."""
    endpoint = settings.metrics_endpoint
    if endpoint is None:
        return None, ""
    try:
        stop, port = serve(registry, *endpoint)
    except OSError as exc:  # in use, or not this host's: it may pass, as for the ports
        raise ListenError(
            f"AVD_METRICS_ADDR: cannot listen on {settings.metrics_addr}: {exc}"
        ) from None
    return stop, f" metrics=http://{endpoint[0]}:{port}/metrics"


# ---- receiver ---------------------------------------------------------------------------


def _reloader(receiver: Receiver, notifier: Notifier) -> Callable[[], None]:
    """SIGHUP (``systemctl reload avd-receiver``): the tokens file is read again, systemd
    told when the reload starts and when it is done, so that ``reload`` returns then."""

    def reload() -> None:
        notifier.reloading()
        try:
            receiver.reload_tokens()
        finally:
            notifier.ready()

    return reload


def _systemd_made_it_read_only(exc: OSError) -> bool:
    # The unit's ProtectSystem=strict leaves only its StateDirectory writable.
    return exc.errno == errno.EROFS and bool(os.environ.get("INVOCATION_ID"))


_UNDER_SYSTEMD_WRITABLE = (
    " (the avd-receiver unit may write only under /var/lib/avd: add the folder to"
    " ReadWritePaths= in a drop-in, systemctl edit avd-receiver)"
)


def build_recorder(
    settings: ReceiverSettings,
    on_done: OnDone | None,
    on_failure: Callable[[str], None] | None = None,
) -> RecorderProcess | None:
    if settings.record_dir is None:
        return None
    from avd.media.naming import prepare_record_dir  # noqa: PLC0415
    from avd.media.recorder_process import RecorderConfig, RecorderProcess  # noqa: PLC0415
    from avd.media.retention import RetentionPolicy  # noqa: PLC0415

    try:
        prepare_record_dir(settings.record_dir)
    except OSError as exc:
        raise ConfigError(
            f"AVD_RECORD_DIR: cannot record to {settings.record_dir}: {exc.strerror or exc}"
            + (_UNDER_SYSTEMD_WRITABLE if _systemd_made_it_read_only(exc) else "")
        ) from None
    gb = 1024**3
    policy = RetentionPolicy(
        max_age_days=settings.retention_days,
        max_total_bytes=int(settings.record_max_gb * gb) if settings.record_max_gb else None,
        min_free_bytes=int(settings.min_free_gb * gb) if settings.min_free_gb else None,
    )
    config = RecorderConfig(
        settings.record_dir,
        segment_seconds=settings.segment_seconds,
        retention=policy,
        buffer_bytes=settings.record_buffer_mb * 1024 * 1024,
        log_format=settings.log_format,
        log_level=settings.log_level,
    )
    return RecorderProcess(config, on_done=on_done, on_failure=on_failure)


def build_speaker(settings: ReceiverSettings) -> MediaSink | None:
    if settings.playback == "none":
        return None
    from avd.errors import DeviceError  # noqa: PLC0415
    from avd.media.speaker import SpeakerSink  # noqa: PLC0415 - PyAudio loads slowly

    try:
        return SpeakerSink(settings.playback, settings.playback_sender, settings.playback_buffer_ms)
    except DeviceError as exc:
        log.error("no playback: %s", exc)
        return None


def budget_open_files(settings: ReceiverSettings) -> ReceiverSettings:
    """The settings with as many connections as this process's open files carry.

    Called before the recording process starts: it inherits the raised limit.
    """
    recording = settings.record_dir is not None
    budget = ensure_open_files(files_needed(settings.max_connections, recording=recording))
    if budget.raised:
        log.debug("open files: soft limit raised from %d to %d", budget.before, budget.soft)
    if budget.enough:
        return settings
    log.warning("%s", budget.shortfall(settings.max_connections, recording=recording))
    capped = connections_within(budget.soft, recording=recording)
    return settings.model_copy(update={"max_connections": capped})


def build_receiver_sinks(
    settings: ReceiverSettings, on_done: OnDone | None = None
) -> list[MediaSink]:
    """The receiver's sinks as configured: the speaker, then the recorder (see run_receiver)."""
    built = (build_speaker(settings), build_recorder(settings, on_done))
    return [sink for sink in built if sink is not None]


async def run_receiver(settings: ReceiverSettings) -> int:
    from avd.certwatch import loaded_certificates, watch_expiry  # noqa: PLC0415
    from avd.receiver import Receiver  # noqa: PLC0415 - keeps `--help` fast

    settings = budget_open_files(settings)
    metrics = ReceiverMetrics()
    loop = asyncio.get_running_loop()
    receivers: list[Receiver] = []  # bound below: the recorder is built before the receiver

    def recorded(batch: Sequence[FrameDone]) -> None:
        # From the recorder's writer thread: acknowledgements go out on the event loop.
        with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting
            loop.call_soon_threadsafe(receivers[0].frames_done, list(batch))

    failures: list[str] = []

    def recorder_failed(message: str) -> None:
        # From the recorder's reader thread: the daemon stops with 1 and systemd restarts it.
        failures.append(message)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)

    stop = asyncio.Event()
    notifier = Notifier.from_env()
    recorder = build_recorder(settings, on_done=recorded, on_failure=recorder_failed)
    speaker = build_speaker(settings)
    # The live output first: the recorder's hand-off is not on the path to the ear.
    sink = FanoutSink([s for s in (speaker, recorder) if s is not None])
    try:
        receiver = Receiver(settings, sink, metrics, acks_after_recording=recorder is not None)
        receivers.append(receiver)
        if recorder is not None:
            metrics.registry.register(RecorderCollector(recorder.stats))
        install_signal_handlers(stop, on_reload=_reloader(receiver, notifier))
        listening = await receiver.start()
        stop_metrics, metrics_where = _serve_metrics(settings, metrics.registry)
    except BaseException:
        # A start that failed (a setting, a port in use): the recording process, already
        # running, is told to stop rather than left to find its parent gone.
        await asyncio.to_thread(sink.close)
        raise
    log_event(
        log,
        logging.INFO,
        LogEvent.DAEMON_STARTED,
        f"avd-receiver {__version__} listening on {settings.bind} "
        f"video={listening.video_port} audio={listening.audio_port}{metrics_where}"
        + (f" recording to {settings.record_dir}" if settings.record_dir else ""),
        video_port=listening.video_port,
        audio_port=listening.audio_port,
    )
    notifier.ready()
    informer = asyncio.create_task(keep_systemd_informed(notifier, receiver.status_line))
    served = [("AVD_TLS_CERT", settings.tls_cert), ("AVD_TLS_CLIENT_CA", settings.tls_client_ca)]
    expiry = asyncio.create_task(watch_expiry(loaded_certificates(served)))
    await stop.wait()
    notifier.stopping()
    log_event(log, logging.INFO, LogEvent.DAEMON_STOPPING, "avd-receiver stopping")
    await receiver.shutdown()
    await cancel_quietly(informer, expiry)
    await asyncio.to_thread(sink.close)
    if stop_metrics is not None:
        stop_metrics()
    if failures:
        log.error("avd-receiver stopped: %s (senders keep what was not recorded)", failures[0])
        return 1
    log.info("avd-receiver stopped")
    return 0


def receiver_main(argv: Sequence[str] | None = None) -> int:
    parser = _daemon_parser(
        "avd-receiver",
        "Receive, authenticate, record and play avd streams.",
        ReceiverSettings,
    )
    args = parser.parse_args(argv)
    return _run_daemon("avd-receiver", ReceiverSettings, args.env_file)


# ---- sender -----------------------------------------------------------------------------


async def run_sender(settings: SenderSettings) -> int:
    from avd.certwatch import loaded_certificates, watch_expiry  # noqa: PLC0415
    from avd.sender import Sender, describe  # noqa: PLC0415

    metrics = SenderMetrics()
    sender = Sender(settings, metrics)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    notifier = Notifier.from_env()
    stop_metrics, metrics_where = _serve_metrics(settings, metrics.registry)
    log_event(
        log,
        logging.INFO,
        LogEvent.DAEMON_STARTED,
        f"avd-sender {__version__}: {describe(settings)}{metrics_where}",
    )
    abort = asyncio.Event()  # ends the streams at once; a stop lets them flush first
    streaming = asyncio.create_task(sender.run(abort))
    # READY once the sources are open (or have failed once and are being retried).
    while not sender.all_open() and not streaming.done() and not stop.is_set():
        if any(c.error for c in sender.captures):
            break
        await asyncio.sleep(0.05)
    notifier.ready()
    informer = asyncio.create_task(keep_systemd_informed(notifier, sender.status_line))
    trusted = [("AVD_TLS_CA", settings.tls_ca), ("AVD_TLS_CERT", settings.tls_cert)]
    expiry = asyncio.create_task(watch_expiry(loaded_certificates(trusted)))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({streaming, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        notifier.stopping()
        log_event(log, logging.INFO, LogEvent.DAEMON_STOPPING, "avd-sender stopping")
        # Capture stops first; each stream then sends what is left and waits for its acks.
        await asyncio.to_thread(sender.stop_capture)
    elif streaming.exception() is None:
        log.info("all sources have ended")
    try:
        await asyncio.wait_for(asyncio.shield(streaming), timeout=3.0)
    except TimeoutError:
        log.warning("streams did not finish flushing within 3 s: closing them now")
        abort.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(streaming, timeout=1.0)
    await cancel_quietly(informer, expiry, stopper)
    if stop_metrics is not None:
        stop_metrics()
    for line in sender.summary():
        log.info("%s", line)
    log.info("avd-sender stopped")
    return 0


def sender_main(argv: Sequence[str] | None = None) -> int:
    parser = _daemon_parser(
        "avd-sender",
        "Capture a camera and a microphone and stream them to an avd receiver.",
        SenderSettings,
    )
    args = parser.parse_args(argv)
    return _run_daemon("avd-sender", SenderSettings, args.env_file)


# ---- admin tool -------------------------------------------------------------------------


def _hosts(text: str) -> list[str]:
    """``--hosts a,b,...`` as a list, blanks dropped."""
    return [h.strip() for h in text.split(",") if h.strip()]


def _unwritten(exc: OSError) -> str:
    """A failed all-or-none write (``avd.atomicfile``), for the admin commands."""
    return f"cannot write {exc.filename}: {exc.strerror or exc}; no file was changed"


def _certs_init(args: argparse.Namespace) -> int:
    from avd.certs import default_hosts, format_init_report, init_certs  # noqa: PLC0415

    hosts = _hosts(args.hosts) if args.hosts else default_hosts()
    try:
        paths = init_certs(Path(args.dir), hosts, days=args.days, force=args.force)
    except CertsExistError as exc:
        print(f"avd certs init: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"avd certs init: {_unwritten(exc)}", file=sys.stderr)
        return 1
    print(format_init_report(paths))
    return 0


def _certs_renew(args: argparse.Namespace) -> int:
    from avd.certs import CertPaths, renew_certs  # noqa: PLC0415

    hosts = _hosts(args.hosts) if args.hosts else None
    ca_key = Path(args.ca_key) if args.ca_key else None
    try:
        end = renew_certs(Path(args.dir), hosts, days=args.days, ca_key=ca_key)
    except OSError as exc:
        print(f"avd certs renew: {_unwritten(exc)}", file=sys.stderr)
        return 1
    paths = CertPaths.in_directory(Path(args.dir))
    for path in (paths.receiver_cert, paths.receiver_key, paths.sender_cert, paths.sender_key):
        print(f"wrote {path}")
    print(
        f"Valid until {end:%Y-%m-%d %H:%M} UTC, from the same CA: senders keep their ca.crt. "
        "Install the receiver's new certificate and key and restart avd-receiver (senders "
        "that use mutual TLS: their new sender.crt and sender.key, and restart them)."
    )
    return 0


def _token_new(args: argparse.Namespace) -> int:
    from avd.tokens import add_token, new_token, validate_sender_id  # noqa: PLC0415

    try:
        sender_id = validate_sender_id(args.sender_id)
    except ValueError as exc:
        print(f"avd token new: --sender-id: {exc}", file=sys.stderr)
        return 2
    token = new_token()
    if args.tokens_file:
        try:
            replaced = add_token(Path(args.tokens_file), sender_id, token)
        except OSError as exc:
            print(f"avd token new: {_unwritten(exc)}", file=sys.stderr)
            return 1
        # A sender id typed twice would otherwise revoke a working camera without a word.
        done = (
            f"replaced the hash of {sender_id}'s token in {args.tokens_file}: its previous "
            "token stops working"
            if replaced
            else f"added the hash of {sender_id}'s token to {args.tokens_file}"
        )
        print(
            f"{done}; a running receiver reads it on reload (systemctl reload avd-receiver, "
            "or SIGHUP)",
            file=sys.stderr,
        )
    print(
        "give this token to the sender (AVD_TOKEN_FILE or a 'token' credential):", file=sys.stderr
    )
    print(token)
    return 0


def admin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avd", description="avd admin tool.")
    parser.add_argument("--version", action="version", version=f"avd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    certs = sub.add_parser("certs", help="certificates").add_subparsers(
        dest="action", required=True
    )
    init = certs.add_parser(
        "init",
        help="make a CA, a receiver and a sender certificate",
        description="Make, in DIR: ca.crt and ca.key (the CA, 3650 days; keep ca.key "
        "offline), receiver.crt and receiver.key (for AVD_TLS_CERT and AVD_TLS_KEY of the "
        "receiver, naming --hosts), sender.crt and sender.key (for mutual TLS only). Keys "
        "are 0600. All files or none are written.",
    )
    init.add_argument("--dir", default="certs", help="output folder (default: certs)")
    init.add_argument(
        "--hosts", help="receiver names/addresses, comma-separated (default: this host)"
    )
    init.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(func=_certs_init)
    renew = certs.add_parser(
        "renew",
        help="new receiver and sender certificates from the same CA (ca.crt unchanged)",
        description="Replace receiver.crt/.key and sender.crt/.key in DIR with new ones from "
        "the same CA, so senders keep trusting the receiver without a change; a running "
        "receiver serves the new certificate to new connections once restarted.",
    )
    renew.add_argument("--dir", default="certs", help="the folder of `certs init` (default: certs)")
    renew.add_argument(
        "--hosts", help="receiver names/addresses, comma-separated (default: the current ones)"
    )
    renew.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    renew.add_argument("--ca-key", help="the CA's key, if kept elsewhere (default: DIR/ca.key)")
    renew.set_defaults(func=_certs_renew)

    token = sub.add_parser("token", help="sender tokens").add_subparsers(
        dest="action", required=True
    )
    new = token.add_parser(
        "new",
        help="make a token; print it; add its hash to the tokens file",
        description="Make a sender's token and print it on stdout, for the sender's "
        "AVD_TOKEN_FILE (mode 0600) or its 'token' credential. With --tokens-file, its hash "
        "goes into the receiver's tokens file, replacing the sender's previous one, which "
        "then stops working; a running receiver reads the file on reload (SIGHUP).",
    )
    new.add_argument("--sender-id", required=True, help="the sender this token is for")
    new.add_argument(
        "--tokens-file", help="the receiver's tokens file (made 0644 if new: it holds hashes)"
    )
    new.set_defaults(func=_token_new)
    for name, (_, summary) in DELEGATED.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


# Subcommands that own their whole command line, each in its own module: `avd NAME ...`
# runs `module.main(rest_of_argv) -> int`. Imported only when used.
DELEGATED = {
    "demo": ("avd.demo", "sender and receiver on localhost with test sources, then figures"),
    "bench": ("avd.bench", "measure latency, throughput, CPU and scale on this machine"),
    "check": ("avd.check", "validate a daemon's settings, files and, for a sender, the receiver"),
    "devices": ("avd.media.devices", "list cameras and audio devices with their setting values"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib  # noqa: PLC0415

        module = importlib.import_module(DELEGATED[argv[0]][0])
        return int(module.main(argv[1:]))
    args = admin_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"avd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except AvdError as exc:
        print(f"avd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
