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


def parse_frame(body: bytes | memoryview) -> tuple[int, ReceivedFrame]:
    """(session id, frame) from a FRAME body."""
    if len(body) < _FRAME.size:
        raise WireError(f"FRAME body of {len(body)} bytes, shorter than its fields")
    session_id, seq, capture_us, arrival_us, local_us, flags = _FRAME.unpack_from(body)
    frame = ReceivedFrame(
        seq=seq,
        capture_us=capture_us,
        arrival_us=arrival_us,
        local_capture_us=local_us if flags & _HAS_LOCAL else None,
        data=bytes(body[_FRAME.size :]),  # the one copy of the payload
        late=bool(flags & _LATE),
    )
    return session_id, frame


def parse_session(body: bytes | memoryview) -> int:
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


def unpickle(body: bytes | memoryview) -> Any:
    return pickle.loads(body)  # noqa: S301 - our own child process, see the module docstring


class MessageReader:
    """Splits a byte stream into (kind, body) messages, whatever sizes it arrives in.

    Bodies are memoryviews, not copies: into the ``bytes`` just fed, which the view keeps
    alive, or, for a message that two reads cut in two, into a buffer of its own that
    nothing else writes to. A FRAME's payload is then copied once, by ``parse_frame``, where
    slicing the stream into bytes cost three copies of every frame.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._partial = bytearray()  # the start of a message the last read cut short
        self._max_body = max_body

    def feed(self, data: bytes) -> Iterator[tuple[Kind, memoryview]]:
        """Every message completed by ``data``; a partial one waits for the next call."""
        view = memoryview(data)
        pos = self._complete_partial(view) if self._partial else 0
        if pos < 0:
            return  # all of it went into the partial message, still not complete
        if pos:
            done, self._partial = self._partial, bytearray()
            yield self._check(done, 0)[0], memoryview(done)[HEADER.size :]
        end = len(view)
        while end - pos >= HEADER.size:
            kind, length = self._check(view, pos)
            start_at = pos + HEADER.size
            if end - start_at < length:
                break
            pos = start_at + length
            yield kind, view[start_at:pos]
        if pos < end:
            self._partial += view[pos:]

    def _complete_partial(self, view: memoryview) -> int:
        """Move into the partial message the bytes it lacks: how many were taken, or -1 if
        ``view`` ran out first."""
        taken = 0
        if len(self._partial) < HEADER.size:
            taken = min(HEADER.size - len(self._partial), len(view))
            self._partial += view[:taken]
            if len(self._partial) < HEADER.size:
                return -1
        total = HEADER.size + self._check(self._partial, 0)[1]
        more = min(total - len(self._partial), len(view) - taken)
        self._partial += view[taken : taken + more]
        return taken + more if len(self._partial) == total else -1

    def _check(self, buffer: bytes | bytearray | memoryview, pos: int) -> tuple[Kind, int]:
        raw_kind, length = HEADER.unpack_from(buffer, pos)
        if length > self._max_body:
            raise WireError(f"message of {length} bytes, over {self._max_body}")
        try:
            return Kind(raw_kind), length
        except ValueError:
            raise WireError(f"unknown message kind {raw_kind}") from None

    @property
    def pending(self) -> int:
        """Bytes of a message not yet complete."""
        return len(self._partial)
