"""The messages between the receiver and its recording process: pure, no I/O.

The receiver's event loop hands every frame to a ``Recorder`` running in a child process
(``avd.media.recorder_process``), over one socket pair per direction. A message is a 5-byte
header, kind (u8) and body length (u32, little-endian), then the body:

parent to child
  START  a pickled ``StreamInfo``          a stream began (its session id names it from then on)
  FRAME  41 bytes of ``_FRAME`` then the payload: session id, seq, capture µs, arrival µs,
         local capture µs, flags (1: late, 2: local capture µs is known)
  END    session id (i64)                  the stream ended
  STOP   empty                             write out, close every segment, report, exit

child to parent
  READY  empty                             the recorder is up
  DONE   a pickled list of ``FrameDone``   frames the recorder is finished with
  STATS  a pickled dict of sender id to ``RecorderStats`` fields

Pickle is safe here: both ends are this program, over a socket pair no one else holds.
Frames, the only frequent message, are packed by hand: one ``struct`` call and the payload,
which the sender side passes on as is (``sendmsg`` of header and payload, no join).
"""

from __future__ import annotations

import enum
import pickle
import struct
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from avd.media.base import ReceivedFrame, StreamInfo
from avd.media.done import RecorderStats

HEADER = struct.Struct("<BI")
_FRAME = struct.Struct("<qQqqqB")
_FRAME_MESSAGE = struct.Struct("<BI" + _FRAME.format[1:])  # header and frame fields at once
_SESSION = struct.Struct("<q")
_LATE, _HAS_LOCAL = 1, 2
# Far above any frame the receiver accepts (8 MiB at most, avd.protocol): a longer message
# is a bug on the other side, not something to buffer.
MAX_BODY = 64 * 1024 * 1024


class Kind(enum.IntEnum):
    START = 1
    FRAME = 2
    END = 3
    STOP = 4
    READY = 10
    DONE = 11
    STATS = 12


class WireError(ValueError):
    """The other end sent something this module cannot read: a bug, never a peer's input."""


def message(kind: Kind, body: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(body)) + body


def start(info: StreamInfo) -> bytes:
    return message(Kind.START, pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL))


def end(session_id: int) -> bytes:
    return message(Kind.END, _SESSION.pack(session_id))


def frame_header(session_id: int, frame: ReceivedFrame) -> bytes:
    """The header and fields of a FRAME message; the payload follows it as it is."""
    flags = (_LATE if frame.late else 0) | (0 if frame.local_capture_us is None else _HAS_LOCAL)
    return _FRAME_MESSAGE.pack(
        Kind.FRAME,
        _FRAME.size + len(frame.data),
        session_id,
        frame.seq,
        frame.capture_us,
        frame.arrival_us,
        frame.local_capture_us or 0,
        flags,
    )


def parse_frame(body: bytes) -> tuple[int, ReceivedFrame]:
    """(session id, frame) from a FRAME body."""
    if len(body) < _FRAME.size:
        raise WireError(f"FRAME body of {len(body)} bytes, shorter than its fields")
    session_id, seq, capture_us, arrival_us, local_us, flags = _FRAME.unpack_from(body)
    frame = ReceivedFrame(
        seq=seq,
        capture_us=capture_us,
        arrival_us=arrival_us,
        local_capture_us=local_us if flags & _HAS_LOCAL else None,
        data=body[_FRAME.size :],
        late=bool(flags & _LATE),
    )
    return session_id, frame


def parse_session(body: bytes) -> int:
    if len(body) != _SESSION.size:
        raise WireError(f"END body of {len(body)} bytes, expected {_SESSION.size}")
    value: int = _SESSION.unpack(body)[0]
    return value


def pickled(kind: Kind, value: Any) -> bytes:
    return message(kind, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def stats_body(stats: dict[str, RecorderStats]) -> dict[str, dict[str, Any]]:
    """``RecorderStats`` as plain dicts (``asdict`` deep-copies: ten times slower)."""
    names = [f.name for f in fields(RecorderStats)]
    return {sender: {n: getattr(value, n) for n in names} for sender, value in stats.items()}


def unpickle(body: bytes) -> Any:
    return pickle.loads(body)  # noqa: S301 - our own child process, see the module docstring


class MessageReader:
    """Splits a byte stream into (kind, body) messages, whatever sizes it arrives in."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._buffer = bytearray()
        self._max_body = max_body

    def feed(self, data: bytes) -> Iterator[tuple[Kind, bytes]]:
        """Every message completed by ``data``; a partial one waits for the next call."""
        buffer = self._buffer
        buffer += data
        pos = 0
        try:
            while len(buffer) - pos >= HEADER.size:
                raw_kind, length = HEADER.unpack_from(buffer, pos)
                if length > self._max_body:
                    raise WireError(f"message of {length} bytes, over {self._max_body}")
                try:
                    kind = Kind(raw_kind)
                except ValueError:
                    raise WireError(f"unknown message kind {raw_kind}") from None
                start_at = pos + HEADER.size
                if len(buffer) - start_at < length:
                    break
                pos = start_at + length
                yield kind, bytes(buffer[start_at:pos])
        finally:
            del buffer[:pos]

    @property
    def pending(self) -> int:
        """Bytes of a message not yet complete."""
        return len(self._buffer)
