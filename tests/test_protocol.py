"""avd.protocol by example: golden bytes, size limits, the handshake state machine, secrecy.

The golden hex literals are written out by hand from the byte layout in the module
docstring, never produced by ``encode``: they pin the wire format itself, so a change to it
fails here even if encoder and decoder change together.
"""

from __future__ import annotations

import struct

import pytest

from avd.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from avd.media.base import AudioFormat, StreamKind, VideoFormat
from avd.protocol import (
    MEDIA_PREFIX,
    Ack,
    Connection,
    ConnectionClosed,
    Event,
    Floor,
    FrameDecoder,
    Goodbye,
    GoodbyeReason,
    Heartbeat,
    Hello,
    Limits,
    Media,
    MessageType,
    Refused,
    Role,
    State,
    Welcome,
    encode,
    encode_media_parts,
)

from .conftest import decode_one

TOKEN = b"0123456789abcdef0123456789ABCDEF"  # 32 bytes, the shortest allowed
TOKEN_HEX = "30313233343536373839616263646566" + "30313233343536373839414243444546"
VGA = VideoFormat(width=640, height=480, fps=20, quality=70)
VOICE = AudioFormat(rate=48000, channels=1, sample_width=2, chunk=960)

# (event, golden hex). Spaces separate the fields named in the docstring's layout.
GOLDEN: list[tuple[Event, str]] = [
    (
        Hello(sender_id="cam1", kind=StreamKind.VIDEO, format=VGA, token=TOKEN),
        # header: AV v1 type 1, 55 bytes | kind 1, id "cam1", token 32, flags 0,
        # first seq 0, 640 480 20 fps quality 70
        "4156 01 01 00000037 | 01 04 63616d31 20"
        + TOKEN_HEX
        + "00 0000000000000000 0280 01e0 0014 46",
    ),
    (
        Hello(sender_id="mic-1", kind=StreamKind.AUDIO, format=VOICE, token=TOKEN, first_seq=258),
        # 57 bytes | kind 2, id "mic-1", token, flags, first seq 258, 48000 Hz, 1 channel,
        # 2 bytes, 960 frames
        "4156 01 01 00000039 | 02 05 6d69632d31 20"
        + TOKEN_HEX
        + "00 0000000000000102 0000bb80 01 02 03c0",
    ),
    (
        Welcome(session_id=7, heartbeat_ms=1000, max_payload=8 * 1024 * 1024),
        "4156 01 02 0000000c | 00000007 000003e8 00800000",
    ),
    (Refused(), "4156 01 03 00000000"),
    (
        Media(seq=1, capture_us=0x0102030405060708, data=b"\xff\xd8\xff\xd9", late=True),
        "4156 01 04 00000015 | 0000000000000001 0102030405060708 01 ffd8ffd9",
    ),
    (
        Media(seq=0xFFFFFFFFFFFFFFFF, capture_us=0, data=b""),
        "4156 01 04 00000011 | ffffffffffffffff 0000000000000000 00",
    ),
    (
        Heartbeat(sent_us=1_000_000, echo_us=999_000, held_us=250),
        "4156 01 05 00000014 | 00000000000f4240 00000000000f3e58 000000fa",
    ),
    (Heartbeat(sent_us=5), "4156 01 05 00000014 | 0000000000000005 0000000000000000 00000000"),
    (Ack(seq=41), "4156 01 06 00000008 | 0000000000000029"),
    (Floor(seq=258), "4156 01 08 00000008 | 0000000000000102"),
    (Goodbye(GoodbyeReason.SHUTDOWN, "bye"), "4156 01 07 00000005 | 01 03 627965"),
    (Goodbye(GoodbyeReason.BYE), "4156 01 07 00000002 | 00 00"),
    # An unknown reason from a newer peer is kept as a plain int; "é" is 2 UTF-8 bytes.
    (Goodbye(200, "é"), "4156 01 07 00000004 | c8 02 c3a9"),
]


def golden_bytes(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text.replace("|", ""))


def header(kind: int, length: int, magic: bytes = b"AV", version: int = 1) -> bytes:
    return struct.pack(">2sBBI", magic, version, kind, length)


def open_receiver(
    kind: StreamKind = StreamKind.VIDEO, limits: Limits | None = None, max_payload: int = 4096
) -> Connection:
    """A receiver that got a valid hello of ``kind`` and answered welcome."""
    fmt = VGA if kind is StreamKind.VIDEO else VOICE
    conn = Connection(Role.RECEIVER, limits)
    conn.receive_data(encode(Hello("cam1", kind, fmt, TOKEN)))
    assert isinstance(conn.next_event(), Hello)
    conn.send(Welcome(session_id=1, heartbeat_ms=1000, max_payload=max_payload))
    return conn


def open_sender(
    kind: StreamKind = StreamKind.VIDEO, limits: Limits | None = None, max_payload: int = 4096
) -> Connection:
    """A sender that sent its hello and received welcome."""
    fmt = VGA if kind is StreamKind.VIDEO else VOICE
    conn = Connection(Role.SENDER, limits)
    conn.send(Hello("cam1", kind, fmt, TOKEN))
    conn.receive_data(encode(Welcome(session_id=1, heartbeat_ms=1000, max_payload=max_payload)))
    assert isinstance(conn.next_event(), Welcome)
    return conn


def state_of(conn: Connection) -> State:
    """The state, read through a call so mypy does not narrow it across ``send``."""
    return conn.state


# ---- golden bytes -------------------------------------------------------------------


@pytest.mark.parametrize(("event", "hex_text"), GOLDEN)
def test_encode_matches_golden_bytes(event: Event, hex_text: str) -> None:
    assert encode(event) == golden_bytes(hex_text)


@pytest.mark.parametrize(("event", "hex_text"), GOLDEN)
def test_golden_bytes_decode_to_the_event(event: Event, hex_text: str) -> None:
    assert decode_one(golden_bytes(hex_text)) == event


def test_unknown_goodbye_reason_decodes_as_plain_int() -> None:
    event = decode_one(golden_bytes("4156 01 07 00000002 | ff 00"))
    assert isinstance(event, Goodbye)
    assert event.reason == 255
    assert not isinstance(event.reason, GoodbyeReason)


def test_media_parts_do_not_copy_the_payload() -> None:
    payload = b"\xff\xd8" + bytes(1000) + b"\xff\xd9"
    head, body = encode_media_parts(Media(seq=3, capture_us=9, data=payload))
    assert body is payload
    assert head == golden_bytes(
        "4156 01 04 000003fd | 0000000000000003 0000000000000009 00"
    )  # 0x3fd = 17 + 1004


def test_goodbye_text_is_cut_to_255_bytes_on_a_character_boundary() -> None:
    data = encode(Goodbye(GoodbyeReason.BYE, "é" * 200))  # 400 bytes of UTF-8
    assert data[9] == 254  # 127 whole "é"; half of the 128th is dropped, not sent
    event = decode_one(data)
    assert event == Goodbye(GoodbyeReason.BYE, "é" * 127)


# ---- what we refuse to encode --------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        Welcome(session_id=2**32, heartbeat_ms=1, max_payload=1),
        Ack(seq=-1),
        Ack(seq=2**64),
        Media(seq=2**64, capture_us=0, data=b""),
        Media(seq=0, capture_us=-1, data=b""),
        Heartbeat(sent_us=-1),
        Heartbeat(sent_us=0, echo_us=2**64),
        Goodbye(256, "x"),
        Goodbye(GoodbyeReason.BYE, "\ud800"),  # a lone surrogate is not UTF-8
        ConnectionClosed(),
        Hello("cam1", StreamKind.VIDEO, VGA, b"x" * 31),
        Hello("cam1", StreamKind.VIDEO, VGA, b"x" * 129),
        Hello("-cam", StreamKind.VIDEO, VGA, TOKEN),
        Hello("c" * 65, StreamKind.VIDEO, VGA, TOKEN),
        Hello("cämera", StreamKind.VIDEO, VGA, TOKEN),
        Hello("cam1", StreamKind.VIDEO, VOICE, TOKEN),
        Hello("cam1", StreamKind.VIDEO, VideoFormat(70000, 480, 20, 70), TOKEN),
        Hello("mic", StreamKind.AUDIO, AudioFormat(48000, 256, 2, 960), TOKEN),
    ],
    ids=repr,
)
def test_out_of_range_fields_raise_local_protocol_error(event: Event) -> None:
    with pytest.raises(LocalProtocolError):
        encode(event)


def test_heartbeat_held_time_is_clamped_to_u32() -> None:
    assert decode_one(encode(Heartbeat(sent_us=1, echo_us=1, held_us=2**40))) == Heartbeat(
        1, 1, 0xFFFF_FFFF
    )
    assert decode_one(encode(Heartbeat(sent_us=1, echo_us=1, held_us=-5))) == Heartbeat(1, 1, 0)


# ---- limits --------------------------------------------------------------------------


def test_4_gib_media_header_is_refused_before_any_payload_is_buffered() -> None:
    conn = open_receiver()
    conn.receive_data(header(MessageType.MEDIA, 0xFFFF_FFFF))
    with pytest.raises(FrameTooLarge):
        conn.next_event()
    assert conn._decoder.buffered == 8  # the header only: nothing waited for the payload
    assert conn.state is State.FAILED


def test_oversized_header_fails_at_once_while_a_fitting_one_waits_for_its_payload() -> None:
    decoder = FrameDecoder(media_limit=100)
    decoder.feed(header(MessageType.MEDIA, MEDIA_PREFIX.size + 100))
    assert decoder.next_message() is None  # at the limit: waits for the payload

    decoder = FrameDecoder(media_limit=100)
    decoder.feed(header(MessageType.MEDIA, MEDIA_PREFIX.size + 101))
    with pytest.raises(FrameTooLarge):
        decoder.next_message()
    assert decoder.buffered == 8


@pytest.mark.parametrize("payload", [0, 1, 1000])
def test_media_before_welcome_is_refused(payload: int) -> None:
    conn = Connection(Role.RECEIVER)
    conn.receive_data(encode(Media(seq=0, capture_us=0, data=bytes(payload))))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()

    conn = Connection(Role.RECEIVER)
    conn.receive_data(encode(Hello("cam1", StreamKind.VIDEO, VGA, TOKEN)))
    assert isinstance(conn.next_event(), Hello)
    conn.receive_data(encode(Media(seq=0, capture_us=0, data=bytes(payload))))
    assert conn.next_event() is None  # held until the receiver answers the hello
    conn.send(Refused())
    assert conn.next_event() is None  # refused: nothing more is decoded


@pytest.mark.parametrize(
    ("kind", "max_payload", "limit"),
    [
        (StreamKind.VIDEO, 500, 500),  # the welcome's ceiling is below the local video limit
        (StreamKind.VIDEO, 5000, 1000),  # the local video limit is below the welcome's
        (StreamKind.AUDIO, 500, 100),  # audio has its own, smaller, local limit
        (StreamKind.AUDIO, 50, 50),
    ],
)
def test_media_limit_depends_on_the_stream_kind_and_the_welcome(
    kind: StreamKind, max_payload: int, limit: int
) -> None:
    limits = Limits(max_video_payload=1000, max_audio_payload=100)
    conn = open_receiver(kind, limits, max_payload)
    media = Media(seq=0, capture_us=1, data=bytes(limit))
    conn.receive_data(encode(media))
    assert conn.next_event() == media

    conn.receive_data(header(MessageType.MEDIA, MEDIA_PREFIX.size + limit + 1))
    with pytest.raises(FrameTooLarge, match=f"exceeds {MEDIA_PREFIX.size + limit}"):
        conn.next_event()

    sender = open_sender(kind, limits, max_payload)
    assert sender.send_media(media)[1] == media.data
    too_big = Media(seq=1, capture_us=1, data=bytes(limit + 1))
    with pytest.raises(LocalProtocolError):
        sender.send_media(too_big)
    with pytest.raises(LocalProtocolError):
        sender.send(too_big)  # the plain send path enforces the same limit


def test_sender_never_accepts_media() -> None:
    conn = open_sender()
    conn.receive_data(header(MessageType.MEDIA, MEDIA_PREFIX.size + 1))
    with pytest.raises(FrameTooLarge):
        conn.next_event()


@pytest.mark.parametrize(
    ("kind", "size", "error"),
    [
        (MessageType.WELCOME, 11, RemoteProtocolError),
        (MessageType.WELCOME, 13, FrameTooLarge),
        (MessageType.REFUSED, 1, FrameTooLarge),
        (MessageType.HEARTBEAT, 19, RemoteProtocolError),
        (MessageType.HEARTBEAT, 21, FrameTooLarge),
        (MessageType.ACK, 9, FrameTooLarge),
        (MessageType.FLOOR, 7, RemoteProtocolError),
        (MessageType.FLOOR, 9, FrameTooLarge),
        (MessageType.HELLO, 513, FrameTooLarge),
        (MessageType.GOODBYE, 258, FrameTooLarge),
        (MessageType.MEDIA, 16, RemoteProtocolError),
    ],
)
def test_wrong_sizes_are_refused_from_the_header(
    kind: MessageType, size: int, error: type[Exception]
) -> None:
    decoder = FrameDecoder(media_limit=100)
    decoder.feed(header(kind, size))
    with pytest.raises(error) as caught:
        decoder.next_message()
    if error is RemoteProtocolError:
        assert not isinstance(caught.value, FrameTooLarge)


@pytest.mark.parametrize("first", [b"G", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"AX", b"A\x00"])
def test_bad_magic_is_refused_on_the_first_bytes(first: bytes) -> None:
    conn = Connection(Role.RECEIVER)
    conn.receive_data(first)
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        conn.next_event()


def test_magic_prefix_waits_for_more() -> None:
    conn = Connection(Role.RECEIVER)
    for byte in (b"A", b"V", b"\x01"):
        conn.receive_data(byte)
        assert conn.next_event() is None


@pytest.mark.parametrize("version", [0, 2, 255])
def test_other_versions_are_refused(version: int) -> None:
    conn = Connection(Role.RECEIVER)
    conn.receive_data(header(MessageType.HELLO, 0, version=version))
    with pytest.raises(RemoteProtocolError, match=f"version {version}"):
        conn.next_event()


@pytest.mark.parametrize("kind", [0, 9, 255])
def test_unknown_types_are_refused(kind: int) -> None:
    conn = open_receiver()
    conn.receive_data(header(kind, 0))
    with pytest.raises(RemoteProtocolError, match=f"unknown message type {kind}"):
        conn.next_event()


# ---- malformed hellos ----------------------------------------------------------------


def hello_body(
    kind: int = 1,
    sender: bytes = b"cam1",
    token: bytes = TOKEN,
    fmt: bytes = bytes.fromhex("028001e0001446"),
    n: int | None = None,
    t: int | None = None,
) -> bytes:
    n = len(sender) if n is None else n
    t = len(token) if t is None else t
    return bytes((kind, n)) + sender + bytes((t,)) + token + b"\x00" + bytes(8) + fmt


SECRET = b"S3cr3t-T0ken-" + b"q" * 19 + b"-end"  # 36 bytes, easy to spot in any text

MALFORMED_HELLOS = {
    "empty": b"",
    "unknown kind": hello_body(kind=3, token=SECRET),
    "empty sender id": hello_body(sender=b"", token=SECRET),
    "sender id starts with a dot": hello_body(sender=b".cam", token=SECRET),
    "sender id with a space": hello_body(sender=b"cam 1", token=SECRET),
    "sender id not ASCII": hello_body(sender="cäm".encode(), token=SECRET),
    "sender id of 65": hello_body(sender=b"c" * 65, token=SECRET),
    "sender length past the end": hello_body(n=200, token=SECRET),
    "token too short": hello_body(token=SECRET[:31]),
    "token too long": hello_body(token=SECRET * 4),
    "token length past the end": hello_body(token=SECRET, t=60),
    "token length short of the token": hello_body(token=SECRET, t=33),
    "video format truncated": hello_body(token=SECRET)[:-1],
    "trailing byte": hello_body(token=SECRET) + b"\x00",
    "audio kind with a video format": hello_body(kind=2, token=SECRET),
}


@pytest.mark.parametrize("body", MALFORMED_HELLOS.values(), ids=MALFORMED_HELLOS.keys())
def test_malformed_hello_is_refused_without_revealing_the_token(body: bytes) -> None:
    conn = Connection(Role.RECEIVER)
    conn.receive_data(header(MessageType.HELLO, len(body)) + body)
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert_secret_absent(caught.value)


def test_a_second_hello_is_refused_without_revealing_the_token() -> None:
    conn = open_receiver()
    conn.receive_data(encode(Hello("cam1", StreamKind.VIDEO, VGA, SECRET)))
    with pytest.raises(RemoteProtocolError, match="unexpected hello") as caught:
        conn.next_event()
    assert_secret_absent(caught.value)


def assert_secret_absent(exc: BaseException) -> None:
    """Neither the exception nor anything it was raised from shows the token."""
    chain: BaseException | None = exc
    while chain is not None:
        for text in (str(chain), repr(chain), repr(chain.args)):
            assert SECRET.decode() not in text
            assert SECRET[:12].decode() not in text
        chain = chain.__cause__ or chain.__context__


def test_hello_repr_hides_the_token() -> None:
    hello = Hello("cam1", StreamKind.VIDEO, VGA, SECRET)
    assert SECRET.decode() not in repr(hello)
    assert SECRET.decode() not in str(hello)
    assert "cam1" in repr(hello)  # the rest is still shown, for logs


def test_valid_hello_keeps_sender_id_and_token() -> None:
    sender = "Z" + "a.b_c-9" * 9  # 64 characters, every allowed class
    hello = Hello(sender, StreamKind.AUDIO, VOICE, b"~" * 128)
    assert decode_one(encode(hello)) == hello


# ---- state machine -------------------------------------------------------------------

NOT_HELLO = [
    Welcome(1, 1000, 10),
    Refused(),
    Media(0, 0, b""),
    Heartbeat(1),
    Ack(0),
    Goodbye(GoodbyeReason.BYE),
]


@pytest.mark.parametrize("first", NOT_HELLO, ids=repr)
def test_receiver_accepts_only_a_hello_first(first: Event) -> None:
    conn = Connection(Role.RECEIVER)
    conn.receive_data(encode(first))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is State.FAILED


def test_receiver_must_answer_the_hello_before_anything_else() -> None:
    conn = Connection(Role.RECEIVER)
    conn.receive_data(encode(Hello("cam1", StreamKind.VIDEO, VGA, TOKEN)))
    assert isinstance(conn.next_event(), Hello)
    assert conn.state is State.HELLO_RECEIVED
    conn.receive_data(encode(Heartbeat(5)))
    assert conn.next_event() is None  # not decoded until the hello is answered
    for early in (Heartbeat(1), Ack(0), Media(0, 0, b"")):
        with pytest.raises(LocalProtocolError):
            conn.send(early)
    conn.send(Welcome(1, 1000, 4096))
    assert state_of(conn) is State.OPEN
    assert conn.next_event() == Heartbeat(5)
    assert conn.send(Ack(3)) == encode(Ack(3))


def test_refusing_closes_the_receiver() -> None:
    conn = Connection(Role.RECEIVER)
    with pytest.raises(LocalProtocolError):
        conn.send(Refused())  # nothing to refuse yet
    conn.receive_data(encode(Hello("cam1", StreamKind.VIDEO, VGA, TOKEN)))
    assert isinstance(conn.next_event(), Hello)
    assert conn.send(Refused()) == encode(Refused())
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(Welcome(1, 1000, 10))


@pytest.mark.parametrize(
    ("role", "event"),
    [
        (Role.RECEIVER, Hello("cam1", StreamKind.VIDEO, VGA, TOKEN)),
        (Role.RECEIVER, Welcome(1, 1, 1)),
        (Role.RECEIVER, Media(0, 0, b"")),
        (Role.SENDER, Media(0, 0, b"")),
        (Role.SENDER, Welcome(1, 1, 1)),
        (Role.SENDER, Refused()),
        (Role.SENDER, Ack(1)),
        (Role.SENDER, Heartbeat(1)),
        (Role.SENDER, ConnectionClosed()),
    ],
    ids=repr,
)
def test_sending_out_of_turn_raises_local_protocol_error(role: Role, event: Event) -> None:
    conn = Connection(role)
    with pytest.raises(LocalProtocolError, match=role.value):
        conn.send(event)


def test_sender_lifecycle() -> None:
    conn = Connection(Role.SENDER)
    conn.send(Hello("cam1", StreamKind.VIDEO, VGA, TOKEN))
    with pytest.raises(LocalProtocolError):
        conn.send(Hello("cam1", StreamKind.VIDEO, VGA, TOKEN))  # only once
    with pytest.raises(LocalProtocolError):
        conn.send_media(Media(0, 0, b"x"))  # not before welcome
    conn.receive_data(encode(Welcome(9, 500, 4096)) + encode(Heartbeat(7)) + encode(Ack(0)))
    assert conn.next_event() == Welcome(9, 500, 4096)
    assert conn.state is State.OPEN
    assert conn.peer_max_payload == 4096
    assert conn.next_event() == Heartbeat(7)
    assert conn.next_event() == Ack(0)
    assert conn.next_event() is None
    assert conn.send(Heartbeat(1, 7, 3)) == encode(Heartbeat(1, 7, 3))
    head, payload = conn.send_media(Media(0, 0, b"jpeg"))
    assert head + payload == encode(Media(0, 0, b"jpeg"))
    conn.send(Goodbye(GoodbyeReason.SHUTDOWN))
    assert state_of(conn) is State.GOODBYE_SENT  # the receiver's last acks may follow
    for late in (Goodbye(GoodbyeReason.BYE), Heartbeat(2), Media(1, 1, b"x")):
        with pytest.raises(LocalProtocolError):
            conn.send(late)
    conn.receive_data(encode(Ack(1)) + encode(Goodbye(GoodbyeReason.BYE, "recorded")))
    assert conn.next_event() == Ack(1)
    assert conn.next_event() == Goodbye(GoodbyeReason.BYE, "recorded")
    assert state_of(conn) is State.CLOSED


def test_a_receiver_answers_a_goodbye_with_its_last_acks_then_its_own() -> None:
    receiver = Connection(Role.RECEIVER)
    receiver.receive_data(encode(Hello("cam1", StreamKind.VIDEO, VGA, TOKEN)))
    assert isinstance(receiver.next_event(), Hello)
    receiver.send(Welcome(1, 1000, 4096))
    receiver.receive_data(encode(Goodbye(GoodbyeReason.BYE, "source ended")))
    assert receiver.next_event() == Goodbye(GoodbyeReason.BYE, "source ended")
    assert state_of(receiver) is State.GOODBYE_RECEIVED
    with pytest.raises(LocalProtocolError):
        receiver.send(Heartbeat(1))
    assert receiver.send(Ack(41)) == encode(Ack(41))
    receiver.send(Goodbye(GoodbyeReason.BYE))
    assert state_of(receiver) is State.CLOSED
    with pytest.raises(LocalProtocolError):
        receiver.send(Ack(42))


def test_a_message_after_the_peers_goodbye_is_a_protocol_error() -> None:
    receiver = Connection(Role.RECEIVER)
    receiver.receive_data(encode(Hello("cam1", StreamKind.VIDEO, VGA, TOKEN)))
    receiver.next_event()
    receiver.send(Welcome(1, 1000, 4096))
    receiver.receive_data(encode(Goodbye(GoodbyeReason.BYE)) + encode(Heartbeat(3)))
    assert isinstance(receiver.next_event(), Goodbye)
    with pytest.raises(RemoteProtocolError, match="after the peer's goodbye"):
        receiver.next_event()


@pytest.mark.parametrize("answer", [Refused(), Goodbye(GoodbyeReason.OVERLOADED, "full")])
def test_sender_is_closed_by_refusal_or_goodbye(answer: Event) -> None:
    conn = Connection(Role.SENDER)
    conn.send(Hello("cam1", StreamKind.AUDIO, VOICE, TOKEN))
    conn.receive_data(encode(answer) + b"anything after is ignored")
    assert conn.next_event() == answer
    assert conn.state is State.CLOSED
    assert conn.next_event() is None


@pytest.mark.parametrize(
    "unexpected", [Media(0, 0, b""), Hello("x", StreamKind.VIDEO, VGA, TOKEN), Ack(1)], ids=repr
)
def test_sender_refuses_what_only_a_sender_sends_before_welcome(unexpected: Event) -> None:
    conn = Connection(Role.SENDER)
    conn.send(Hello("cam1", StreamKind.VIDEO, VGA, TOKEN))
    conn.receive_data(encode(unexpected))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize("unexpected", [Welcome(1, 1, 1), Refused()], ids=repr)
def test_open_sender_refuses_a_second_answer(unexpected: Event) -> None:
    conn = open_sender()
    conn.receive_data(encode(unexpected))
    with pytest.raises(RemoteProtocolError, match="in state open"):
        conn.next_event()


def test_open_receiver_refuses_what_only_a_receiver_sends() -> None:
    for unexpected in (Welcome(1, 1, 1), Refused(), Ack(1)):
        conn = open_receiver()
        conn.receive_data(encode(unexpected))
        with pytest.raises(RemoteProtocolError, match="in state open"):
            conn.next_event()


def test_a_failed_connection_stays_failed_with_the_same_error() -> None:
    conn = open_receiver()
    conn.receive_data(encode(Heartbeat(1)) + b"XV\x01\x05")
    assert conn.next_event() == Heartbeat(1)
    with pytest.raises(RemoteProtocolError) as first:
        conn.next_event()
    assert conn.state is State.FAILED
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is first.value
    with pytest.raises(RemoteProtocolError) as on_data:
        conn.receive_data(encode(Heartbeat(2)))
    assert on_data.value is first.value
    with pytest.raises(LocalProtocolError):
        conn.send(Heartbeat(3))
    with pytest.raises(LocalProtocolError):
        conn.send(Goodbye(GoodbyeReason.PROTOCOL_ERROR))


def test_peer_close_between_messages_is_connection_closed() -> None:
    conn = open_receiver()
    conn.receive_data(encode(Heartbeat(1)))
    conn.receive_data(b"")
    assert conn.next_event() == Heartbeat(1)  # what arrived before the close comes first
    assert conn.next_event() == ConnectionClosed()
    assert conn.state is State.CLOSED
    assert conn.next_event() is None


def test_peer_close_before_the_hello_is_connection_closed() -> None:
    conn = Connection(Role.RECEIVER)
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize("cut", [1, 7, 8, 20, 27])
def test_peer_close_mid_message_is_a_protocol_error(cut: int) -> None:
    conn = open_receiver()
    conn.receive_data(encode(Heartbeat(1))[:cut])  # 28 bytes in all
    assert conn.next_event() is None
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-message"):
        conn.next_event()


def test_bytes_in_counts_everything_received() -> None:
    conn = open_receiver()
    assert conn.bytes_in == len(encode(Hello("cam1", StreamKind.VIDEO, VGA, TOKEN)))
    conn.receive_data(b"AV")
    assert conn.bytes_in == 8 + 55 + 2  # the hello's header and body, then two bytes
