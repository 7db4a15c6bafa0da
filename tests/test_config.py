"""Settings: defaults, the one-line errors that name the variable, and the example file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from avd.certs import CertPaths
from avd.config import (
    CommonSettings,
    ReceiverSettings,
    SenderSettings,
    join_host_port,
    load_settings,
    parse_host_port,
    setting_names,
    settings_help,
    unknown_variables,
)
from avd.envdoc import render_example_env
from avd.errors import ConfigError
from avd.sender import describe

from .conftest import Credentials, Daemon, receiver_env, start_receiver

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("AVD_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("ca.crt", "receiver.crt", "receiver.key", "tokens")}
    for path in paths.values():
        path.write_text("x")
    return paths


def as_receiver(env: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    """The receiver's required settings, naming real files."""
    env.setenv("AVD_TLS_CERT", str(files["receiver.crt"]))
    env.setenv("AVD_TLS_KEY", str(files["receiver.key"]))
    env.setenv("AVD_TOKENS_FILE", str(files["tokens"]))


def as_sender(env: pytest.MonkeyPatch, files: dict[str, Path], host: str = "r") -> None:
    """The sender's required settings, naming real files."""
    env.setenv("AVD_RECEIVER_HOST", host)
    env.setenv("AVD_TLS_CA", str(files["ca.crt"]))


def test_sender_defaults_match_the_original_readme(
    clean_env: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    clean_env.setenv("AVD_RECEIVER_HOST", "receiver.example")
    clean_env.setenv("AVD_TLS_CA", str(files["ca.crt"]))
    s = load_settings(SenderSettings)
    assert (s.video_port, s.audio_port) == (5000, 5001)
    assert (s.width, s.height, s.fps, s.jpeg_quality) == (640, 480, 20, 70)
    assert (s.audio_rate, s.audio_channels, s.audio_chunk) == (44100, 1, 1024)
    assert s.audio_format.sample_width == 2
    assert s.reconnect_max_s == 10
    assert s.tls_min_version == "1.3"
    assert not s.allow_tls12
    assert s.server_name == "receiver.example"
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", s.sender_id)


def test_receiver_defaults(clean_env: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    as_receiver(clean_env, files)
    s = load_settings(ReceiverSettings)
    assert s.bind == "0.0.0.0"
    assert (s.video_port, s.audio_port) == (5000, 5001)
    assert s.handshake_timeout_s == 5
    assert s.metrics_endpoint is None
    assert s.record_dir is None


def test_env_file_is_read_and_the_environment_wins(
    clean_env: pytest.MonkeyPatch, files: dict[str, Path], tmp_path: Path
) -> None:
    env_file = tmp_path / "sender.env"
    env_file.write_text(f"AVD_RECEIVER_HOST=from-file\nAVD_TLS_CA={files['ca.crt']}\nAVD_FPS=10\n")
    clean_env.setenv("AVD_FPS", "15")
    s = load_settings(SenderSettings, env_file)
    assert s.receiver_host == "from-file"
    assert s.fps == 15


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("AVD_FPS", "abc", "AVD_FPS: Input should be a valid integer"),
        ("AVD_FPS", "0", "AVD_FPS: Input should be greater than or equal to 1"),
        ("AVD_VIDEO_PORT", "70000", "AVD_VIDEO_PORT: Input should be less than or equal to 65535"),
        ("AVD_SENDER_ID", "bad id!", "AVD_SENDER_ID:"),
        ("AVD_METRICS_ADDR", "nocolon", "AVD_METRICS_ADDR: expected host:port"),
        ("AVD_TLS_MIN_VERSION", "1.0", "AVD_TLS_MIN_VERSION:"),
        ("AVD_LOG_LEVEL", "loud", "AVD_LOG_LEVEL:"),
        # Looked up as a host name for ever ("Name or service not known") before.
        ("AVD_RECEIVER_HOST", "cam.example:5000", "AVD_RECEIVER_HOST: a host name or address only"),
        ("AVD_RECEIVER_HOST", "https://cam.example", "AVD_RECEIVER_HOST: a host name or address"),
        # Refused when the settings load (avd check says it), not when the sources open.
        ("AVD_AUDIO_SOURCE", "microphone", "AVD_AUDIO_SOURCE: not none, test, mic,"),
        ("AVD_AUDIO_SOURCE", "mic: ", "AVD_AUDIO_SOURCE: audio source 'mic: ' names no device"),
    ],
)
def test_a_bad_value_names_its_variable(
    clean_env: pytest.MonkeyPatch, files: dict[str, Path], variable: str, value: str, expected: str
) -> None:
    as_sender(clean_env, files)
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings(SenderSettings)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_a_bracketed_ipv6_address_is_taken_as_a_url_would_write_it(
    clean_env: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    clean_env.setenv("AVD_TLS_CA", str(files["ca.crt"]))
    for written, meant in (("[::1]", "::1"), ("::1", "::1"), (" cam.example ", "cam.example")):
        clean_env.setenv("AVD_RECEIVER_HOST", written)
        assert load_settings(SenderSettings).receiver_host == meant


def test_a_bind_address_with_a_port_is_refused(
    clean_env: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    as_receiver(clean_env, files)
    clean_env.setenv("AVD_BIND", "0.0.0.0:5000")
    with pytest.raises(ConfigError, match=r"^AVD_BIND: a host name or address only, without a"):
        load_settings(ReceiverSettings)
    for bind in ("", "::", "[::]", "0.0.0.0"):
        clean_env.setenv("AVD_BIND", bind)
        assert load_settings(ReceiverSettings).bind == bind.strip("[]")


def test_two_sources_of_none_are_refused_with_the_settings_as_one_line(
    clean_env: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    # Found when the sources opened, so `avd check sender` said all was well of a sender
    # that would exit 78 at once.
    as_sender(clean_env, files)
    clean_env.setenv("AVD_VIDEO_SOURCE", "none")
    assert load_settings(SenderSettings).audio_source == "mic"
    clean_env.setenv("AVD_AUDIO_SOURCE", "none")
    with pytest.raises(ConfigError) as info:
        load_settings(SenderSettings)
    assert str(info.value) == (
        "AVD_VIDEO_SOURCE and AVD_AUDIO_SOURCE are both none: nothing to send"
    )


def test_missing_required_and_missing_files_are_named(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"AVD_TLS_CERT: required but not set"):
        load_settings(ReceiverSettings)
    clean_env.setenv("AVD_TLS_CERT", str(tmp_path / "nope.crt"))
    with pytest.raises(ConfigError, match=r"AVD_TLS_CERT: no such file: .*nope\.crt"):
        load_settings(ReceiverSettings)
    with pytest.raises(ConfigError, match=r"--env-file: no such file"):
        load_settings(ReceiverSettings, tmp_path / "missing.env")


def test_an_empty_optional_setting_is_unset_and_an_empty_receiver_host_is_refused(
    clean_env: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    # An env file's "AVD_RECORD_DIR=" must not record into the daemon's working folder.
    as_receiver(clean_env, files)
    blank_receiver = ("RECORD_DIR", "TLS_CLIENT_CA", "METRICS_ADDR", "PLAYBACK_SENDER")
    for variable in (*blank_receiver, "RETENTION_DAYS", "RECORD_MAX_GB"):
        clean_env.setenv(f"AVD_{variable}", " ")
    receiver = load_settings(ReceiverSettings)
    assert (receiver.record_dir, receiver.tls_client_ca) == (None, None)
    assert (receiver.metrics_addr, receiver.playback_sender) == (None, None)
    assert (receiver.retention_days, receiver.record_max_gb) == (None, None)
    clean_env.setenv("AVD_TLS_CA", str(files["ca.crt"]))
    blank_sender = ("SPOOL_DIR", "TOKEN_FILE", "TLS_CERT", "TLS_KEY", "TLS_SERVER_NAME")
    for variable in (*blank_sender, "SENDER_ID"):
        clean_env.setenv(f"AVD_{variable}", "")
    clean_env.setenv("AVD_RECEIVER_HOST", "")
    with pytest.raises(ConfigError, match=r"^AVD_RECEIVER_HOST: a host name or address is needed"):
        load_settings(SenderSettings)
    clean_env.setenv("AVD_RECEIVER_HOST", "r")
    sender = load_settings(SenderSettings)
    assert (sender.spool_dir, sender.token_file, sender.tls_cert, sender.tls_key) == (None,) * 4
    assert sender.server_name == "r"
    clean_env.delenv("AVD_SENDER_ID")
    assert sender.sender_id == load_settings(SenderSettings).sender_id  # the host name
    clean_env.setenv("AVD_SENDER_ID", "bad id")
    with pytest.raises(ConfigError, match=r"^AVD_SENDER_ID: 1-64 of"):
        load_settings(SenderSettings)


def test_a_bad_token_value_is_never_echoed(
    clean_env: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    as_sender(clean_env, files)
    clean_env.setenv("AVD_TOKEN", "s3cr3t-" * 8)
    s = load_settings(SenderSettings)
    assert "s3cr3t" not in repr(s)
    assert "s3cr3t" not in str(s)


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:9400", "X") == ("127.0.0.1", 9400)
    assert parse_host_port("[::1]:9400", "X") == ("::1", 9400)
    assert parse_host_port("localhost:0", "X") == ("localhost", 0)
    for bad in ("9400", "host:", ":9400", "host:-1", "host:99999"):
        with pytest.raises(ConfigError, match=r"^X: "):
            parse_host_port(bad, "X")
    for host, port in (("127.0.0.1", 9400), ("::1", 9400), ("fe80::1%eth0", 0), ("cam", 1)):
        assert parse_host_port(join_host_port(host, port), "X") == (host, port)
    assert join_host_port("::1", "5000/5001") == "[::1]:5000/5001"


def _documented(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^#?(AVD_[A-Z0-9_]+)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


@pytest.mark.parametrize("cls", [ReceiverSettings, SenderSettings])
def test_config_example_documents_every_variable_with_its_default(
    cls: type[CommonSettings],
) -> None:
    documented = _documented((REPO / "config.example.env").read_text())
    for name, info in cls.model_fields.items():
        variable = f"AVD_{name.upper()}"
        assert variable in documented, f"{variable} is missing from config.example.env"
        if not info.is_required() and info.default_factory is None and info.default is not None:
            default = (
                str(info.default).lower() if isinstance(info.default, bool) else str(info.default)
            )
            assert documented[variable] == default, (
                f"{variable}: example says {documented[variable]}"
            )
    assert "AVD_" in settings_help(cls)


def test_config_example_is_exactly_what_the_settings_render() -> None:
    assert (REPO / "config.example.env").read_text() == render_example_env(), (
        "config.example.env is stale: run `python -m avd.envdoc > config.example.env`"
    )


@pytest.mark.parametrize("cls", [ReceiverSettings, SenderSettings])
def test_help_states_each_default_once_as_it_would_be_written(
    cls: type[CommonSettings],
) -> None:
    lines = settings_help(cls).splitlines()
    assert len(lines) == len(cls.model_fields)
    for line in lines:
        assert line.count("default:") + line.count("(required)") == 1, line
        assert "(default: True)" not in line, line
        assert "(default: False)" not in line, line
    if cls is SenderSettings:
        (server_name,) = [line for line in lines if "AVD_TLS_SERVER_NAME" in line]
        assert server_name.endswith("(default: AVD_RECEIVER_HOST)")


def test_the_start_line_gives_a_format_only_to_sources_that_are_on(
    clean_env: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    clean_env.setenv("AVD_RECEIVER_HOST", "receiver.example")
    clean_env.setenv("AVD_TLS_CA", str(files["ca.crt"]))
    clean_env.setenv("AVD_SENDER_ID", "cam1")
    clean_env.setenv("AVD_VIDEO_SOURCE", "test")
    clean_env.setenv("AVD_AUDIO_SOURCE", "none")
    assert describe(load_settings(SenderSettings)) == (
        "sender cam1 -> receiver.example:5000/5001, video=test 640x480@20 q70, audio=none"
    )
    clean_env.setenv("AVD_VIDEO_SOURCE", "none")
    clean_env.setenv("AVD_AUDIO_SOURCE", "test")
    assert describe(load_settings(SenderSettings)).endswith("video=none, audio=test 44100 Hz")


def test_misspelt_variables_are_named_with_the_setting_they_may_have_meant(
    tmp_path: Path,
) -> None:
    env_file = tmp_path / "sender.env"
    env_file.write_text(
        "AVD_RECEIVER_HOST=r\n"  # a sender's setting
        "AVD_RECORD_DIR=/srv/rec\n"  # a receiver's: one file may serve both daemons
        "FPS=10\n"  # the prefix forgotten
        "export AVD_QUALTY=50\n"
        "AVD_FPS=5\n"  # also in the environment, whose value wins: named there
    )
    environ = {
        "PATH": "/usr/bin",  # not avd's
        "avd_fps": "20",  # names are not case sensitive
        "AVD_FPS": "20",
        "AVD_RECORDING_DIR": "/srv/rec",
        "AVD_SEGMENT_SECS": "60",
        "AVD_COLOUR": "red",  # nothing like any setting
        "AVD_PIP_ARGS": "--no-deps",  # deploy/install.sh's own
    }
    found = [(v.name, v.where, v.guess) for v in unknown_variables(env_file, environ)]
    assert found == [
        ("AVD_COLOUR", "the environment", None),
        ("AVD_QUALTY", str(env_file), "AVD_JPEG_QUALITY"),
        ("AVD_RECORDING_DIR", "the environment", "AVD_RECORD_DIR"),
        ("AVD_SEGMENT_SECS", "the environment", "AVD_SEGMENT_SECONDS"),
        ("FPS", str(env_file), "AVD_FPS"),
    ]
    lines = {v.name: f"{v.text}: {v.remedy}" for v in unknown_variables(env_file, environ)}
    assert lines["FPS"] == (
        f"FPS (in {env_file}) is not an avd setting and is ignored: did you mean AVD_FPS?"
    )
    assert lines["AVD_COLOUR"].endswith("remove it (config.example.env lists every setting)")


def test_every_documented_variable_is_known_and_nothing_else(clean_env: pytest.MonkeyPatch) -> None:
    documented = set(re.findall(r"^#?(AVD_\w+)=", (REPO / "config.example.env").read_text(), re.M))
    assert documented == set(setting_names())
    assert unknown_variables(REPO / "config.example.env", {}) == []
    for example in sorted((REPO / "deploy").glob("*.env.example")):
        assert unknown_variables(example, {}) == [], example


def test_the_daemon_logs_a_misspelt_variable_and_starts_anyway(
    pki: CertPaths, creds: Credentials, tmp_path: Path, daemons: list[Daemon]
) -> None:
    env = receiver_env(pki, creds.tokens_file, AVD_SEGMENT_SECS="5")
    receiver = start_receiver(env, tmp_path / "receiver.log")
    daemons.append(receiver.daemon)
    receiver.daemon.wait_for_log(
        r"WARNING .*AVD_SEGMENT_SECS \(in the environment\) is not an avd setting and is "
        r"ignored: did you mean AVD_SEGMENT_SECONDS\?"
    )
    assert receiver.daemon.stop() == 0
