"""The exceptions avd raises, in one tree.

::

    AvdError
    ├── ConfigError            a setting is missing or wrong (exit 78, EX_CONFIG)
    ├── ProtocolError          the byte stream broke the protocol
    │   ├── LocalProtocolError     we tried to send something the protocol forbids (our bug)
    │   └── RemoteProtocolError    the peer sent something the protocol forbids
    │       └── FrameTooLarge          a length field over its limit, refused before buffering
    ├── AuthError              a token or certificate was refused (never says why to the peer)
    ├── DeviceError            a camera, microphone or speaker cannot be opened or read
    ├── BadFrame               a media payload failed its cheap validity check
    └── CertsExistError        `avd certs init` would overwrite files without --force

Messages never contain a token; they name the variable, file, device or peer at fault.
"""

from __future__ import annotations


class AvdError(Exception):
    """Base of every error avd raises on purpose."""


class ConfigError(AvdError):
    """A setting is missing or has a bad value. The message names the variable."""


class ProtocolError(AvdError):
    """The framed byte stream violated the protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class FrameTooLarge(RemoteProtocolError):
    """A frame's length field is over the limit for its kind; nothing was buffered."""


class ListenError(AvdError):
    """A port cannot be listened on (in use, or an address not of this host). The message
    names the variables; unlike a bad setting it may pass, so the daemon exits 1, restartable.
    """


class AuthError(AvdError):
    """Authentication failed. The peer is never told why."""


class DeviceError(AvdError):
    """A capture or playback device cannot be opened or read. The message names it."""


class BadFrame(AvdError):
    """A media payload failed validation (for example, not a JPEG of the announced size)."""


class CertsExistError(AvdError):
    """Certificate files already exist and --force was not given."""
