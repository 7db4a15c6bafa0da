"""avd.logs: text, JSON and journal output, the connection log, and format auto-detection.

The journal format is checked against a real AF_UNIX datagram socket bound in a temporary
directory, parsed with an independent reader of journald's native protocol.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from avd.errors import ConfigError
from avd.logs import (
    MAX_VALUE_BYTES,
    CloseReason,
    LogEvent,
    auth_failed,
    connection_closed,
    connection_opened,
    human_bytes,
    log_event,
    make_handler,
    setup_logging,
)

REPO = Path(__file__).resolve().parent.parent
TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def _clean_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging touches the process-wide root logger: put it back after each test."""
    for name in ("INVOCATION_ID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)
    root, avd = logging.getLogger(), logging.getLogger("avd")
    handlers, root_level, avd_level = root.handlers[:], root.level, avd.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(root_level)
    avd.setLevel(avd_level)


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    assert len(path) < 100, "AF_UNIX paths are limited to 108 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def parse_datagram(data: bytes) -> dict[str, str]:
    """journald's native protocol: KEY=value lines, or KEY\\n<u64 LE size><value>\\n."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            pos = end + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, end + 1)
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            pos = end + 10 + size
        assert re.fullmatch(rb"[A-Z][A-Z0-9_]*", key), key
        assert key.decode() not in fields, f"duplicate field {key!r}"
        fields[key.decode()] = value.decode("utf-8")
    return fields


def receive(sock: socket.socket) -> dict[str, str]:
    return parse_datagram(sock.recv(1 << 20))


def assert_no_more(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(1 << 20)


def text_setup(**kwargs: str) -> io.StringIO:
    out = io.StringIO()
    setup_logging(role="receiver", log_format="text", stream=out, **kwargs)
    return out


def open_cam1(logger: logging.Logger) -> None:
    connection_opened(
        logger,
        peer="203.0.113.5:50122",
        sender_id="cam1",
        stream="video",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
    )


def close_cam1(logger: logging.Logger, reason: CloseReason) -> None:
    connection_closed(
        logger,
        peer="203.0.113.5:50122",
        sender_id="cam1",
        stream="video",
        duration_s=12.34,
        frames_in=246,
        frames_out=13,
        bytes_in=8_912_345,
        bytes_out=1_234,
        reason=reason,
    )


def test_text_connection_log_lines() -> None:
    out = text_setup()
    logger = logging.getLogger("avd.receiver")
    open_cam1(logger)
    close_cam1(logger, CloseReason.BYE)
    close_cam1(logger, CloseReason.PROTOCOL_ERROR)
    auth_failed(logger, peer="[::1]:4000", claimed_sender_id="cam9", stream="audio")
    lines = out.getvalue().splitlines()
    peer = "peer=203.0.113.5:50122 sender=cam1 stream=video"
    closed = (
        f"connection closed {peer} duration=12.3s frames in=246 out=13 bytes in=8.9MB out=1.2kB"
    )
    expected = [
        f"INFO avd.receiver: connection opened {peer} tls=TLSv1.3/TLS_AES_256_GCM_SHA384",
        f"INFO avd.receiver: {closed} reason=bye",
        f"WARNING avd.receiver: {closed} reason=protocol-error",
        "WARNING avd.receiver: authentication failed peer=[::1]:4000 claimed_sender=cam9"
        " stream=audio",
    ]
    assert len(lines) == len(expected)
    for line, want in zip(lines, expected, strict=True):
        assert re.fullmatch(f"{TS} {re.escape(want)}", line), line


def test_untrusted_values_stay_on_one_quoted_line() -> None:
    out = text_setup()
    sneaky = "cam1\nINFO avd: connection opened peer=evil"
    auth_failed(logging.getLogger("avd.r"), peer="1.2.3.4:5", claimed_sender_id=sneaky, stream="x")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert 'claimed_sender="cam1\\nINFO avd: connection opened peer=evil"' in lines[0]


def test_human_bytes_units() -> None:
    assert [human_bytes(n) for n in (0, 999, 1000, 1234, 949_999, 999_999, 8_912_345)] == [
        "0B",
        "999B",
        "1.0kB",
        "1.2kB",
        "950.0kB",
        "1.0MB",
        "8.9MB",
    ]
    assert human_bytes(3_500_000_000) == "3.5GB"


def test_levels_filter_avd_and_foreign_loggers() -> None:
    out = text_setup(level="DEBUG")
    logging.getLogger("avd.x").debug("ours")
    logging.getLogger("somelib").info("theirs at info")
    logging.getLogger("somelib").warning("theirs at warning")
    text = out.getvalue()
    assert "ours" in text
    assert "theirs at info" not in text
    assert "theirs at warning" in text


def test_second_setup_replaces_its_handler() -> None:
    text_setup()
    out = text_setup()
    logging.getLogger("avd.x").info("once")
    assert out.getvalue().count("once") == 1
    assert sum(h.get_name() == "avd" for h in logging.getLogger().handlers) == 1


@pytest.mark.parametrize(("log_format", "level"), [("xml", "INFO"), ("text", "LOUD"), ("", "INFO")])
def test_bad_settings_are_config_errors(log_format: str, level: str) -> None:
    with pytest.raises(ConfigError, match="AVD_LOG_"):
        setup_logging(role="sender", log_format=log_format, level=level)


def test_json_lines_carry_fields_and_event() -> None:
    out = io.StringIO()
    setup_logging(role="sender", log_format="json", stream=out)
    close_cam1(logging.getLogger("avd.sender"), CloseReason.TIMEOUT)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("avd.sender").exception("it broke")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert re.fullmatch(TS, first["ts"])
    assert first["level"] == "INFO"
    assert first["logger"] == "avd.sender"
    assert first["message"].startswith("connection closed peer=203.0.113.5:50122")
    assert first["event"] == "CONNECTION_CLOSED"
    assert first["message_id"] == LogEvent.CONNECTION_CLOSED.message_id
    assert first["close_reason"] == "timeout"
    assert (first["frames_in"], first["bytes_in"], first["duration_s"]) == (246, 8_912_345, 12.34)
    assert second["level"] == "ERROR"
    assert second["message"] == "it broke"
    assert "ZeroDivisionError" in second["exception"]


def test_priority_prefixes_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    out = text_setup(level="DEBUG")
    logger = logging.getLogger("avd.x")
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("e")
    lines = out.getvalue().splitlines()
    assert [line[:3] for line in lines[:3]] == ["<7>", "<6>", "<4>"]
    assert re.fullmatch(f"<6>{TS} INFO avd.x: i", lines[1])
    traceback_lines = lines[3:]
    assert len(traceback_lines) > 3
    assert "RuntimeError: boom" in traceback_lines[-1]
    assert all(line.startswith("<3>") for line in traceback_lines), traceback_lines


def test_no_priority_prefixes_outside_systemd() -> None:
    out = text_setup()
    logging.getLogger("avd.x").warning("w")
    assert re.fullmatch(f"{TS} WARNING avd.x: w\n", out.getvalue())


@pytest.mark.parametrize(
    "name",
    [
        "token",
        "auth_token",
        "TokenHash",
        "bearer_token_id",
        "Peer",
        "1st",
        "_peer",
        "message",
        "x" * 65,
    ],
)
def test_bad_field_names_are_refused(name: str) -> None:
    logger = logging.getLogger("avd.refused")
    logger.setLevel(logging.CRITICAL)  # refused even when the record would be filtered out
    try:
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            log_event(logger, logging.INFO, LogEvent.DAEMON_STARTED, "x", **{name: "secret"})
    finally:
        logger.setLevel(logging.NOTSET)


def test_message_ids_are_fixed_unique_uuids() -> None:
    ids = [event.message_id for event in LogEvent]
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in ids)
    assert len(set(ids)) == len(ids) == 14
    assert LogEvent.CONNECTION_OPENED.message_id == "afe6d1a3c3de4b96a82584c03d37a853"


def test_the_readme_lists_every_message_id() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("| event | `MESSAGE_ID` |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"\| `([0-9a-f]{32})` \|", table)
    assert sorted(listed) == sorted(event.message_id for event in LogEvent)


def test_every_event_is_logged_somewhere() -> None:
    """An ID the code never sends is one an operator would wait for in vain."""
    package = Path(__file__).resolve().parent.parent / "avd"
    used = {
        name
        for path in package.rglob("*.py")
        if path.name != "logs.py"
        for name in re.findall(r"LogEvent\.([A-Z_]+)", path.read_text())
    }
    # The connection events go through their own helpers in avd.logs.
    used |= {"CONNECTION_OPENED", "CONNECTION_CLOSED", "AUTH_FAILED"}
    assert sorted(event.name for event in LogEvent if event.name not in used) == []


def test_close_reasons_are_the_readmes() -> None:
    assert {reason.value for reason in CloseReason} == {
        "bye", "peer-closed", "timeout", "auth-failed", "protocol-error", "tls-error",
        "shutdown", "replaced", "token-revoked", "error",
    }  # fmt: skip
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = readme.split("Close reasons: ", 1)[1].split(". ", 1)[0]
    assert re.findall(r"`([a-z-]+)`", line) == [reason.value for reason in CloseReason]


def test_journal_datagram_fields(journal_socket: tuple[socket.socket, str]) -> None:
    sock, path = journal_socket
    setup_logging(role="receiver", log_format="journal", journal_socket=path)
    open_cam1(logging.getLogger("avd.receiver"))
    fields = receive(sock)
    assert fields["MESSAGE"].startswith("connection opened peer=203.0.113.5:50122 sender=cam1")
    assert fields["MESSAGE_ID"] == LogEvent.CONNECTION_OPENED.message_id
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "avd-receiver"
    assert fields["LOGGER"] == "avd.receiver"
    assert fields["CODE_FUNC"] == "open_cam1"  # the caller, not a helper inside avd.logs
    assert fields["CODE_FILE"] == __file__
    assert int(fields["CODE_LINE"]) > 0
    assert fields["PEER"] == "203.0.113.5:50122"
    assert fields["SENDER_ID"] == "cam1"
    assert fields["STREAM"] == "video"
    assert fields["TLS_VERSION"] == "TLSv1.3"
    assert fields["TLS_CIPHER"] == "TLS_AES_256_GCM_SHA384"
    assert "EXCEPTION" not in fields


@pytest.mark.parametrize("role", ["receiver", "avd-receiver"])
def test_journal_identifier_from_role(journal_socket: tuple[socket.socket, str], role: str) -> None:
    sock, path = journal_socket
    setup_logging(role=role, log_format="journal", journal_socket=path)
    logging.getLogger("avd.x").info("hi")
    assert receive(sock)["SYSLOG_IDENTIFIER"] == "avd-receiver"


def test_journal_priorities(journal_socket: tuple[socket.socket, str]) -> None:
    sock, path = journal_socket
    setup_logging(role="sender", log_format="journal", level="DEBUG", journal_socket=path)
    logger = logging.getLogger("avd.x")
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        logger.log(level, "at %s", logging.getLevelName(level))
    got = [receive(sock) for _ in range(5)]
    assert [f["PRIORITY"] for f in got] == ["7", "6", "4", "3", "2"]
    assert got[0]["MESSAGE"] == "at DEBUG"
    assert "MESSAGE_ID" not in got[0]  # plain records have no event
    assert got[0]["SYSLOG_IDENTIFIER"] == "avd-sender"


def test_journal_traceback_is_one_entry(journal_socket: tuple[socket.socket, str]) -> None:
    sock, path = journal_socket
    setup_logging(role="sender", log_format="journal", journal_socket=path)
    try:
        {"present": 1}["missing"]
    except KeyError:
        logging.getLogger("avd.x").exception("lookup failed")
    fields = receive(sock)
    assert_no_more(sock)
    assert fields["MESSAGE"].startswith("lookup failed\nTraceback (most recent call last):")
    assert fields["MESSAGE"].endswith("KeyError: 'missing'")
    assert fields["EXCEPTION"].startswith("Traceback")
    assert fields["PRIORITY"] == "3"


def test_journal_binary_safe_and_truncated(journal_socket: tuple[socket.socket, str]) -> None:
    sock, path = journal_socket
    setup_logging(role="sender", log_format="journal", journal_socket=path)
    logger = logging.getLogger("avd.x")
    log_event(logger, logging.INFO, LogEvent.DEVICE_LOST, "lost", detail="line 1\nline=2\n")
    log_event(logger, logging.INFO, LogEvent.DEVICE_BACK, "é" * MAX_VALUE_BYTES)
    multi, huge = receive(sock), receive(sock)
    assert multi["DETAIL"] == "line 1\nline=2\n"
    assert multi["MESSAGE_ID"] == LogEvent.DEVICE_LOST.message_id
    # Cut at a character boundary: "é" is 2 bytes, so exactly half the bytes survive.
    assert huge["MESSAGE"] == "é" * (MAX_VALUE_BYTES // 2)


def test_journal_falls_back_to_stderr_without_socket(tmp_path: Path) -> None:
    out = io.StringIO()
    handler = make_handler(
        role="sender", log_format="journal", stream=out, journal_socket=str(tmp_path / "none")
    )
    logger = logging.getLogger("avd.fallback")
    logger.addHandler(handler)
    try:
        logger.warning("journald is away")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert re.fullmatch(f"{TS} WARNING avd.fallback: journald is away\n", out.getvalue())


AUTO_CHILD = """
import logging, sys
from avd.logs import setup_logging
setup_logging(role="sender", journal_socket=sys.argv[1])
logging.getLogger("avd.child").warning("hello from the child")
"""


def run_auto_child(tmp_path: Path, socket_path: str, *, inode_shift: int) -> str:
    """Run a process with stderr on a file and JOURNAL_STREAM naming that file (or not)."""
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        status = os.fstat(stderr.fileno())
        env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM")}
        env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino + inode_shift}"
        subprocess.run(
            [sys.executable, "-c", AUTO_CHILD, socket_path],
            stderr=stderr,
            env=env,
            cwd=REPO,
            check=True,
            timeout=30,
        )
    return stderr_path.read_text()


def test_auto_picks_journal_when_stderr_is_the_journal(
    tmp_path: Path, journal_socket: tuple[socket.socket, str]
) -> None:
    sock, path = journal_socket
    stderr = run_auto_child(tmp_path, path, inode_shift=0)
    fields = receive(sock)
    assert fields["MESSAGE"] == "hello from the child"
    assert fields["SYSLOG_IDENTIFIER"] == "avd-sender"
    assert stderr == ""


def test_auto_picks_text_when_journal_stream_is_stale(
    tmp_path: Path, journal_socket: tuple[socket.socket, str]
) -> None:
    sock, path = journal_socket
    stderr = run_auto_child(tmp_path, path, inode_shift=1)
    assert re.fullmatch(f"{TS} WARNING avd.child: hello from the child\n", stderr)
    assert_no_more(sock)
