"""The receiver-to-recorder messages: golden bytes, round trips, any split of the stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avd.media import recorder_wire as wire
from avd.media.base import ReceivedFrame, StreamInfo, StreamKind, VideoFormat
from avd.media.done import RecorderStats
from avd.media.recorder_wire import Kind, MessageReader, WireError


def _frame(**changes: object) -> ReceivedFrame:
    fields: dict[str, object] = {
        "seq": 7,
        "capture_us": 1_000,
        "arrival_us": 2_000,
        "local_capture_us": 1_500,
        "data": b"\xff\xd8jpeg\xff\xd9",
        "late": False,
    }
    fields.update(changes)
    return ReceivedFrame(**fields)  # type: ignore[arg-type]


def test_frame_message_golden_bytes() -> None:
    frame = _frame()
    message = wire.frame_header(3, frame) + frame.data
    assert len(frame.data) == 8
    assert message[:5] == bytes([2]) + (41 + 8).to_bytes(4, "little")
    assert message[5:13] == (3).to_bytes(8, "little")  # session id
    assert message[13:21] == (7).to_bytes(8, "little")  # seq
    assert message[-9] == 2  # flags: local capture time known, not late
    assert message[-8:] == frame.data
    late = wire.frame_header(3, _frame(late=True, local_capture_us=None))
    assert late[-1] == 1  # flags: late, local capture time unknown


@given(
    session_id=st.integers(0, 2**63 - 1),
    seq=st.integers(0, 2**64 - 1),
    capture=st.integers(-(2**63), 2**63 - 1),
    local=st.none() | st.integers(-(2**63), 2**63 - 1),
    late=st.booleans(),
    data=st.binary(max_size=300),
)
def test_frames_round_trip(
    session_id: int, seq: int, capture: int, local: int | None, late: bool, data: bytes
) -> None:
    frame = _frame(seq=seq, capture_us=capture, local_capture_us=local, late=late, data=data)
    [(kind, body)] = MessageReader().feed(wire.frame_header(session_id, frame) + data)
    assert kind is Kind.FRAME
    assert wire.parse_frame(body) == (session_id, frame)


def test_start_end_and_pickled_reports_round_trip() -> None:
    info = StreamInfo("cam1", StreamKind.VIDEO, VideoFormat(640, 480, 20, 70), "127.0.0.1:9", 4)
    stats = {"cam1": RecorderStats(video_frames=3, paused=True)}
    stream = (
        wire.start(info)
        + wire.end(4)
        + wire.pickled(Kind.DONE, [("cam1", StreamKind.AUDIO, 9)])
        + wire.pickled(Kind.STATS, wire.stats_body(stats))
        + wire.message(Kind.STOP)
    )
    messages = list(MessageReader().feed(stream))
    kinds = [kind for kind, _ in messages]
    assert kinds == [Kind.START, Kind.END, Kind.DONE, Kind.STATS, Kind.STOP]
    assert wire.unpickle(messages[0][1]) == info
    assert wire.parse_session(messages[1][1]) == 4
    assert wire.unpickle(messages[2][1]) == [("cam1", StreamKind.AUDIO, 9)]
    assert RecorderStats(**wire.unpickle(messages[3][1])["cam1"]) == stats["cam1"]
    assert bytes(messages[4][1]) == b""


@given(st.lists(st.binary(max_size=200), max_size=8), st.data())
def test_any_split_gives_the_same_messages(payloads: list[bytes], data: st.DataObject) -> None:
    frames = [_frame(seq=n, data=p) for n, p in enumerate(payloads)]
    stream = b"".join(wire.frame_header(1, f) + f.data for f in frames) + wire.end(1)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader, got = MessageReader(), []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += list(reader.feed(stream[start:stop]))
    assert [wire.parse_frame(body)[1] for _, body in got[:-1]] == frames
    assert (got[-1][0], bytes(got[-1][1])) == (Kind.END, (1).to_bytes(8, "little"))
    assert reader.pending == 0


def test_a_partial_message_waits_for_the_rest() -> None:
    message = wire.end(5)
    reader = MessageReader()
    assert list(reader.feed(message[:7])) == []
    assert reader.pending == 7
    [(kind, body)] = reader.feed(message[7:])
    assert (kind, bytes(body)) == (Kind.END, message[5:])


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (bytes([99]) + (0).to_bytes(4, "little"), "unknown message kind 99"),
        (bytes([2]) + (2**31).to_bytes(4, "little"), "over"),
    ],
)
def test_garbage_is_an_error_not_a_buffer(stream: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        list(MessageReader(max_body=1024).feed(stream))


def test_short_bodies_are_errors() -> None:
    with pytest.raises(WireError, match="FRAME body of 3 bytes"):
        wire.parse_frame(b"abc")
    with pytest.raises(WireError, match="END body of 2 bytes"):
        wire.parse_session(b"ab")


def test_bodies_are_views_of_what_was_fed_and_stay_valid() -> None:
    """No copy of a body that one read holds whole; one cut by a read gets a buffer of its
    own, which later reads do not overwrite."""
    first, second, third = wire.end(1), wire.end(2), wire.end(3)
    reader = MessageReader()
    data = first + second[:3]
    [(_, whole)] = reader.feed(data)
    assert whole.obj is data
    [(_, cut)] = reader.feed(second[3:] + third[:8])
    [(_, last)] = reader.feed(third[8:])
    assert [wire.parse_session(body) for body in (whole, cut, last)] == [1, 2, 3]
    assert reader.pending == 0
