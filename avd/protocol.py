"""The avd wire protocol: a pure, sans-IO state machine (no sockets, clocks or logging).

Each TCP connection (inside TLS) carries one stream, video or audio, of one sender. The
sender speaks first with a hello; the receiver answers welcome or a refusal that never says
why. Then media flows from sender to receiver, heartbeats flow both ways, the receiver
acknowledges what it has durably recorded, and either side may end with a goodbye.

Byte layout (all integers big-endian)::

    header, 8 bytes, before every message
      0  2  magic          b"AV" (0x41 0x56)
      2  1  version        protocol version, 1
      3  1  type           1 hello, 2 welcome, 3 refused, 4 media, 5 heartbeat, 6 ack,
                           7 goodbye, 8 floor
      4  4  length         payload length in bytes, checked against the type's limit
                           before a single payload byte is buffered

    hello (sender -> receiver, first message, at most 512 bytes)
      0  1  stream kind    1 video, 2 audio
      1  1  n              sender-id length, 1..64
      2  n  sender id      ASCII [A-Za-z0-9._-], starting with a letter or digit
      .  1  t              token length, 32..128
      .  t  token          ASCII, never logged
      .  1  flags          bit 0: probe (authenticate only, then goodbye: `avd check`)
      .  8  first seq      u64, the lowest seq this session may carry: the receiver acks
                           from there (frames below it were acknowledged or given up)
      video format: width u16, height u16, fps u16, jpeg quality u8          (7 bytes)
      audio format: rate u32, channels u8, sample width u8, chunk frames u16 (8 bytes)

    welcome (receiver -> sender, 12 bytes)
      0  4  session id     u32, names the session in both sides' logs
      4  4  heartbeat ms   u32, the interval both sides send heartbeats at
      8  4  max payload    u32, the largest media payload the receiver accepts

    refused (receiver -> sender, empty): authentication or admission failed; no reason given

    media (sender -> receiver, 17-byte prefix + payload)
      0  8  seq            u64, per stream, from 0, +1 per frame
      8  8  capture µs     u64, the sender's monotonic clock, shared by its streams
     16  1  flags          bit 0: late (sent from the spool after an outage)
     17  .  payload        one JPEG (video) or one chunk of PCM s16le (audio)

    heartbeat (both ways, 20 bytes)
      0  8  sent µs        u64, the sender-of-this-heartbeat's monotonic clock
      8  8  echo µs        u64, the sent µs of the last heartbeat received, 0 if none
     16  4  held µs        u32, how long that heartbeat was held before this echo

    ack (receiver -> sender, 8 bytes)
      0  8  seq            u64, every frame up to and including seq is durably recorded

    floor (sender -> receiver, 8 bytes)
      0  8  seq            u64, the oldest frame the sender still holds: every frame below
                           it was acknowledged or evicted from the spool, so the receiver's
                           acknowledgement may pass any gap below it

    goodbye (both ways, 2..257 bytes)
      0  1  reason         0 bye, 1 shutdown, 2 timeout, 3 protocol error, 4 replaced,
                           5 revoked, 6 overloaded
      1  1  n              text length
      2  n  text           UTF-8, for logs

A goodbye closes one direction, as TCP's FIN does: the side that receives it may still send
(the receiver its last acks, once what the sender sent is recorded) and then its own goodbye.

Errors follow h11: ``RemoteProtocolError`` when the peer breaks the rules,
``LocalProtocolError`` when we try to; after either, the connection stays failed.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, field

from avd.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from avd.media.base import AudioFormat, MediaFormat, StreamKind, VideoFormat

MAGIC = b"AV"
VERSION = 1
HEADER = struct.Struct(">2sBBI")
MEDIA_PREFIX = struct.Struct(">QQB")
WELCOME_BODY = struct.Struct(">III")
HEARTBEAT_BODY = struct.Struct(">QQI")
ACK_BODY = struct.Struct(">Q")
FIRST_SEQ = struct.Struct(">Q")
VIDEO_FORMAT = struct.Struct(">HHHB")
AUDIO_FORMAT = struct.Struct(">IBBH")

FLAG_LATE = 0x01  # media flags
FLAG_PROBE = 0x01  # hello flags
SENDER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_MIN, TOKEN_MAX = 32, 128
U32_MAX = 0xFFFF_FFFF

# A 640x480 JPEG at quality 70 is ~36 KiB; 1080p at quality 100 stays under 2 MiB. 8 MiB
# leaves room for 4K while bounding what one peer can make us buffer.
DEFAULT_MAX_VIDEO_PAYLOAD = 8 * 1024 * 1024
# One chunk of 8192 frames x 8 channels x 4 bytes is 256 KiB: far above any sane setting.
DEFAULT_MAX_AUDIO_PAYLOAD = 256 * 1024


class MessageType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSED = 3
    MEDIA = 4
    HEARTBEAT = 5
    ACK = 6
    GOODBYE = 7
    FLOOR = 8


class GoodbyeReason(enum.IntEnum):
    BYE = 0
    SHUTDOWN = 1
    TIMEOUT = 2
    PROTOCOL_ERROR = 3
    REPLACED = 4
    REVOKED = 5
    OVERLOADED = 6


# Fixed-size bodies are checked for their exact size; the others against a ceiling.
_EXACT_SIZE = {
    MessageType.WELCOME: WELCOME_BODY.size,
    MessageType.REFUSED: 0,
    MessageType.HEARTBEAT: HEARTBEAT_BODY.size,
    MessageType.ACK: ACK_BODY.size,
    MessageType.FLOOR: ACK_BODY.size,
}
_MAX_SIZE = {MessageType.HELLO: 512, MessageType.GOODBYE: 257}


@dataclass(frozen=True, slots=True)
class Hello:
    sender_id: str
    kind: StreamKind
    format: MediaFormat
    token: bytes = field(repr=False)  # never shown: repr(Hello) omits it
    version: int = VERSION
    probe: bool = False  # authenticate only: no stream starts, no session is replaced
    first_seq: int = 0  # the lowest seq this session may carry (spooled frames included)


@dataclass(frozen=True, slots=True)
class Welcome:
    session_id: int
    heartbeat_ms: int
    max_payload: int


@dataclass(frozen=True, slots=True)
class Refused:
    pass


@dataclass(frozen=True, slots=True)
class Media:
    seq: int
    capture_us: int
    data: bytes = field(repr=False)
    late: bool = False


@dataclass(frozen=True, slots=True)
class Heartbeat:
    sent_us: int
    echo_us: int = 0
    held_us: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Floor:
    seq: int


@dataclass(frozen=True, slots=True)
class Goodbye:
    reason: GoodbyeReason | int
    text: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the byte stream cleanly, between two messages."""


Event = Hello | Welcome | Refused | Media | Heartbeat | Ack | Floor | Goodbye | ConnectionClosed


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-kind payload ceilings, enforced on the length field before buffering."""

    max_video_payload: int = DEFAULT_MAX_VIDEO_PAYLOAD
    max_audio_payload: int = DEFAULT_MAX_AUDIO_PAYLOAD

    def media_payload(self, kind: StreamKind) -> int:
        if kind is StreamKind.VIDEO:
            return self.max_video_payload
        return self.max_audio_payload


# ---- encoding -------------------------------------------------------------------------


def _frame(kind: MessageType, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, len(body)) + body


def _encode_format(fmt: MediaFormat) -> bytes:
    try:
        if isinstance(fmt, VideoFormat):
            return VIDEO_FORMAT.pack(fmt.width, fmt.height, fmt.fps, fmt.quality)
        return AUDIO_FORMAT.pack(fmt.rate, fmt.channels, fmt.sample_width, fmt.chunk)
    except struct.error as exc:
        raise LocalProtocolError(f"media format out of range: {fmt}") from exc


def encode_hello(hello: Hello) -> bytes:
    sender = hello.sender_id.encode("ascii", "replace")
    if not SENDER_ID_RE.fullmatch(hello.sender_id):
        raise LocalProtocolError(f"invalid sender id {hello.sender_id!r}")
    if not TOKEN_MIN <= len(hello.token) <= TOKEN_MAX:
        raise LocalProtocolError(f"token must be {TOKEN_MIN}..{TOKEN_MAX} bytes")
    expected = VideoFormat if hello.kind is StreamKind.VIDEO else AudioFormat
    if not isinstance(hello.format, expected):
        raise LocalProtocolError(f"{hello.kind.label} hello needs a {expected.__name__}")
    body = b"".join(
        (
            bytes((hello.kind, len(sender))),
            sender,
            bytes((len(hello.token),)),
            hello.token,
            bytes((FLAG_PROBE if hello.probe else 0,)),
            FIRST_SEQ.pack(hello.first_seq),
            _encode_format(hello.format),
        )
    )
    return _frame(MessageType.HELLO, body)


def encode_media_parts(media: Media) -> tuple[bytes, bytes]:
    """Header and prefix as one small bytes, the payload untouched: no copy of a frame."""
    try:
        prefix = MEDIA_PREFIX.pack(media.seq, media.capture_us, FLAG_LATE if media.late else 0)
    except struct.error as exc:
        raise LocalProtocolError(f"media seq or capture time out of range: {exc}") from exc
    head = HEADER.pack(MAGIC, VERSION, MessageType.MEDIA, len(prefix) + len(media.data))
    return head + prefix, media.data


def encode(event: Event) -> bytes:
    """The bytes of one message (for media, prefer ``encode_media_parts``)."""
    try:
        return _encode_message(event)
    except (struct.error, ValueError) as exc:
        # A field that does not fit its wire width is our bug, like any other local error.
        raise LocalProtocolError(f"{type(event).__name__} field out of range: {exc}") from exc


def _encode_message(event: Event) -> bytes:
    if isinstance(event, Hello):
        return encode_hello(event)
    if isinstance(event, Media):
        return b"".join(encode_media_parts(event))
    if isinstance(event, Welcome):
        body = WELCOME_BODY.pack(event.session_id, event.heartbeat_ms, event.max_payload)
        return _frame(MessageType.WELCOME, body)
    if isinstance(event, Refused):
        return _frame(MessageType.REFUSED, b"")
    if isinstance(event, Heartbeat):
        held = min(max(event.held_us, 0), U32_MAX)
        body = HEARTBEAT_BODY.pack(event.sent_us, event.echo_us, held)
        return _frame(MessageType.HEARTBEAT, body)
    if isinstance(event, Ack):
        return _frame(MessageType.ACK, ACK_BODY.pack(event.seq))
    if isinstance(event, Floor):
        return _frame(MessageType.FLOOR, ACK_BODY.pack(event.seq))
    if isinstance(event, Goodbye):
        # Cut on a character boundary: the layout promises UTF-8, not a split code point.
        text = event.text.encode("utf-8")[:255].decode("utf-8", "ignore").encode("utf-8")
        return _frame(MessageType.GOODBYE, bytes((int(event.reason), len(text))) + text)
    raise LocalProtocolError(f"{type(event).__name__} is not sent on the wire")


# ---- decoding -------------------------------------------------------------------------


def _decode_hello(body: bytes) -> Hello:
    try:
        kind = StreamKind(body[0])
        n = body[1]
        sender_raw = body[2 : 2 + n]
        t = body[2 + n]
        token = body[3 + n : 3 + n + t]
        flags = body[3 + n + t]
        (first_seq,) = FIRST_SEQ.unpack_from(body, 4 + n + t)
        pos = 4 + n + t + FIRST_SEQ.size
        fmt_struct = VIDEO_FORMAT if kind is StreamKind.VIDEO else AUDIO_FORMAT
        values = fmt_struct.unpack_from(body, pos)
    except (IndexError, ValueError, struct.error) as exc:
        raise RemoteProtocolError("malformed hello") from exc
    if pos + fmt_struct.size != len(body) or len(sender_raw) != n or len(token) != t:
        raise RemoteProtocolError("malformed hello: field lengths do not add up")
    sender_id = sender_raw.decode("ascii", "replace")
    if not SENDER_ID_RE.fullmatch(sender_id):
        raise RemoteProtocolError("malformed hello: invalid sender id")
    if not TOKEN_MIN <= t <= TOKEN_MAX:
        raise RemoteProtocolError("malformed hello: token length out of range")
    fmt: MediaFormat = VideoFormat(*values) if kind is StreamKind.VIDEO else AudioFormat(*values)
    return Hello(
        sender_id=sender_id,
        kind=kind,
        format=fmt,
        token=token,
        probe=bool(flags & FLAG_PROBE),
        first_seq=first_seq,
    )


def _decode_goodbye(body: bytes) -> Goodbye:
    if len(body) < 2 or len(body) != 2 + body[1]:
        raise RemoteProtocolError("malformed goodbye")
    try:
        reason: GoodbyeReason | int = GoodbyeReason(body[0])
    except ValueError:
        reason = body[0]  # a newer peer's reason: still a goodbye
    return Goodbye(reason=reason, text=body[2:].decode("utf-8", "replace"))


def decode_body(kind: MessageType, body: bytes) -> Event:
    """One message's payload as an event. Sizes were checked by the framer."""
    if kind is MessageType.MEDIA:
        seq, capture_us, flags = MEDIA_PREFIX.unpack_from(body)
        return Media(seq, capture_us, body[MEDIA_PREFIX.size :], bool(flags & FLAG_LATE))
    if kind is MessageType.HEARTBEAT:
        return Heartbeat(*HEARTBEAT_BODY.unpack(body))
    if kind is MessageType.HELLO:
        return _decode_hello(body)
    if kind is MessageType.WELCOME:
        return Welcome(*WELCOME_BODY.unpack(body))
    if kind is MessageType.ACK:
        return Ack(*ACK_BODY.unpack(body))
    if kind is MessageType.FLOOR:
        return Floor(*ACK_BODY.unpack(body))
    if kind is MessageType.GOODBYE:
        return _decode_goodbye(body)
    return Refused()


class FrameDecoder:
    """Splits a byte stream into messages, refusing oversized ones from the header alone."""

    def __init__(self, media_limit: int) -> None:
        self._buffer = bytearray()
        self.media_limit = media_limit  # raised by the connection once the kind is known
        self.bytes_in = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self.bytes_in += len(data)

    def _limit(self, kind: MessageType) -> int:
        if kind is MessageType.MEDIA:
            return self.media_limit + MEDIA_PREFIX.size
        return _EXACT_SIZE.get(kind, _MAX_SIZE.get(kind, 0))

    def next_message(self) -> tuple[MessageType, bytes] | None:
        buf = self._buffer
        if len(buf) < HEADER.size:
            if buf and not MAGIC.startswith(bytes(buf[:2])):
                raise RemoteProtocolError("bad magic: not an avd peer")
            return None
        magic, version, raw_kind, length = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise RemoteProtocolError("bad magic: not an avd peer")
        if version != VERSION:
            raise RemoteProtocolError(f"unsupported protocol version {version}")
        try:
            kind = MessageType(raw_kind)
        except ValueError:
            raise RemoteProtocolError(f"unknown message type {raw_kind}") from None
        limit = self._limit(kind)
        if length > limit:
            raise FrameTooLarge(f"{kind.name.lower()} of {length} bytes exceeds {limit}")
        if kind in _EXACT_SIZE and length != _EXACT_SIZE[kind]:
            raise RemoteProtocolError(f"{kind.name.lower()} must be {_EXACT_SIZE[kind]} bytes")
        if kind is MessageType.MEDIA and length < MEDIA_PREFIX.size:
            raise RemoteProtocolError("media message shorter than its prefix")
        end = HEADER.size + length
        if len(buf) < end:
            return None
        # One copy out of the buffer (slicing the bytearray would copy twice); the views are
        # released before the buffer shrinks, which it refuses while one is exported.
        with memoryview(buf) as view, view[HEADER.size : end] as part:
            body = bytes(part)
        del buf[:end]
        return kind, body


# Role and State key ``_ALLOWED_IN``, looked up for every message received. Enum's own
# __hash__ is Python code (it hashes the name); members compare by identity, so hashing
# by identity is equivalent, and done in C.


class Role(enum.Enum):
    __hash__ = object.__hash__

    SENDER = "sender"
    RECEIVER = "receiver"


class State(enum.Enum):
    __hash__ = object.__hash__

    AWAIT_HELLO = "await-hello"  # receiver: nothing received yet
    HELLO_RECEIVED = "hello-received"  # receiver: must answer welcome or refused
    AWAIT_WELCOME = "await-welcome"  # sender: hello sent
    OPEN = "open"
    GOODBYE_SENT = "goodbye-sent"  # we send nothing more; the peer may still (final acks)
    GOODBYE_RECEIVED = "goodbye-received"  # the peer sends nothing more; we may answer
    CLOSED = "closed"
    FAILED = "failed"


# What each role may receive in each state; anything else is the peer's protocol error.
_ALLOWED_IN: dict[tuple[Role, State], frozenset[MessageType]] = {
    (Role.RECEIVER, State.AWAIT_HELLO): frozenset({MessageType.HELLO}),
    (Role.RECEIVER, State.OPEN): frozenset(
        {MessageType.MEDIA, MessageType.HEARTBEAT, MessageType.FLOOR, MessageType.GOODBYE}
    ),
    (Role.SENDER, State.AWAIT_WELCOME): frozenset(
        {MessageType.WELCOME, MessageType.REFUSED, MessageType.GOODBYE}
    ),
    (Role.SENDER, State.OPEN): frozenset(
        {MessageType.HEARTBEAT, MessageType.ACK, MessageType.GOODBYE}
    ),
}
# After our goodbye the peer may still be sending what it had, and answers with its own.
_ALLOWED_IN[(Role.RECEIVER, State.GOODBYE_SENT)] = _ALLOWED_IN[(Role.RECEIVER, State.OPEN)]
_ALLOWED_IN[(Role.SENDER, State.GOODBYE_SENT)] = _ALLOWED_IN[(Role.SENDER, State.OPEN)]


class Connection:
    """One side of one stream's connection: ``receive_data`` in, ``next_event`` out, ``send``."""

    def __init__(self, role: Role, limits: Limits | None = None) -> None:
        self.role = role
        self.limits = limits or Limits()
        self.state = State.AWAIT_HELLO if role is Role.RECEIVER else State.AWAIT_WELCOME
        self.kind: StreamKind | None = None
        # Until the hello names the kind, no media is allowed at all.
        self._decoder = FrameDecoder(media_limit=0)
        self._peer_closed = False
        self._error: RemoteProtocolError | None = None
        self._hello_sent = False
        self.peer_max_payload: int | None = None  # sender: the receiver's ceiling, from welcome

    @property
    def bytes_in(self) -> int:
        return self._decoder.bytes_in

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self._error is not None:
            raise self._error
        if data:
            self._decoder.feed(data)
        else:
            self._peer_closed = True

    def next_event(self) -> Event | None:
        """The next complete event, or None until more bytes arrive."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            self.state = State.FAILED
            raise

    def _next_event(self) -> Event | None:
        if self.state in (State.CLOSED, State.HELLO_RECEIVED):
            return None
        if self.state is State.GOODBYE_RECEIVED and self._decoder.buffered:
            raise RemoteProtocolError("a message after the peer's goodbye")
        message = self._decoder.next_message()
        if message is None:
            if self._peer_closed:
                if self._decoder.buffered:
                    raise RemoteProtocolError("peer closed the connection mid-message")
                self.state = State.CLOSED
                return ConnectionClosed()
            return None
        kind, body = message
        if kind not in _ALLOWED_IN.get((self.role, self.state), frozenset()):
            raise RemoteProtocolError(f"unexpected {kind.name.lower()} in state {self.state.value}")
        event = decode_body(kind, body)
        self._after_receive(event)
        return event

    def _after_receive(self, event: Event) -> None:
        if isinstance(event, Hello):
            self.kind = event.kind
            self.state = State.HELLO_RECEIVED
        elif isinstance(event, Welcome):
            self.state = State.OPEN
            self.peer_max_payload = event.max_payload
        elif isinstance(event, Goodbye) and self.state is State.OPEN:
            self.state = State.GOODBYE_RECEIVED
        elif isinstance(event, Refused | Goodbye):
            self.state = State.CLOSED

    def send(self, event: Event) -> bytes:
        """The bytes for ``event``, after checking it is ours to send now."""
        if isinstance(event, Media):
            return b"".join(self.send_media(event))  # the same payload limit as send_media
        self._check_send(event)
        data = encode(event)
        self._after_send(event)
        return data

    def send_media(self, media: Media) -> tuple[bytes, bytes]:
        """Like ``send`` for media, as (header, payload) so a frame is never copied."""
        self._check_send(media)
        limit = self.limits.media_payload(self.kind or StreamKind.VIDEO)
        if self.peer_max_payload is not None:
            limit = min(limit, self.peer_max_payload)
        if len(media.data) > limit:
            raise LocalProtocolError(f"media payload of {len(media.data)} bytes exceeds {limit}")
        return encode_media_parts(media)

    def _check_send(self, event: Event) -> None:
        state, role = self.state, self.role
        if isinstance(event, Goodbye):
            ok = state not in (State.CLOSED, State.FAILED, State.GOODBYE_SENT)
        elif isinstance(event, Hello):
            ok = role is Role.SENDER and state is State.AWAIT_WELCOME and not self._hello_sent
        elif isinstance(event, Welcome | Refused):
            ok = role is Role.RECEIVER and state is State.HELLO_RECEIVED
        elif isinstance(event, Media | Floor):
            ok = role is Role.SENDER and state is State.OPEN
        elif isinstance(event, Ack):  # final acks answer a sender's goodbye
            ok = role is Role.RECEIVER and state in (State.OPEN, State.GOODBYE_RECEIVED)
        elif isinstance(event, Heartbeat):
            ok = state is State.OPEN
        else:
            ok = False
        if not ok:
            raise LocalProtocolError(
                f"cannot send {type(event).__name__} as {role.value} in state {state.value}"
            )

    def _after_send(self, event: Event) -> None:
        if isinstance(event, Hello):
            self._hello_sent = True
            self.kind = event.kind
        elif isinstance(event, Welcome):
            self.state = State.OPEN
            assert self.kind is not None
            self._decoder.media_limit = min(event.max_payload, self.limits.media_payload(self.kind))
        elif isinstance(event, Goodbye) and self.state is State.OPEN:
            self.state = State.GOODBYE_SENT
        elif isinstance(event, Refused | Goodbye):
            self.state = State.CLOSED
