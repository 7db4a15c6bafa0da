"""avd.protocol under hypothesis: round trips, and any bytes in any split.

The claims: every event survives encode/decode with its edge values; a connection fed any
bytes, whole or cut anywhere, yields events or a RemoteProtocolError and nothing else
(never IndexError, struct.error, UnicodeError...); and how the bytes are cut never changes
what comes out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avd.errors import RemoteProtocolError
from avd.media.base import AudioFormat, StreamKind, VideoFormat
from avd.protocol import (
    HEADER,
    SENDER_ID_RE,
    Ack,
    Connection,
    ConnectionClosed,
    Event,
    Floor,
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
    decode_body,
    encode,
)

from .conftest import decode_one

U8, U16 = st.integers(0, 0xFF), st.integers(0, 0xFFFF)
U32, U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)

sender_ids = st.from_regex(SENDER_ID_RE, fullmatch=True) | st.sampled_from(["a" * 64, "9-._" * 16])
tokens = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=32, max_size=128
).map(str.encode) | st.sampled_from([b"k" * 32, b"K" * 128])
video_hellos = st.builds(
    Hello,
    sender_ids,
    st.just(StreamKind.VIDEO),
    st.builds(VideoFormat, U16, U16, U16, U8),
    tokens,
    probe=st.booleans(),
    first_seq=U64,
)
audio_hellos = st.builds(
    Hello,
    sender_ids,
    st.just(StreamKind.AUDIO),
    st.builds(AudioFormat, U32, U8, U8, U16),
    tokens,
    probe=st.booleans(),
    first_seq=U64,
)
hellos = video_hellos | audio_hellos
welcomes = st.builds(Welcome, U32, U32, U32)
refusals = st.just(Refused())
medias = st.builds(Media, U64, U64, st.binary(max_size=48), st.booleans())
heartbeats = st.builds(Heartbeat, U64, U64, U32)
acks = st.builds(Ack, U64)
floors = st.builds(Floor, U64)
goodbye_texts = st.text(max_size=255).filter(lambda text: len(text.encode()) <= 255)
goodbyes = st.builds(
    Goodbye,
    st.sampled_from(GoodbyeReason) | st.integers(len(GoodbyeReason), 255),
    goodbye_texts | st.sampled_from(["", "é" * 127 + "x", "€" * 85]),
)
any_event = hellos | welcomes | refusals | medias | heartbeats | acks | floors | goodbyes

STRATEGIES: dict[str, st.SearchStrategy[Event]] = {
    "hello": hellos,
    "welcome": welcomes,
    "refused": refusals,
    "media": medias,
    "heartbeat": heartbeats,
    "ack": acks,
    "floor": floors,
    "goodbye": goodbyes,
}

EDGE_EVENTS: list[Event] = [
    Hello("a" * 64, StreamKind.VIDEO, VideoFormat(0xFFFF, 0xFFFF, 0xFFFF, 0xFF), b"t" * 128),
    Hello("0", StreamKind.AUDIO, AudioFormat(2**32 - 1, 0xFF, 0xFF, 0xFFFF), b"t" * 32),
    Hello("x", StreamKind.VIDEO, VideoFormat(0, 0, 0, 0), b"t" * 32),
    Welcome(2**32 - 1, 2**32 - 1, 2**32 - 1),
    Welcome(0, 0, 0),
    Media(2**64 - 1, 2**64 - 1, b"", late=True),
    Media(0, 0, bytes(range(256))),
    Heartbeat(2**64 - 1, 2**64 - 1, 2**32 - 1),
    Ack(2**64 - 1),
    Ack(0),
    Goodbye(GoodbyeReason.OVERLOADED, "é" * 127 + "x"),  # exactly 255 bytes
    Goodbye(255, ""),
    Goodbye(7, "first unknown reason"),
]

FAST = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


# ---- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("event", EDGE_EVENTS, ids=repr)
def test_edge_values_round_trip(event: Event) -> None:
    assert decode_one(encode(event)) == event


@pytest.mark.parametrize("name", STRATEGIES)
@FAST
@given(data=st.data())
def test_every_type_round_trips(name: str, data: st.DataObject) -> None:
    event = data.draw(STRATEGIES[name])
    encoded = encode(event)
    assert HEADER.unpack_from(encoded) == (b"AV", 1, MessageType[name.upper()], len(encoded) - 8)
    assert decode_one(encoded) == event


def session_wire(
    hello: Hello, welcome: Welcome, upstream: Sequence[Event], downstream: Sequence[Event]
) -> tuple[Connection, Connection, bytes, bytes]:
    """A sender and receiver handshaken; the bytes of ``upstream`` and ``downstream``."""
    sender, receiver = Connection(Role.SENDER), Connection(Role.RECEIVER)
    receiver.receive_data(sender.send(hello))
    assert receiver.next_event() == hello
    sender.receive_data(receiver.send(welcome))
    assert sender.next_event() == welcome
    up = b"".join(sender.send(event) for event in upstream)
    down = b"".join(receiver.send(event) for event in downstream)
    return sender, receiver, up, down


@FAST
@given(
    hello=hellos,
    upstream=st.lists(medias | heartbeats | floors, max_size=8),
    downstream=st.lists(acks | heartbeats, max_size=8),
    farewell=goodbyes,
    data=st.data(),
)
def test_a_session_carries_every_event_in_order_however_it_is_cut(
    hello: Hello,
    upstream: list[Event],
    downstream: list[Event],
    farewell: Goodbye,
    data: st.DataObject,
) -> None:
    welcome = Welcome(session_id=5, heartbeat_ms=1000, max_payload=48)
    sender, receiver, up, down = session_wire(hello, welcome, upstream, downstream)
    assert drain(sender, data.draw(cuts_of(down))) == downstream
    up += sender.send(farewell)
    assert drain(receiver, data.draw(cuts_of(up))) == [*upstream, farewell]
    assert receiver.state is State.GOODBYE_RECEIVED  # it answers with acks, then its goodbye


def drain(conn: Connection, chunks: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    drain_into(conn, chunks, events)
    return events


def drain_into(conn: Connection, chunks: Iterable[bytes], events: list[Event]) -> None:
    """Feeds each chunk and collects the events, so those before an error are kept."""
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not None:
            events.append(event)


# ---- any bytes, any split ------------------------------------------------------------

SMALL = Limits(max_video_payload=40, max_audio_payload=20)  # small, so limits are hit
OPENER_HELLO = Hello("cam1", StreamKind.VIDEO, VideoFormat(64, 48, 5, 50), b"t" * 32)
Outcome = tuple[list[Event], tuple[str, str] | None]


def run(role: Role, say_hello: bool, chunks: Iterable[bytes]) -> Outcome:
    """Feeds ``chunks`` then a close, answering a hello as a receiver would.

    Only RemoteProtocolError is caught: any other exception fails the calling test.
    """
    conn = Connection(role, SMALL)
    if say_hello:
        conn.send(OPENER_HELLO)
    events: list[Event] = []
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not None:
                events.append(event)
                if isinstance(event, Hello):
                    conn.send(Welcome(session_id=1, heartbeat_ms=1000, max_payload=30))
    except RemoteProtocolError as exc:
        error: RemoteProtocolError = exc
    else:
        # Without an error, the close at the end leaves it closed, by ConnectionClosed or earlier.
        assert conn.state is State.CLOSED
        assert ConnectionClosed() not in events[:-1]
        return events, None
    assert conn.state is State.FAILED
    with pytest.raises(RemoteProtocolError) as again:
        conn.receive_data(b"more")
    assert again.value is error  # a failed connection stays failed
    return events, (type(error).__name__, str(error))


def split_at(blob: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Non-empty pieces (an empty piece would mean "peer closed")."""
    points = sorted({0, len(blob), *cuts})
    return [blob[a:b] for a, b in itertools.pairwise(points) if b > a]


def cuts_of(blob: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(blob)), max_size=12).map(lambda cuts: split_at(blob, cuts))


@st.composite
def mutated_message(draw: st.DrawFn) -> bytes:
    """A valid message damaged one way: a byte changed, cut short, or a new length."""
    data = bytearray(encode(draw(any_event)))
    how = draw(st.sampled_from(["byte", "cut", "length"]))
    if how == "byte":
        data[draw(st.integers(0, len(data) - 1))] = draw(U8)
    elif how == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    else:
        data[4:8] = draw(U32 | st.integers(0, 600)).to_bytes(4, "big")
    return bytes(data)


def wire_stream(opener: st.SearchStrategy[Event]) -> st.SearchStrategy[bytes]:
    """Mostly valid messages, starting with the right opener, with damage mixed in."""
    piece = (
        any_event.map(encode)
        | mutated_message()
        | st.binary(min_size=1, max_size=12)
        | st.binary(max_size=12).map(lambda tail: b"AV\x01" + tail)
    )
    head = opener.map(encode) | st.just(b"")
    return st.tuples(head, st.lists(piece, max_size=6)).map(lambda hp: hp[0] + b"".join(hp[1]))


ROLES = [(Role.RECEIVER, False), (Role.SENDER, True), (Role.SENDER, False)]
ROLE_IDS = ["receiver", "sender", "sender-before-hello"]


def assert_cut_anywhere_gives_the_same_outcome(
    role: Role, say_hello: bool, blob: bytes, data: st.DataObject
) -> None:
    whole = run(role, say_hello, [blob] if blob else [])
    byte_by_byte = run(role, say_hello, [blob[i : i + 1] for i in range(len(blob))])
    chunked = run(role, say_hello, data.draw(cuts_of(blob), label="chunks"))
    assert byte_by_byte == whole
    assert chunked == whole


@pytest.mark.parametrize(("role", "say_hello"), ROLES, ids=ROLE_IDS)
@FAST
@given(blob=st.binary(max_size=300), data=st.data())
def test_any_bytes_give_events_or_remote_protocol_error(
    role: Role, say_hello: bool, blob: bytes, data: st.DataObject
) -> None:
    assert_cut_anywhere_gives_the_same_outcome(role, say_hello, blob, data)


@pytest.mark.parametrize(("role", "say_hello"), ROLES, ids=ROLE_IDS)
@settings(FAST, max_examples=300)
@given(data=st.data())
def test_damaged_message_streams_give_events_or_remote_protocol_error(
    role: Role, say_hello: bool, data: st.DataObject
) -> None:
    opener = st.just(OPENER_HELLO) if role is Role.RECEIVER else welcomes | refusals
    blob = data.draw(wire_stream(opener), label="blob")
    assert_cut_anywhere_gives_the_same_outcome(role, say_hello, blob, data)


@FAST
@given(
    hello=hellos,
    upstream=st.lists(medias | heartbeats, max_size=6),
    position=st.integers(0, 6),
    garbage=st.binary(min_size=1, max_size=30).filter(lambda g: g[0] != ord("A")),
    data=st.data(),
)
def test_valid_events_before_garbage_are_delivered_then_the_connection_fails(
    hello: Hello, upstream: list[Event], position: int, garbage: bytes, data: st.DataObject
) -> None:
    welcome = Welcome(session_id=5, heartbeat_ms=1000, max_payload=48)
    _, receiver, _, _ = session_wire(hello, welcome, [], [])
    position = min(position, len(upstream))
    blob = b"".join(map(encode, upstream[:position])) + garbage
    blob += b"".join(map(encode, upstream[position:]))
    events: list[Event] = []
    chunks = data.draw(cuts_of(blob))
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        drain_into(receiver, chunks, events)
    assert events == upstream[:position]


@FAST
@given(body=st.binary(max_size=512) | hellos.map(lambda hello: encode(hello)[8:]), data=st.data())
def test_any_hello_body_decodes_or_raises_remote_protocol_error(
    body: bytes, data: st.DataObject
) -> None:
    if body and data.draw(st.booleans(), label="damage"):
        damaged = bytearray(body)
        damaged[data.draw(st.integers(0, len(body) - 1))] = data.draw(U8)
        body = bytes(damaged)
    try:
        event = decode_body(MessageType.HELLO, body)
    except RemoteProtocolError:
        return
    assert isinstance(event, Hello)


@FAST
@given(body=st.binary(max_size=257))
def test_any_goodbye_body_decodes_or_raises_remote_protocol_error(body: bytes) -> None:
    try:
        event = decode_body(MessageType.GOODBYE, body)
    except RemoteProtocolError:
        assert len(body) < 2 or len(body) != 2 + body[1]
    else:
        assert isinstance(event, Goodbye)
