"""The recorder in its own process: real child, real files read back with PyAV, real signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import av
import pytest

from avd.certs import CertPaths
from avd.clock import monotonic_us
from avd.loadgen import camera_like_frames
from avd.media import recorder_process
from avd.media import recorder_wire as wire
from avd.media.base import ReceivedFrame, SinkEvent, StreamInfo, StreamKind, VideoFormat
from avd.media.done import FrameDone
from avd.media.recorder_process import RecorderConfig, RecorderProcess
from tests.conftest import Credentials, receiver_env, start_receiver, wait_until

VGA = VideoFormat(640, 480, 20, 70)
INFO = StreamInfo("cam1", StreamKind.VIDEO, VGA, "127.0.0.1:9", 1)
JPEGS = camera_like_frames(VGA, 4)


def _frame(seq: int, start_us: int) -> ReceivedFrame:
    stamp = start_us + seq * 50_000
    return ReceivedFrame(seq, stamp, stamp, stamp, JPEGS[seq % len(JPEGS)])


def _recorded_packets(folder: Path) -> list[bytes]:
    packets: list[bytes] = []
    for path in sorted(folder.rglob("*.mkv")):
        with av.open(str(path)) as container:
            packets += [bytes(p) for p in container.demux(video=0) if p.size]
    return packets


class _Done:
    def __init__(self) -> None:
        self.seqs: Counter[int] = Counter()
        self.lock = threading.Lock()

    def __call__(self, batch: Sequence[FrameDone]) -> None:
        with self.lock:
            self.seqs.update(seq for _, _, seq in batch)


async def _stream(recorder: RecorderProcess, count: int, per_tick: int = 5) -> None:
    """Frames as a receiver's loop hands them over: a few per loop iteration."""
    start = monotonic_us()
    recorder.stream_started(INFO)
    for seq in range(count):
        recorder.frame(INFO, _frame(seq, start))
        if seq % per_tick == per_tick - 1:
            await asyncio.sleep(0.001)
    recorder.stream_ended(INFO)


def test_frames_reach_the_files_and_each_is_reported_done_once(tmp_path: Path) -> None:
    done = _Done()

    async def run() -> RecorderProcess:
        recorder = RecorderProcess(RecorderConfig(tmp_path), on_done=done)
        await _stream(recorder, 200)
        await asyncio.to_thread(recorder.close)
        return recorder

    recorder = asyncio.run(run())
    assert done.seqs == Counter(range(200))  # every frame, exactly once
    assert _recorded_packets(tmp_path / "cam1") == [JPEGS[n % 4] for n in range(200)]
    stats = recorder.stats()["cam1"]
    assert (stats.video_frames, stats.dropped, stats.given_up) == (200, 0, 0)
    assert (tmp_path / "cam1" / "latest.jpg").read_bytes() in JPEGS


def test_without_an_event_loop_frames_are_sent_at_once(tmp_path: Path) -> None:
    done = _Done()
    recorder = RecorderProcess(RecorderConfig(tmp_path), on_done=done)
    start = monotonic_us()
    recorder.stream_started(INFO)
    for seq in range(30):
        recorder.frame(INFO, _frame(seq, start))
    recorder.close()
    assert done.seqs == Counter(range(30))
    assert len(_recorded_packets(tmp_path / "cam1")) == 30


def test_a_batch_waits_for_its_delay_unless_a_mebibyte_is_pending(tmp_path: Path) -> None:
    """The child wakes per batch, not per frame; a burst of senders does not wait the delay."""
    threshold = recorder_process._FLUSH_BYTES

    async def run() -> tuple[list[tuple[int, int]], int, RecorderProcess]:
        recorder = RecorderProcess(RecorderConfig(tmp_path))
        recorder.stream_started(INFO)
        start, queued, seen = monotonic_us(), 0, []
        for seq in range(2 * threshold // min(map(len, JPEGS))):  # all in one loop iteration
            frame = _frame(seq, start)
            recorder.frame(INFO, frame)
            queued += len(wire.frame_header(INFO.session_id, frame)) + len(frame.data)
            seen.append((queued, recorder._pending_bytes))
            if recorder._pending_bytes < queued:  # some went to the child
                break
        await asyncio.sleep(recorder_process._FLUSH_DELAY_S * 3)
        after_delay = recorder._pending_bytes
        await asyncio.to_thread(recorder.close)
        return seen, after_delay, recorder

    seen, after_delay, recorder = asyncio.run(run())
    # Below the threshold every frame is held (the start message is held with them)...
    assert all(queued < pending < threshold for queued, pending in seen[:-1])
    # ...and the one that reaches it sends the batch at once, without waiting for the delay.
    last_queued, last_pending = seen[-1]
    assert last_queued + (seen[0][1] - seen[0][0]) >= threshold
    assert last_pending < last_queued
    assert after_delay == 0  # what the socket did not take then went out when it could
    assert len(_recorded_packets(tmp_path / "cam1")) == len(seen)
    assert recorder.stats()["cam1"].dropped == 0


def test_a_steady_streams_own_frames_carry_its_batches_a_lone_frame_goes_on_the_timer(
    tmp_path: Path,
) -> None:
    """A batch goes out with the first frame _FLUSH_AGE_S after its first: a steady stream
    wakes nothing more than its own frames. The timer, later, is for a frame with no next."""
    age, delay = recorder_process._FLUSH_AGE_S, recorder_process._FLUSH_DELAY_S

    async def run() -> tuple[int, int, int, int, float, int]:
        loop = asyncio.get_running_loop()
        recorder = RecorderProcess(RecorderConfig(tmp_path))
        start = monotonic_us()
        recorder.stream_started(INFO)  # opens a batch, and its timer
        timer = recorder._flush_timer
        assert timer is not None
        timer_in = timer.when() - loop.time()
        recorder._batch_started = time.monotonic() + 60  # the batch is young, however slow we are
        recorder.frame(INFO, _frame(0, start))
        young = recorder._pending_bytes  # held: not due yet
        recorder._batch_started = time.monotonic() - age  # as if _FLUSH_AGE_S had passed
        recorder.frame(INFO, _frame(1, start + 50_000))
        carried = recorder._pending_bytes  # this frame took the batch out with it
        assert recorder._flush_timer is None  # and the batch's timer is gone
        recorder.frame(INFO, _frame(2, start + 100_000))  # a new batch, then nothing more
        lone = recorder._pending_bytes
        await asyncio.sleep(3 * delay)
        after_delay = recorder._pending_bytes
        await asyncio.to_thread(recorder.close)
        return (
            young,
            carried,
            lone,
            after_delay,
            timer_in,
            len(_recorded_packets(tmp_path / "cam1")),
        )

    young, carried, lone, after_delay, timer_in, recorded = asyncio.run(run())
    assert young > len(JPEGS[0]) // 2
    assert carried == 0
    assert lone > 0
    assert after_delay == 0
    assert delay - 0.01 < timer_in <= delay
    assert recorded == 3


def test_the_end_of_a_stream_goes_to_the_child_at_once_with_what_it_held(
    tmp_path: Path,
) -> None:
    """The sender waits for the acknowledgement of its last frames before it goes: the end of
    its stream does not wait half a second for the batch's timer."""

    async def run() -> tuple[int, int, int]:
        recorder = RecorderProcess(RecorderConfig(tmp_path))
        recorder.stream_started(INFO)
        recorder.frame(INFO, _frame(0, monotonic_us()))
        held = recorder._pending_bytes
        recorder.stream_ended(INFO)
        after_end = recorder._pending_bytes  # sent in the same call, not on the timer
        await asyncio.to_thread(recorder.close)
        return held, after_end, len(_recorded_packets(tmp_path / "cam1"))

    held, after_end, recorded = asyncio.run(run())
    assert held > 0
    assert after_end == 0
    assert recorded == 1


def test_frames_beyond_the_pending_limit_are_dropped_counted_reported_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "avd.media.recorder")
    done = _Done()

    async def run() -> RecorderProcess:
        # Room for one frame at a time: a burst in one loop iteration overflows at once.
        recorder = RecorderProcess(
            RecorderConfig(tmp_path), on_done=done, max_pending_bytes=len(max(JPEGS, key=len))
        )
        start = monotonic_us()
        recorder.stream_started(INFO)
        for seq in range(10):
            recorder.frame(INFO, _frame(seq, start))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(recorder.close)
        return recorder

    recorder = asyncio.run(run())
    stats = recorder.stats()["cam1"]
    assert stats.video_frames == 1
    assert stats.dropped == 9
    assert done.seqs == Counter(range(10))  # dropped ones are done too: acks must not stall
    # Done, so no sender sends them again: the journal must say so, once, not per frame.
    said = [r.getMessage() for r in caplog.records if r.name == "avd.media.recorder"]
    assert len(said) == 2, said
    assert said[0].startswith("recorder: the recording process is behind, ")
    assert "(the first from cam1); " in said[0]
    assert said[1].startswith("recorder: caught up; frames left out of the recordings: 9 over ")
    assert said[1].endswith("(cam1 9)")


def test_the_child_ignores_sigterm_and_stops_when_told(tmp_path: Path) -> None:
    recorder = RecorderProcess(RecorderConfig(tmp_path))
    assert recorder.wait_ready(20)
    os.kill(recorder.pid, signal.SIGTERM)  # as systemd signals the whole cgroup
    os.kill(recorder.pid, signal.SIGINT)  # as a terminal signals the process group
    time.sleep(0.3)
    assert Path(f"/proc/{recorder.pid}").exists()
    start = monotonic_us()
    recorder.stream_started(INFO)
    recorder.frame(INFO, _frame(0, start))
    recorder.close()
    assert len(_recorded_packets(tmp_path / "cam1")) == 1


def test_a_dead_child_is_reported_once_and_later_frames_are_ignored(tmp_path: Path) -> None:
    failures: list[str] = []
    recorder = RecorderProcess(RecorderConfig(tmp_path), on_failure=failures.append)
    assert recorder.wait_ready(20)
    os.kill(recorder.pid, signal.SIGKILL)
    wait_until(lambda: failures, timeout=10)
    assert failures == [f"the recording process (pid {recorder.pid}) exited with code -9"]
    recorder.stream_started(INFO)
    recorder.frame(INFO, _frame(0, monotonic_us()))  # neither raises nor blocks
    recorder.close()
    assert failures == [failures[0]]


_PARENT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from avd.clock import monotonic_us
    from avd.media.recorder_process import RecorderConfig, RecorderProcess
    from tests.test_recorder_process import INFO, _frame
    recorder = RecorderProcess(RecorderConfig(Path(sys.argv[1])))
    recorder.wait_ready(20)
    start = monotonic_us()
    recorder.stream_started(INFO)
    for seq in range(40):
        recorder.frame(INFO, _frame(seq, start))
    print(recorder.pid, flush=True)
    time.sleep(60)  # killed before this ends
    """
)


def test_the_child_writes_out_what_it_holds_when_the_receiver_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no close(), no STOP
    parent.wait(5)
    wait_until(lambda: not Path(f"/proc/{child_pid}").exists(), timeout=20)
    assert not list(tmp_path.rglob("*.part")), "the segment was left unfinished"
    assert _recorded_packets(tmp_path / "cam1") == [JPEGS[n % 4] for n in range(40)]


def test_the_receiver_daemon_exits_1_when_its_recorder_dies(
    tmp_path: Path, pki: CertPaths, creds: Credentials
) -> None:
    env = receiver_env(pki, creds.tokens_file, AVD_RECORD_DIR=str(tmp_path / "rec"))
    handle = start_receiver(env, tmp_path / "receiver.log")
    try:
        children = Path(f"/proc/{handle.daemon.proc.pid}/task/{handle.daemon.proc.pid}/children")
        wait_until(lambda: children.read_text().split(), timeout=10)
        (child,) = map(int, children.read_text().split())
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        assert b"avd.media.recorder_child" in cmdline
        os.kill(child, signal.SIGKILL)
        assert handle.daemon.proc.wait(15) == 1
        log = handle.daemon.log_text()
        assert f"the recording process (pid {child}) exited with code -9" in log
        assert "avd-receiver stopped:" in log
    finally:
        handle.daemon.kill()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_child_logs_to_the_daemons_stderr_in_its_format(
    tmp_path: Path, log_format: str
) -> None:
    not_a_folder = tmp_path / "recordings"
    not_a_folder.write_text("a file where the recordings folder should be")
    config = RecorderConfig(not_a_folder, log_format=log_format)
    script = textwrap.dedent(
        """
        import sys
        from avd.clock import monotonic_us
        from avd.media.recorder_process import RecorderConfig, RecorderProcess
        from tests.test_recorder_process import INFO, _frame
        recorder = RecorderProcess(RecorderConfig.from_json(sys.argv[1]))
        recorder.stream_started(INFO)
        recorder.frame(INFO, _frame(0, monotonic_us()))
        recorder.close()
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, config.to_json()],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    lines = [line for line in run.stderr.splitlines() if "cam1" in line]
    assert lines, run.stderr
    if log_format == "json":
        assert all(line.startswith("{") for line in lines), lines
    else:
        assert all(" avd.media." in line for line in lines), lines


class _ScriptedInbox:
    """The child's inbox as a script: bytes to return, None for a timeout, b"" for EOF."""

    def __init__(self, script: list[bytes | None]) -> None:
        self.script, self.timeouts = script, list[float | None]()

    def settimeout(self, timeout: float | None) -> None:
        self.timeouts.append(timeout)

    def recv(self, size: int) -> bytes:
        chunk = self.script.pop(0)
        if chunk is None:
            raise TimeoutError
        return chunk


class _NoReports:
    def stats_if_due(self, stats: object) -> None:
        pass


class _Streams:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.feeds: list[list[SinkEvent]] = []

    def feed(self, events: list[SinkEvent]) -> None:
        self.events += [event.kind for event in events]
        self.feeds.append(list(events))

    def stats(self) -> dict[str, object]:
        return {}


def test_the_childs_inbox_waits_longer_than_a_batch_takes_to_come() -> None:
    """A steady stream's batches wake the child, not a timeout between two of them; counters
    go out with the batches, or after a quiet second."""
    from avd.media import recorder_child  # noqa: PLC0415

    wait = recorder_child._STATS_SECONDS
    assert wait > recorder_process._FLUSH_DELAY_S
    script = [None, wire.start(INFO), None, wire.end(INFO.session_id), b""]
    inbox, recorder = _ScriptedInbox(script), _Streams()
    recorder_child._serve(inbox, recorder, _NoReports())  # type: ignore[arg-type]
    assert recorder.events == ["start", "end"]
    assert inbox.timeouts == [wait]


def _frame_message(seq: int, data: bytes) -> bytes:
    frame = ReceivedFrame(seq, 1_000 + seq, 2_000 + seq, None, data)
    return wire.frame_header(INFO.session_id, frame) + data


def test_the_child_hands_the_recorder_a_whole_read_at_once() -> None:
    """One hand-off to the writer thread per read of the inbox, not one per frame; a read
    that ends inside a message hands over what it completed."""
    from avd.media import recorder_child  # noqa: PLC0415

    stream = wire.start(INFO) + _frame_message(1, b"one") + _frame_message(2, b"two")
    stream += _frame_message(3, b"three") + wire.end(INFO.session_id)
    cut = len(stream) - 20  # inside the third frame
    inbox, recorder = _ScriptedInbox([stream[:cut], stream[cut:], b""]), _Streams()
    recorder_child._serve(inbox, recorder, _NoReports())  # type: ignore[arg-type]
    assert [[e.kind for e in feed] for feed in recorder.feeds] == [
        ["start", "frame", "frame"],
        ["frame", "end"],
    ]
    frames = [e.frame for feed in recorder.feeds for e in feed if e.frame is not None]
    assert [(f.seq, f.data) for f in frames] == [(1, b"one"), (2, b"two"), (3, b"three")]


def test_what_came_before_a_bad_message_is_still_recorded() -> None:
    from avd.media import recorder_child  # noqa: PLC0415

    stream = wire.start(INFO) + _frame_message(1, b"one") + wire.message(wire.Kind.READY)
    inbox, recorder = _ScriptedInbox([stream]), _Streams()
    with pytest.raises(wire.WireError, match="unexpected READY"):
        recorder_child._serve(inbox, recorder, _NoReports())  # type: ignore[arg-type]
    assert recorder.events == ["start", "frame"]
