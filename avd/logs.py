"""Logging for the daemons: the journal's native protocol, text or JSON, and the connection log.

``setup_logging`` picks one output: under systemd with stderr connected to the journal
(``$JOURNAL_STREAM`` matches fd 2) records go to journald as datagrams of ``KEY=value``
fields, so a traceback stays one entry and ``PEER=``, ``SENDER_ID=``... can be queried with
``journalctl PEER=...``. Elsewhere lines of text (with ``<N>`` priority prefixes when systemd
reads them) or one JSON object per line.

``log_event`` attaches a fixed ``MESSAGE_ID`` and structured fields to a record; the
connection log (opened, closed, auth failed) is built on it. Token-named fields are refused:
MediaMTX leaked tokens into logs through URLs, and we want that impossible by construction.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from enum import Enum, StrEnum
from typing import TextIO

from avd.errors import ConfigError

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Each field value is cut to this size: a datagram must fit the socket's send buffer
# (about 208 KiB by default), and systemd's own memfd fallback is overkill for a daemon log.
MAX_VALUE_BYTES = 64 * 1024
# A wedged journald must not freeze the daemon: after this long we write to stderr instead.
_SEND_TIMEOUT_S = 1.0
_HANDLER_NAME = "avd"
_EVENT_ATTR = "avd_event"
_FIELDS_ATTR = "avd_fields"
# Lowercase python names whose uppercase form is a valid journald field name (journald
# drops names with lowercase letters, a leading "_" or digit, or over 64 characters).
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
# Names the handlers write themselves; a structured field must not shadow them.
_RESERVED_FIELDS = frozenset(
    {"message", "message_id", "priority", "syslog_identifier", "code_file", "code_line"}
    | {"code_func", "exception", "logger", "ts", "level", "event"}
)
_FORMATS = ("auto", "text", "json", "journal")


class CloseReason(StrEnum):
    """Why a connection ended, as written in the connection log's ``close_reason``.

    A connection refused before its TLS handshake (a locked-out address, too many
    connections) has no close line: it is counted in the metrics and logged, rate-limited,
    as a refusal. One whose handshake failed has one (``tls-error``), rate-limited too.
    """

    BYE = "bye"
    PEER_CLOSED = "peer-closed"
    TIMEOUT = "timeout"
    AUTH_FAILED = "auth-failed"
    PROTOCOL_ERROR = "protocol-error"
    TLS_ERROR = "tls-error"
    SHUTDOWN = "shutdown"
    REPLACED = "replaced"  # a reconnecting sender replaced this session
    TOKEN_REVOKED = "token-revoked"  # noqa: S105 (a reason, not a secret)
    ERROR = "error"


class LogEvent(Enum):
    """Event types; the value is the journal ``MESSAGE_ID`` (fixed for ever once released)."""

    CONNECTION_OPENED = "afe6d1a3c3de4b96a82584c03d37a853"
    CONNECTION_CLOSED = "28adea7ddbcc462b8ea0d65078310dd9"
    AUTH_FAILED = "14ff8d569b7a4e91b494c8117fb9fe5d"
    STREAM_STARTED = "e537746f3f2b451bae5c5076b8877caf"
    STREAM_RETRY = "983dfdeef4c94f7987bb2ccf2227b199"
    DAEMON_STARTED = "5a965a63750a423aa1de7f28ec72c874"
    DAEMON_STOPPING = "60aa00f6e06a4bccb751deab28198e3f"
    CONFIG_RELOADED = "fac65e89f31d4ad891f16b7a3f2902cc"
    DEVICE_LOST = "28ac0d037c054c2795692583e0048920"
    DEVICE_BACK = "0fdd306ffb2d42c5b1dcaa6db29d4cff"
    RECORDING_PAUSED = "13457fe0b54248bb871f10a2050848c0"
    RECORDING_RESUMED = "f1803efb3a504da18484e5366c87ab26"
    FRAMES_LEFT_OUT = "b2a70f8152474ffab94f4d17336b8f38"  # a full recorder queue drops frames
    FRAMES_LEFT_OUT_OVER = "4dfd362758634ef0bde1d05ca0f5c71d"  # and how many it dropped

    @property
    def message_id(self) -> str:
        return self.value


def log_event(
    logger: logging.Logger, level: int, event: LogEvent, message: str, /, **fields: object
) -> None:
    """Log ``message`` with ``event``'s MESSAGE_ID and ``fields`` (journald: uppercased).

    Positional-only, so that every name is free for a field and a reserved one is refused.
    """
    _emit(logger, level, event, message, **fields)


def connection_opened(
    logger: logging.Logger,
    *,
    peer: str,
    sender_id: str,
    stream: str,
    tls_version: str,
    tls_cipher: str,
) -> None:
    message = (
        f"connection opened peer={_show(peer)} sender={_show(sender_id)} stream={_show(stream)}"
        f" tls={_show(tls_version)}/{_show(tls_cipher)}"
    )
    ids = {"peer": peer, "sender_id": sender_id, "stream": stream}
    tls = {"tls_version": tls_version, "tls_cipher": tls_cipher}
    _emit(logger, logging.INFO, LogEvent.CONNECTION_OPENED, message, **ids, **tls)


def connection_closed(
    logger: logging.Logger,
    *,
    peer: str,
    sender_id: str,
    stream: str,
    duration_s: float,
    frames_in: int,
    frames_out: int,
    bytes_in: int,
    bytes_out: int,
    reason: CloseReason,
) -> None:
    message = (
        f"connection closed peer={_show(peer)} sender={_show(sender_id)} stream={_show(stream)}"
        f" duration={duration_s:.1f}s frames in={frames_in} out={frames_out}"
        f" bytes in={human_bytes(bytes_in)} out={human_bytes(bytes_out)} reason={reason}"
    )
    # A clean end is routine; a broken protocol or an unexpected error deserves attention.
    trouble = reason in (CloseReason.PROTOCOL_ERROR, CloseReason.ERROR)
    level = logging.WARNING if trouble else logging.INFO
    ids = {"peer": peer, "sender_id": sender_id, "stream": stream}
    counts = {"frames_in": frames_in, "frames_out": frames_out}
    counts |= {"bytes_in": bytes_in, "bytes_out": bytes_out}
    _emit(logger, level, LogEvent.CONNECTION_CLOSED, message, **ids, **counts,
          duration_s=round(duration_s, 3), close_reason=reason)  # fmt: skip


def auth_failed(logger: logging.Logger, *, peer: str, claimed_sender_id: str, stream: str) -> None:
    message = (
        f"authentication failed peer={_show(peer)} claimed_sender={_show(claimed_sender_id)}"
        f" stream={_show(stream)}"
    )
    ids = {"peer": peer, "claimed_sender_id": claimed_sender_id, "stream": stream}
    _emit(logger, logging.WARNING, LogEvent.AUTH_FAILED, message, **ids)


def human_bytes(count: int) -> str:
    """Decimal units as in ``8.9MB`` / ``1.2kB``: short enough for a one-line log."""
    if count < 1000:
        return f"{count}B"
    # Rounded before choosing, so that 999_999 reads 1.0MB rather than 1000.0kB.
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if round(count / scale, 1) >= 1.0:
            return f"{count / scale:.1f}{unit}"
    return f"{count / 1e3:.1f}kB"


def _emit(
    logger: logging.Logger, level: int, event: LogEvent, message: str, /, **fields: object
) -> None:
    # Checked before the level filter so that a bad name fails in every test, not only
    # in those that happen to log at that level.
    for name in fields:
        _check_field_name(name)
    extra = {_EVENT_ATTR: event, _FIELDS_ATTR: fields}
    # 3: the record names the caller of log_event / connection_* (CODE_FUNC), not us.
    logger.log(level, message, extra=extra, stacklevel=3)


def _check_field_name(name: str) -> None:
    if "token" in name.lower():
        raise ValueError(f"log field {name!r}: tokens must never be logged")
    if not _FIELD_NAME.match(name) or name in _RESERVED_FIELDS:
        raise ValueError(f"log field {name!r}: need a lowercase name, not a reserved one")


def _show(value: str) -> str:
    """A value safe in a one-line ``key=value`` log: peers choose sender ids and may lie."""
    value = value[:128]
    if value and value.isprintable() and not any(c in value for c in ' ="'):
        return value
    return json.dumps(value)


def record_event(record: logging.LogRecord) -> LogEvent | None:
    event = getattr(record, _EVENT_ATTR, None)
    return event if isinstance(event, LogEvent) else None


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    fields = getattr(record, _FIELDS_ATTR, None)
    return dict(fields) if isinstance(fields, dict) else {}


def syslog_priority(levelno: int) -> int:
    """Python level -> syslog priority (crit 2, err 3, warning 4, info 6, debug 7)."""
    for threshold, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4)):
        if levelno >= threshold:
            return priority
    return 6 if levelno >= logging.INFO else 7


def _traceback_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info:
        parts.append(formatter.formatException(record.exc_info))
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts)


def _full_message(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    trace = _traceback_text(formatter, record)
    return f"{record.getMessage()}\n{trace}" if trace else record.getMessage()


def _iso_utc(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``[<N>][ts ]LEVEL logger: message``; with ``<N>`` on every line of a traceback."""

    def __init__(self, *, priority_prefix: bool, timestamps: bool) -> None:
        super().__init__()
        self._priority_prefix = priority_prefix
        self._timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname} {record.name}: {_full_message(self, record)}"
        if self._timestamps:
            text = f"{_iso_utc(record.created)} {text}"
        if not self._priority_prefix:
            return text
        # systemd reads the prefix line by line: unprefixed traceback lines would be info.
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, event, message_id, fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = record_event(record)
        if event is not None:
            entry.update(event=event.name, message_id=event.message_id)
        entry.update(record_fields(record))
        trace = _traceback_text(self, record)
        if trace:
            entry["exception"] = trace
        return json.dumps(entry, default=str, ensure_ascii=False)


def encode_journal_field(name: str, value: str) -> bytes:
    """One field of the native protocol; values with a newline use the length-prefixed form."""
    data = value.encode("utf-8", "replace")
    if len(data) > MAX_VALUE_BYTES:
        data = data[:MAX_VALUE_BYTES].decode("utf-8", "ignore").encode("utf-8")
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """Sends each record to journald as one datagram; falls back to a text line on stderr."""

    def __init__(
        self, identifier: str, *, socket_path: str = JOURNAL_SOCKET, fallback: TextIO | None = None
    ) -> None:
        super().__init__()
        self._identifier = identifier
        self._socket_path = socket_path
        self._fallback = fallback
        self._fallback_formatter = TextFormatter(priority_prefix=False, timestamps=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(_SEND_TIMEOUT_S)

    def encode(self, record: logging.LogRecord) -> bytes:
        fields = [
            ("MESSAGE", _full_message(self._fallback_formatter, record)),
            ("PRIORITY", str(syslog_priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", self._identifier),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
        ]
        event = record_event(record)
        if event is not None:
            fields.append(("MESSAGE_ID", event.message_id))
        trace = _traceback_text(self._fallback_formatter, record)
        if trace:
            fields.append(("EXCEPTION", trace))
        fields.extend((name.upper(), str(value)) for name, value in record_fields(record).items())
        return b"".join(encode_journal_field(name, value) for name, value in fields)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = self.encode(record)
            try:
                self._sock.sendto(datagram, self._socket_path)
            except OSError:  # no journald, or a datagram it cannot take: keep the line
                stream = self._fallback or sys.stderr
                stream.write(self._fallback_formatter.format(record) + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def stderr_is_journal(env: Mapping[str, str], fd: int = 2) -> bool:
    """True when ``$JOURNAL_STREAM`` names the very file ``fd`` is (not an inherited value)."""
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(fd)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def resolve_format(log_format: str, env: Mapping[str, str]) -> str:
    """``auto`` becomes ``journal`` when stderr is the journal, else ``text``."""
    if log_format not in _FORMATS:
        raise ConfigError(f"AVD_LOG_FORMAT={log_format!r}: expected one of {', '.join(_FORMATS)}")
    if log_format != "auto":
        return log_format
    return "journal" if stderr_is_journal(env) else "text"


def syslog_identifier(role: str) -> str:
    """``sender`` -> ``avd-sender`` (a role already named ``avd-...`` is kept as it is)."""
    return role if role.startswith("avd-") else f"avd-{role}"


def _parse_level(level: str) -> int:
    levelno = logging.getLevelNamesMapping().get(level.upper())
    if levelno is None:
        raise ConfigError(f"AVD_LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING or ERROR")
    return levelno


def make_handler(
    *,
    role: str,
    log_format: str,
    stream: TextIO | None = None,
    env: Mapping[str, str] = os.environ,
    journal_socket: str = JOURNAL_SOCKET,
) -> logging.Handler:
    """The handler ``setup_logging`` installs, exposed so tests can inject a socket path."""
    chosen = resolve_format(log_format, env)
    if chosen == "journal":
        return JournalHandler(syslog_identifier(role), socket_path=journal_socket, fallback=stream)
    handler = logging.StreamHandler(stream or sys.stderr)
    if chosen == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # The journal stamps each line itself; anywhere else a line needs its own time.
        under_systemd = bool(env.get("INVOCATION_ID"))
        formatter = TextFormatter(
            priority_prefix=under_systemd, timestamps=not stderr_is_journal(env)
        )
        handler.setFormatter(formatter)
    return handler


def setup_logging(
    *,
    role: str,
    log_format: str = "auto",
    level: str = "INFO",
    stream: TextIO | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """Route the root logger to one handler (replacing ours from an earlier call)."""
    levelno = _parse_level(level)
    handler = make_handler(
        role=role, log_format=log_format, stream=stream, journal_socket=journal_socket
    )
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    # Foreign libraries only speak up about problems; our own loggers follow AVD_LOG_LEVEL.
    root.setLevel(max(levelno, logging.WARNING))
    logging.getLogger("avd").setLevel(levelno)
