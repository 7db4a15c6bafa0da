"""Coverage-guided fuzzing of avd.protocol's parser with atheris (libFuzzer).

The claim under test, the same as tests/test_protocol_props.py but searched by coverage
rather than by hypothesis: bytes from a peer, however cut, give events or a
RemoteProtocolError and nothing else, and how they are cut never changes what comes out.

    make fuzz FUZZ_SECONDS=60           # atheris is a dev dependency; make test runs 20 s
    .venv/bin/python fuzz/fuzz_protocol.py --write-seeds fuzz/corpus
    .venv/bin/python fuzz/fuzz_protocol.py fuzz/corpus -max_total_time=60

The first input byte picks the role (receiver, sender after its hello, sender before it),
the second a chunk size; the rest is what the peer sent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

with atheris.instrument_imports():
    from avd import protocol
    from avd.errors import RemoteProtocolError
    from avd.media.base import AudioFormat, StreamKind, VideoFormat

# Small limits so that inputs of a few hundred bytes reach the limit checks.
LIMITS = protocol.Limits(max_video_payload=40, max_audio_payload=20)
HELLO = protocol.Hello("cam1", StreamKind.VIDEO, VideoFormat(64, 48, 5, 50), b"t" * 32)
WELCOME = protocol.Welcome(session_id=1, heartbeat_ms=1000, max_payload=30)
ROLES = (
    (protocol.Role.RECEIVER, False),
    (protocol.Role.SENDER, True),
    (protocol.Role.SENDER, False),
)

Outcome = tuple[list[protocol.Event], str | None]


def run(role: protocol.Role, say_hello: bool, chunks: Iterable[bytes]) -> Outcome:
    """Feeds the chunks, then a close, answering a hello. Only RemoteProtocolError is caught."""
    conn = protocol.Connection(role, LIMITS)
    if say_hello:
        conn.send(HELLO)
    events: list[protocol.Event] = []
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not None:
                events.append(event)
                if isinstance(event, protocol.Hello):
                    conn.send(WELCOME)
    except RemoteProtocolError as exc:
        return events, f"{type(exc).__name__}: {exc}"
    return events, None


def pieces(blob: bytes, size: int) -> list[bytes]:
    """Non-empty pieces of ``size`` bytes (an empty one would mean the peer closed)."""
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    role, say_hello = ROLES[data[0] % len(ROLES)]
    size, blob = data[1] % 16 + 1, data[2:]
    whole = run(role, say_hello, [blob] if blob else [])
    for chunks in (pieces(blob, size), pieces(blob, 1)):
        cut = run(role, say_hello, chunks)
        if cut != whole:
            raise AssertionError(f"cutting changed the outcome: {whole!r} != {cut!r}")


def seeds() -> dict[str, bytes]:
    """Valid conversations for each role, so the fuzzer starts past the magic and the hello."""
    enc = protocol.encode
    media = enc(protocol.Media(seq=0, capture_us=1, data=b"\xff\xd8\xff\xd9", late=True))
    beat, ack = enc(protocol.Heartbeat(5, 4, 3)), enc(protocol.Ack(0))
    bye = enc(protocol.Goodbye(protocol.GoodbyeReason.SHUTDOWN, "bye"))
    audio_hello = protocol.Hello("mic-1", StreamKind.AUDIO, AudioFormat(48000, 1, 2, 10), b"t" * 32)
    return {
        "receiver-video": b"\x00\x07" + enc(HELLO) + media + beat + bye,
        "receiver-audio": b"\x00\x03" + enc(audio_hello) + media + beat,
        "sender-open": b"\x01\x05" + enc(WELCOME) + beat + ack + bye,
        "sender-refused": b"\x01\x00" + enc(protocol.Refused()),
        "sender-early": b"\x02\x02" + enc(WELCOME) + ack,
    }


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (directory / name).write_bytes(data)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[1] == "--write-seeds":
        write_seeds(Path(argv[2]))
        return
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
