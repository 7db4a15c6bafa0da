"""The receiver's acknowledgements, seen by a sender that speaks the protocol by hand over
real TLS: the first at once, then at most one per ``ACK_DELAY_S``, the last covering every
frame.

The receiver sends an ack at once when the previous one went out ``ACK_DELAY_S`` ago or
more (no timer of its own to wake for), else when that much time has passed: a burst of
frames right after an ack is acknowledged ``ACK_DELAY_S`` after it, not once a frame.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import time

from avd.loadgen import camera_like_frames
from avd.media.base import StreamKind, VideoFormat
from avd.protocol import Ack, Connection, Hello, Media, Role, Welcome
from avd.session import ACK_DELAY_S
from avd.tls import sender_context

from .conftest import Launcher

VGA = VideoFormat(640, 480, 20, 70)
# Gaps are measured when this test reads each ack, a little after the receiver sent it: half
# the delay leaves room for that and still tells spaced acks from one per frame (~1 ms).
MIN_GAP_S = ACK_DELAY_S / 2


def _session(launch: Launcher, port: int) -> tuple[ssl.SSLSocket, Connection]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = sender_context(ca=launch.pki.ca_cert).wrap_socket(raw, server_hostname="localhost")
    conn = Connection(Role.SENDER)
    token = launch.creds.tokens["cam1"].encode()
    tls.sendall(conn.send(Hello("cam1", StreamKind.VIDEO, VGA, token)))
    while not isinstance(event := _next(tls, conn), Welcome):
        assert event is not None
    return tls, conn


def _next(tls: ssl.SSLSocket, conn: Connection) -> object:
    while (event := conn.next_event()) is None:
        conn.receive_data(tls.recv(65536))
    return event


def _acks_until(tls: ssl.SSLSocket, conn: Connection, seq: int) -> list[tuple[float, int]]:
    """(when read, acked seq) of every ack up to the one covering ``seq``."""
    acks: list[tuple[float, int]] = []
    tls.settimeout(10)
    while not acks or acks[-1][1] < seq:
        event = _next(tls, conn)
        if isinstance(event, Ack):
            acks.append((time.monotonic(), event.seq))
    return acks


def test_acks_are_spaced_by_the_delay_and_the_last_covers_every_frame(launch: Launcher) -> None:
    handle = launch.receiver()  # no recording: frames are acknowledged on arrival
    tls, conn = _session(launch, handle.video_port)
    with tls:
        capture, jpeg = time.monotonic_ns() // 1000, camera_like_frames(VGA, 1)[0]
        sent = time.monotonic()
        tls.sendall(b"".join(conn.send_media(Media(0, capture, jpeg, False))))
        first = _acks_until(tls, conn, 0)
        # A burst right after that ack: frames 1-40 within a few ms, acked together.
        for seq in range(1, 41):
            tls.sendall(b"".join(conn.send_media(Media(seq, capture + seq, jpeg, False))))
        burst = _acks_until(tls, conn, 40)
    # The first frame of a quiet session is acknowledged at once, not after a timer's delay.
    assert first[-1][0] - sent < ACK_DELAY_S
    times = [t for t, _ in first + burst]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps, "the burst was acknowledged with the first frame's ack"
    assert all(gap >= MIN_GAP_S for gap in gaps), gaps
    assert burst[-1][1] == 40
