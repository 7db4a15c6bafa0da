"""The peers' two ends, each its own process: ``python -m tests.peers.workers PEER ROLE ...``.

Each peer is driven the way its documentation shows, at its best on this workload:

- ``imagezmq``: ``ImageSender`` (REQ) sends ``cv2.imencode`` JPEGs with ``send_jpg``; the
  ``ImageHub`` (REP) replies *before* it decodes, so that the sender encodes the next frame
  while the hub decodes this one (replying after, as its examples do, would serialise them).
- ``netgear``: vidgear's ``NetGear`` with its own JPEG compression (simplejpeg, quality 70,
  its default fast DCT) over REQ/REP, the capture stamp riding along in bidirectional mode.

The sender paces frames at ``--fps`` on an absolute schedule (0: as fast as the peer takes
them) for ``--seconds``, stamps each with CLOCK_MONOTONIC before encoding, as avd's
capture does, then sends an end marker. The receiver decodes every frame, notes
(capture µs, decoded µs) and writes them as JSON to ``--rows`` when the end marker comes.
Both print ``ready`` once they can be measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avd.bench.plan import VGA
from avd.bench.probe import keep_freed_memory
from avd.clock import monotonic_us
from avd.media.pacing import Pacer
from avd.media.video import TestPatternScene, camera_like_images, encode_jpeg

END = "end"
Rows = list[tuple[int, int]]


def paced(fps: float, seconds: float) -> Iterator[int]:
    """Frame numbers for ``seconds``: at ``fps`` by avd's own ``Pacer`` (an absolute
    schedule, as avd's test pattern is paced), or flat out if ``fps`` is 0."""
    pacer, never = (Pacer(Fraction(fps)) if fps else None), threading.Event()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        if pacer is not None:
            pacer.wait(n, never)
        yield n
        n += 1


def pictures(fps: float) -> Callable[[int], Any]:
    """Picture ``n`` of the test pattern. Paced, drawn afresh each time as avd's sender
    draws it (a copy, shapes and noise: about 0.2 ms); flat out, eight pictures drawn
    beforehand, as ``avd bench``'s unthrottled client uses them."""
    if fps:
        return TestPatternScene(VGA.width, VGA.height, VGA.fps).render
    images = camera_like_images(VGA, 8)
    return lambda n: images[n % len(images)]


def imagezmq_receive(port: int, rows_path: Path) -> None:
    import imagezmq  # noqa: PLC0415 - an optional dependency, only in this process

    hub = imagezmq.ImageHub(open_port=f"tcp://127.0.0.1:{port}")
    print("ready", flush=True)
    rows: Rows = []
    shown = None  # shown until the next frame replaces it, as avd's probe does
    while True:
        name, jpeg = hub.recv_jpg()
        hub.send_reply(b"OK")
        if name == END:
            break
        shown = None  # let go just before the next decode, as avd's probe does
        shown = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        rows.append((int(name), monotonic_us()))
    del shown
    rows_path.write_text(json.dumps(rows))


def imagezmq_send(port: int, fps: float, seconds: float) -> None:
    import imagezmq  # noqa: PLC0415

    picture = pictures(fps)
    sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{port}")
    print("ready", flush=True)
    for n in paced(fps, seconds):
        image = picture(n)
        captured = monotonic_us()  # drawn, not yet encoded: where avd's test pattern stamps
        sender.send_jpg(str(captured), encode_jpeg(image, VGA.quality))
    sender.send_jpg(END, b"")
    sender.close()


def _netgear(port: int, receive: bool) -> Any:
    from vidgear.gears import NetGear  # noqa: PLC0415

    options: dict[str, Any] = {
        "bidirectional_mode": True,  # the only way NetGear carries data beside a frame
        "jpeg_compression": True,
        "jpeg_compression_quality": VGA.quality,
    }
    return NetGear(
        address="127.0.0.1",
        port=str(port),
        protocol="tcp",
        pattern=1,  # REQ/REP: NetGear's PAIR and PUB/SUB may drop frames
        receive_mode=receive,
        logging=False,
        **options,
    )


def netgear_receive(port: int, rows_path: Path) -> None:
    client = _netgear(port, receive=True)
    print("ready", flush=True)
    rows: Rows = []
    while True:
        got = client.recv(return_data="OK")
        if got is None:
            break
        stamp, _frame = got  # decoded by NetGear's own thread before it is handed over
        if stamp == END:
            break
        rows.append((int(stamp), monotonic_us()))
    rows_path.write_text(json.dumps(rows))
    client.close()


def netgear_send(port: int, fps: float, seconds: float) -> None:
    picture = pictures(fps)
    server = _netgear(port, receive=False)
    print("ready", flush=True)
    for n in paced(fps, seconds):
        image = picture(n)
        server.send(image, message=str(monotonic_us()))
    server.send(picture(0), message=END)
    server.close()


RECEIVERS: dict[str, Callable[[int, Path], None]] = {
    "imagezmq": imagezmq_receive,
    "netgear": netgear_receive,
}
SENDERS: dict[str, Callable[[int, float, float], None]] = {
    "imagezmq": imagezmq_send,
    "netgear": netgear_send,
}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.workers")
    parser.add_argument("peer", choices=sorted(RECEIVERS))
    parser.add_argument("role", choices=["send", "receive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fps", type=float, default=VGA.fps, help="0: as fast as it goes")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rows", type=Path, help="receive: where to write the rows")
    args = parser.parse_args(argv)
    if args.role == "receive":
        if args.rows is None:
            parser.error("receive needs --rows")
        keep_freed_memory()  # the allocator as in avd's probe receiver, so the decodes compare
        RECEIVERS[args.peer](args.port, args.rows)
    else:
        SENDERS[args.peer](args.port, args.fps, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
