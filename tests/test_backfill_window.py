"""The backfill window counts spooled frames only: live frames must not shut the backfill out.

A receiver acknowledges cumulatively: a live frame is acknowledged only once every frame
before it is, and the frames before it that are still unsent are the backfill's to send. If
live frames counted against the window of frames awaiting acknowledgement, a live stream
would fill it while the backfill waits for the recorder, and then nothing could ever fill
the gap: the acknowledgements would stay stuck until the spool evicted the unsent frames
(the 30 audio chunks a 90-minute soak lost).

A real StreamClient against a scripted receiver over real TLS on loopback: it keeps the real
``AckWatermark``, finishes live frames on arrival and spooled ones only after a delay (as
the recorder's interleaver holds a backfill burst), while live frames come ten times faster
than audio's 43 a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

from avd import protocol
from avd.acks import AckWatermark
from avd.backoff import Backoff
from avd.certs import CertPaths
from avd.clock import monotonic_us
from avd.link import BACKFILL_WINDOW
from avd.media.base import AudioFormat, CapturedFrame, StreamKind
from avd.metrics import SenderMetrics
from avd.protocol import Role
from avd.queues import DropOldestQueue
from avd.spool import Spool
from avd.stream_client import Endpoint, StreamClient
from avd.tls import receiver_context, sender_context
from avd.tokens import Token

AUDIO = AudioFormat(44100, 1, 2, 1024)
CHUNK = b"\0" * AUDIO.chunk_bytes
SPOOLED = 3 * BACKFILL_WINDOW  # an outage's worth, waiting when the session starts
LATE_DONE_AFTER_S = 0.3  # how long the receiver holds a spooled frame before it is done
LIVE_EVERY_S = 0.002


class DelayingReceiver:
    """Acknowledges cumulatively, as the real receiver does; spooled frames are
    finished ``LATE_DONE_AFTER_S`` after they arrive, live ones at once."""

    def __init__(self) -> None:
        self.acks: AckWatermark | None = None
        self.late_frames = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = protocol.Connection(Role.RECEIVER)
        loop = asyncio.get_running_loop()

        def done(seq: int) -> None:  # every move is acknowledged: no batching needed here
            assert self.acks is not None
            if self.acks.done(seq) and conn.state is protocol.State.OPEN:
                writer.write(conn.send(protocol.Ack(self.acks.acked)))

        with contextlib.suppress(OSError, EOFError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                conn.receive_data(data)
                while (event := conn.next_event()) is not None:
                    if isinstance(event, protocol.Hello):
                        self.acks = AckWatermark(event.first_seq)
                        writer.write(conn.send(protocol.Welcome(1, 60_000, 1 << 20)))
                    elif isinstance(event, protocol.Media):
                        if event.late:
                            self.late_frames += 1
                            loop.call_later(LATE_DONE_AFTER_S, done, event.seq)
                        else:
                            done(event.seq)
                    elif isinstance(event, protocol.Floor) and self.acks is not None:
                        self.acks.floor(event.seq)
                    elif isinstance(event, protocol.Goodbye | protocol.ConnectionClosed):
                        return


async def stream_a_spool_beside_fast_live_frames(pki: CertPaths) -> tuple[int, int, int, int]:
    """(frames the receiver finished contiguously, frames captured, spooled frames it got,
    frames the spool evicted) once every frame is acknowledged, or after 10 s."""
    receiver = DelayingReceiver()
    context = receiver_context(cert=pki.receiver_cert, key=pki.receiver_key)
    server = await asyncio.start_server(receiver.serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    spool = Spool(max_bytes=1 << 30, max_age_us=3_600_000_000)
    queue = DropOldestQueue[tuple[int, CapturedFrame]](22, loop)  # AVD_AUDIO_QUEUE_MS=500
    client = StreamClient(
        kind=StreamKind.AUDIO,
        endpoint=Endpoint("127.0.0.1", port, "localhost", sender_context(ca=pki.ca_cert), 5.0),
        sender_id="mic1",
        token=Token("t" * 43),
        media_format=AUDIO,
        queue=queue,
        spool=spool,
        metrics=SenderMetrics(),
        backoff=Backoff(),
    )
    seqs = itertools.count()
    for _ in range(SPOOLED):  # captured while the receiver was away
        spool.add(next(seqs), CapturedFrame(monotonic_us(), CHUNK))
    stop = asyncio.Event()

    def capture() -> int:
        seq = next(seqs)
        frame = CapturedFrame(monotonic_us(), CHUNK)
        spool.add(seq, frame)
        queue.put((seq, frame))
        return seq

    running = asyncio.create_task(client.run(stop))
    newest = -1
    try:
        async with asyncio.timeout(10):  # without a fix, never: the acks stay stuck
            while (acks := receiver.acks) is None or acks.acked < max(newest, SPOOLED):
                newest = capture()
                await asyncio.sleep(LIVE_EVERY_S)
    except TimeoutError:
        pass
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=10)
        server.close()
        await server.wait_closed()
    acked = receiver.acks.acked if receiver.acks is not None else -1
    return acked, newest, receiver.late_frames, spool.lost


def test_live_frames_do_not_shut_the_backfill_out(pki: CertPaths) -> None:
    acked, newest, late_frames, lost = asyncio.run(stream_a_spool_beside_fast_live_frames(pki))
    # Every spooled frame went out as a late frame, and everything up to the newest live
    # frame was acknowledged: no frame stayed unsent below the live ones.
    assert late_frames >= SPOOLED
    assert acked >= newest >= SPOOLED, (acked, newest)
    assert lost == 0


def test_the_scripted_receiver_holds_spooled_frames_long_enough_to_matter() -> None:
    # Without the delay the backfill would be finished before live frames fill a window: the
    # test above would pass whatever the window counts.
    live_frames_meanwhile = LATE_DONE_AFTER_S / LIVE_EVERY_S
    assert live_frames_meanwhile * 2 > BACKFILL_WINDOW
