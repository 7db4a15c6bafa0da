"""Settings for the sender and the receiver (pydantic-settings, prefix ``AVD_``).

Each daemon builds its settings object once, in ``main``, from the environment and an
optional ``--env-file`` (the same ``KEY=value`` format systemd's ``EnvironmentFile=``
reads), and passes it down. There is no module-level instance. A bad value becomes a
``ConfigError`` whose one line names the variable; the CLI exits 78 (EX_CONFIG) with it.
``config.example.env`` documents every variable; a test keeps it in step with this file.
pydantic-settings ignores a variable it does not know, so a misspelt name would leave its
setting at the default without a word: ``unknown_variables`` names them for the daemons'
logs and ``avd check``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from dotenv import dotenv_values
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from avd.errors import ConfigError
from avd.eventloop import EventLoopName
from avd.media.base import AudioFormat, VideoFormat
from avd.media.specs import check_audio_source
from avd.protocol import SENDER_ID_RE


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _empty_is_unset(value: object) -> object:
    """An empty value (``AVD_RECORD_DIR=`` in an env file) means the variable is unset: as a
    path it would otherwise be ``.``, the daemon's working folder."""
    return None if isinstance(value, str) and not value.strip() else value


def _plain_host(value: str) -> str:
    """A host name or address, as sockets take it: ``[::1]`` (a URL's way) is ``::1``; a
    port, a scheme or a path is refused here, where it would otherwise be looked up as a
    host name for ever ("Name or service not known")."""
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)  # "fe80::1%eth0" included
        except ValueError:
            raise ValueError(
                "a host name or address only, without a port or scheme (the ports are "
                "AVD_VIDEO_PORT and AVD_AUDIO_PORT)"
            ) from None
    if "/" in host or any(c.isspace() for c in host):
        raise ValueError("a host name or address only, without a path or spaces")
    return host


def _not_blank(host: str) -> str:
    if not host:
        raise ValueError("a host name or address is needed")
    return host


Host = Annotated[str, AfterValidator(_plain_host)]
ExistingFile = Annotated[Path, AfterValidator(_existing_file)]
OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_unset)]
OptionalFile = Annotated[ExistingFile | None, BeforeValidator(_empty_is_unset)]
OptionalText = Annotated[str | None, BeforeValidator(_empty_is_unset)]
OptionalPositive = Annotated[Annotated[float, Field(gt=0)] | None, BeforeValidator(_empty_is_unset)]
Port = Annotated[int, Field(ge=1, le=65535)]
ListenPort = Annotated[int, Field(ge=0, le=65535)]  # 0: the kernel picks a free port
PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]

LogFormat = Literal["auto", "journal", "text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
TlsMinVersion = Literal["1.3", "1.2"]


def parse_host_port(value: str, variable: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (port 0: any free one); ConfigError naming ``variable``."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{variable}: expected host:port, got {value!r}")
    return host, int(port)


def join_host_port(host: str, port: int | str) -> str:
    """``parse_host_port``'s inverse, as logs write an address: ``[v6]:port`` for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CommonSettings(BaseSettings):
    """Settings both daemons share."""

    model_config = SettingsConfigDict(
        env_prefix="AVD_", extra="ignore", case_sensitive=False, validate_default=True
    )

    video_port: Port = Field(5000, description="TCP port of the video stream")
    audio_port: Port = Field(5001, description="TCP port of the audio stream")
    tls_min_version: TlsMinVersion = Field(
        "1.3", description="lowest TLS version accepted; 1.2 only if set explicitly"
    )
    handshake_timeout_s: PositiveSeconds = Field(
        5.0, description="TLS handshake plus hello must complete within this many seconds"
    )
    heartbeat_s: PositiveSeconds = Field(
        1.0, description="heartbeat interval; a peer silent for 3 intervals is dropped"
    )
    metrics_addr: OptionalText = Field(
        None, description="host:port of the Prometheus endpoint; unset = no endpoint"
    )
    log_format: LogFormat = Field("auto", description="auto, journal, text or json")
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    event_loop: EventLoopName = Field(
        "uvloop", description="uvloop, or asyncio for Python's own event loop"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("metrics_addr")
    @classmethod
    def _check_metrics_addr(cls, value: str | None) -> str | None:
        if value:
            try:
                parse_host_port(value, "AVD_METRICS_ADDR")
            except ConfigError as exc:
                raise ValueError("expected host:port, for example 127.0.0.1:9400") from exc
        return value

    @property
    def metrics_endpoint(self) -> tuple[str, int] | None:
        if not self.metrics_addr:
            return None
        return parse_host_port(self.metrics_addr, "AVD_METRICS_ADDR")

    @property
    def allow_tls12(self) -> bool:
        return self.tls_min_version == "1.2"


class ReceiverSettings(CommonSettings):
    """``avd-receiver``: listens, authenticates senders, records and plays."""

    bind: Host = Field(
        "0.0.0.0",  # noqa: S104
        description="address to listen on: 0.0.0.0 every IPv4 one, :: every IPv6 one, empty both",
    )
    video_port: ListenPort = Field(5000, description="TCP port of the video stream (0: any)")
    audio_port: ListenPort = Field(5001, description="TCP port of the audio stream (0: any)")
    tls_cert: ExistingFile = Field(description="the receiver's certificate (PEM)")
    tls_key: ExistingFile = Field(description="the receiver's private key (PEM, mode 0600)")
    tls_client_ca: OptionalFile = Field(
        None, description="when set, senders must present a client certificate signed by it"
    )
    tokens_file: ExistingFile = Field(description="sender ids and token hashes, one per line")
    record_dir: OptionalPath = Field(None, description="where recordings go; unset = none")
    segment_seconds: Annotated[float, Field(ge=1, le=3600)] = Field(
        60.0, description="length of one recording segment"
    )
    retention_days: OptionalPositive = Field(
        None, description="delete segments older than this many days"
    )
    record_max_gb: OptionalPositive = Field(
        None, description="keep the recordings folder under this many GB"
    )
    min_free_gb: Annotated[float, Field(ge=0)] | None = Field(
        1.0, description="keep at least this many GB free on the recordings file system"
    )
    record_buffer_mb: Annotated[int, Field(ge=8, le=65536)] = Field(
        256,
        description="MB of media that may wait for the recorder (cameras starting at once, "
        "a slow disk) before frames are left out of the recordings",
    )
    playback: str = Field(
        "default", description="speaker: none, default, or a device index or name substring"
    )
    playback_sender: OptionalText = Field(
        None,
        description="which sender is heard",
        json_schema_extra={"shown_default": "the first to connect"},
    )
    playback_buffer_ms: Annotated[int, Field(ge=10, le=2000)] = Field(
        60, description="jitter buffer depth of the speaker"
    )
    idle_timeout_s: PositiveSeconds = Field(
        10.0, description="close a session that sent nothing at all for this long"
    )
    max_connections: Annotated[int, Field(ge=1)] = Field(
        1024, description="concurrent connections in total, both ports together (4 open files each)"
    )
    max_connections_per_ip: Annotated[int, Field(ge=1)] = Field(
        64, description="concurrent connections from one source address (IPv6: one /64)"
    )
    auth_max_failures: Annotated[int, Field(ge=1, le=1000)] = Field(
        5, description="failed authentications from one address before it is locked out"
    )
    auth_window_s: PositiveSeconds = Field(
        60.0, description="the window in which those failures are counted"
    )
    auth_lockout_s: PositiveSeconds = Field(
        600.0, description="how long a locked-out address is refused"
    )
    max_video_frame_kb: Annotated[int, Field(ge=16, le=65536)] = Field(
        8192, description="largest JPEG frame accepted, in KiB"
    )
    max_audio_chunk_kb: Annotated[int, Field(ge=1, le=1024)] = Field(
        256, description="largest audio chunk accepted, in KiB"
    )


def _default_sender_id() -> str:
    """The host name, trimmed to what a sender id may hold."""
    name = socket.gethostname().split(".")[0]
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:64]
    return cleaned if SENDER_ID_RE.fullmatch(cleaned) else "sender"


class SenderSettings(CommonSettings):
    """``avd-sender``: captures and streams to one receiver."""

    receiver_host: Annotated[Host, AfterValidator(_not_blank)] = Field(
        description="host name or address of the receiver"
    )
    tls_ca: ExistingFile = Field(
        description="CA certificate that signed the receiver's certificate"
    )
    tls_server_name: OptionalText = Field(
        None,
        description="name to verify in the receiver's certificate",
        json_schema_extra={"shown_default": "AVD_RECEIVER_HOST"},
    )
    tls_cert: OptionalPath = Field(None, description="client certificate, for mutual TLS")
    tls_key: OptionalPath = Field(None, description="client private key, for mutual TLS")
    sender_id: str = Field(
        default_factory=_default_sender_id,
        description="this sender's name, as the receiver's tokens file knows it",
        json_schema_extra={"shown_default": "this machine's host name"},
    )
    token_file: OptionalPath = Field(None, description="file holding this sender's token")
    token: SecretStr | None = Field(
        None, description="the token itself (prefer AVD_TOKEN_FILE or a credential)"
    )
    video_source: str = Field(
        "0", description="test, a camera index, a device path, a file or URL, or none"
    )
    video_loop: bool = Field(False, description="loop a video file source at its end")
    audio_source: str = Field(
        "mic", description="test, mic, mic:<index or name>, a .wav file, or none"
    )
    audio_loop: bool = Field(False, description="loop a WAV file source at its end")
    width: Annotated[int, Field(ge=16, le=7680)] = Field(640, description="video width")
    height: Annotated[int, Field(ge=16, le=4320)] = Field(480, description="video height")
    fps: Annotated[int, Field(ge=1, le=120)] = Field(20, description="video frames per second")
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = Field(70, description="JPEG quality")
    audio_rate: Annotated[int, Field(ge=8000, le=192000)] = Field(44100, description="Hz")
    audio_channels: Annotated[int, Field(ge=1, le=8)] = Field(1, description="1 mono, 2 stereo")
    audio_chunk: Annotated[int, Field(ge=64, le=8192)] = Field(
        1024, description="frames per audio chunk"
    )
    reconnect_max_s: Annotated[float, Field(ge=0.5, le=3600)] = Field(
        10.0, description="longest wait between reconnection attempts (a refused token: 65 s)"
    )
    video_queue_frames: Annotated[int, Field(ge=1, le=1000)] = Field(
        4, description="frames held while the network is slow; the oldest is dropped"
    )
    audio_queue_ms: Annotated[int, Field(ge=50, le=60_000)] = Field(
        1000, description="audio held while the network is slow; the oldest is dropped"
    )
    dynamic_quality: bool = Field(
        True, description="lower JPEG quality, then frame rate, while the link cannot keep up"
    )
    min_jpeg_quality: Annotated[int, Field(ge=1, le=100)] = Field(
        30, description="the lowest JPEG quality dynamic quality may choose"
    )
    min_fps: Annotated[int, Field(ge=1, le=120)] = Field(
        5, description="the lowest frame rate dynamic quality may choose"
    )
    spool_seconds: Annotated[float, Field(ge=0, le=86_400)] = Field(
        30.0, description="seconds of unacknowledged media kept for re-sending after an outage"
    )
    spool_max_mb: Annotated[int, Field(ge=1, le=65_536)] = Field(
        64, description="memory cap of each stream's spool, in MiB"
    )
    spool_dir: OptionalPath = Field(
        None,
        description="spool overflow goes to files here, kept across restarts; unset = memory only",
    )
    spool_disk_max_mb: Annotated[int, Field(ge=1, le=1_048_576)] = Field(
        1024, description="disk cap of each stream's spool under AVD_SPOOL_DIR, in MiB"
    )

    @field_validator("sender_id", mode="before")
    @classmethod
    def _empty_is_the_host_name(cls, value: object) -> object:
        # AVD_SENDER_ID= (config.example.env's line, uncommented) means the default.
        return _default_sender_id() if _empty_is_unset(value) is None else value

    @field_validator("sender_id")
    @classmethod
    def _valid_sender_id(cls, value: str) -> str:
        if not SENDER_ID_RE.fullmatch(value):
            raise ValueError("1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
        return value

    @field_validator("audio_source")
    @classmethod
    def _known_audio_source(cls, value: str) -> str:
        return check_audio_source(value)

    @model_validator(mode="after")
    def _something_to_send(self) -> SenderSettings:
        # Here rather than when the sources open: `avd check sender` says it too.
        if self.video_source == "none" and self.audio_source == "none":
            raise ValueError("AVD_VIDEO_SOURCE and AVD_AUDIO_SOURCE are both none: nothing to send")
        return self

    @property
    def video_format(self) -> VideoFormat:
        return VideoFormat(self.width, self.height, self.fps, self.jpeg_quality)

    @property
    def audio_format(self) -> AudioFormat:
        return AudioFormat(self.audio_rate, self.audio_channels, 2, self.audio_chunk)

    @property
    def server_name(self) -> str:
        return self.tls_server_name or self.receiver_host


SettingsT = TypeVar("SettingsT", bound=CommonSettings)

# Values of these variables never appear in an error message.
_SECRET_FIELDS = frozenset({"token"})


def _describe(error: Any) -> str:
    """One line for one pydantic error: ``AVD_FPS: Input should be ... (got 'abc')``."""
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if not error.get("loc"):  # a check of several settings together names them itself
        return message
    field = str(error["loc"][0])
    variable = f"AVD_{field.upper()}"
    if error.get("type") == "missing":
        return f"{variable}: required but not set"
    if field in _SECRET_FIELDS:
        return f"{variable}: {message}"
    return f"{variable}: {message} (got {error.get('input')!r})"


def load_settings(cls: type[SettingsT], env_file: Path | None = None) -> SettingsT:
    """Build settings from the environment (winning) and ``env_file``; ConfigError if bad."""
    if env_file is not None and not env_file.is_file():
        raise ConfigError(f"--env-file: no such file: {env_file}")
    try:
        return cls(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = [_describe(error) for error in exc.errors()]
        raise ConfigError("; ".join(lines)) from None


# deploy/install.sh's own variables: avd's, but no daemon's settings.
_INSTALLER_VARIABLES = frozenset({"AVD_INSTALL_ROOT", "AVD_PYTHON", "AVD_PIP_ARGS"})


@dataclass(frozen=True)
class UnknownVariable:
    """A variable avd was given and no daemon reads, and the setting it may have meant."""

    name: str
    where: str  # "the environment", or the env file's path
    guess: str | None

    @property
    def text(self) -> str:
        return f"{self.name} (in {self.where}) is not an avd setting and is ignored"

    @property
    def remedy(self) -> str:
        if self.guess is None:
            return "remove it (config.example.env lists every setting)"
        return f"did you mean {self.guess}?"


def setting_names() -> frozenset[str]:
    """Every variable either daemon reads. A daemon knows the other's too: config.example.env
    documents both in one file, and a receiver's setting in a sender's file is no typo."""
    fields = [*ReceiverSettings.model_fields, *SenderSettings.model_fields]
    return frozenset(f"AVD_{name.upper()}" for name in fields)


def unknown_variables(
    env_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> list[UnknownVariable]:
    """The ``AVD_*`` variables of the environment, and every line of ``env_file`` (where
    nothing but settings belongs, and a missing prefix is as silent as a typo), that no
    daemon reads, sorted by name."""
    known = setting_names()
    given: dict[str, str] = {}
    for name in os.environ if environ is None else environ:
        if name.upper().startswith("AVD_"):
            given.setdefault(name, "the environment")
    if env_file is not None:
        for name in dotenv_values(env_file):
            given.setdefault(name, str(env_file))
    unknown = []
    for name, where in sorted(given.items()):
        upper = name.upper()
        if upper in known or upper in _INSTALLER_VARIABLES:
            continue
        prefixed = upper if upper.startswith("AVD_") else f"AVD_{upper}"
        guesses = difflib.get_close_matches(prefixed, known, n=1, cutoff=0.75)
        unknown.append(UnknownVariable(name, where, guesses[0] if guesses else None))
    return unknown


def settings_help(cls: type[CommonSettings]) -> str:
    """Lines for ``--help``: every variable with its default and description."""
    lines = []
    for name, info in cls.model_fields.items():
        default = "required" if info.is_required() else f"default: {shown_default(info)}"
        lines.append(f"  AVD_{name.upper():<22} {info.description or ''} ({default})")
    return "\n".join(lines)


def shown_default(info: Any) -> str:
    """A setting's default as ``--help`` and config.example.env state it: as one would write
    it in an env file, or in words where it is not a value (``shown_default``)."""
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "shown_default" in extra:
        return str(extra["shown_default"])
    if info.default_factory is not None:
        return "computed"
    default = info.default
    if default is None:
        return "unset"
    return str(default).lower() if isinstance(default, bool) else str(default)


def credentials_directory() -> str | None:
    """systemd's ``$CREDENTIALS_DIRECTORY`` (LoadCredential=), if the daemon runs under it."""
    return os.environ.get("CREDENTIALS_DIRECTORY") or None
