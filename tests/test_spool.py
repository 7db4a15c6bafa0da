"""Spool: frames held until acknowledged, bounded by bytes and capture-time age; with a
disk tier in a real folder, overflow goes to segment files and survives a restart."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avd.clock import monotonic_us
from avd.diskspool import DiskSpool
from avd.media.base import CapturedFrame
from avd.spool import Spool

from .conftest import (
    Launcher,
    metric,
    scrape,
    sender_metrics_url,
    wait_until,
    walk_frames,
)


def frame(ms: int, size: int = 10) -> CapturedFrame:
    return CapturedFrame(capture_us=ms * 1000, data=b"x" * size)


def test_holds_frames_in_order_until_acknowledged() -> None:
    spool = Spool(max_bytes=1000, max_age_us=10**9)
    for seq in range(5):
        spool.add(seq, frame(seq))
    assert spool.floor() == 0
    assert spool.ack(2) == 3
    assert spool.oldest_seq() == 3
    assert spool.floor() == 3
    assert len(spool) == 2
    assert spool.bytes == 20


def test_next_after_walks_unsent_frames_oldest_first() -> None:
    spool = Spool(max_bytes=1000, max_age_us=10**9)
    for seq in (4, 5, 7, 9):
        spool.add(seq, frame(seq))
    found = spool.next_after(-1)
    assert found is not None
    assert found[0] == 4
    assert [spool.next_after(s)[0] for s in (4, 5, 6, 7)] == [5, 7, 7, 9]  # type: ignore[index]
    assert spool.next_after(9) is None


def test_evicts_the_oldest_past_the_byte_cap_and_counts_them_lost() -> None:
    spool = Spool(max_bytes=35, max_age_us=10**9)
    evicted = [spool.add(seq, frame(seq)) for seq in range(5)]
    assert evicted == [0, 0, 0, 1, 1]
    assert spool.lost == 2
    assert spool.oldest_seq() == 2


def test_evicts_frames_older_than_the_window() -> None:
    spool = Spool(max_bytes=10**9, max_age_us=30_000_000)  # AVD_SPOOL_SECONDS=30
    spool.add(0, frame(0))
    spool.add(1, frame(29_000))
    assert spool.lost == 0
    spool.add(2, frame(31_000))  # frame 0 is now 31 s older than the newest
    assert spool.lost == 1
    assert spool.oldest_seq() == 1


def test_floor_of_an_empty_spool_is_past_everything_seen() -> None:
    spool = Spool(max_bytes=15, max_age_us=10**9)
    assert spool.floor() == 0
    spool.add(0, frame(0))
    spool.ack(0)
    assert spool.floor() == 1
    spool.add(1, frame(1, size=100))  # over the cap at once: evicted unsent
    assert len(spool) == 0
    assert spool.floor() == 2
    assert spool.lost == 1


def test_frames_already_acknowledged_are_not_kept_again() -> None:
    spool = Spool(max_bytes=1000, max_age_us=10**9)
    spool.ack(10)
    assert spool.add(7, frame(7)) == 0
    assert len(spool) == 0


def test_a_capture_thread_and_the_loop_may_use_it_at_once() -> None:
    spool = Spool(max_bytes=10**9, max_age_us=10**12)

    def capture() -> None:
        for seq in range(20_000):
            spool.add(seq, frame(seq, 1))

    thread = threading.Thread(target=capture)
    thread.start()
    acked = -1
    while thread.is_alive() or acked < 19_999:
        oldest = spool.oldest_seq()
        if oldest is not None:
            acked = oldest
            spool.ack(acked)
    thread.join()
    assert len(spool) == 0
    assert spool.bytes == 0


@given(st.lists(st.tuples(st.integers(1, 50), st.booleans()), max_size=200))
def test_bounds_always_hold_and_every_frame_is_held_acked_or_lost(
    ops: list[tuple[int, bool]],
) -> None:
    spool = Spool(max_bytes=300, max_age_us=5_000)
    acked_count = 0
    for seq, (size, ack_now) in enumerate(ops):
        spool.add(seq, CapturedFrame(capture_us=seq * 1000, data=b"x" * size))
        assert spool.bytes <= 300
        if ack_now:
            acked_count += spool.ack(seq - 2)
        oldest = spool.oldest_seq()
        if oldest is not None:
            assert seq * 1000 - oldest * 1000 <= 5_000
    assert len(spool) + acked_count + spool.lost == len(ops)


# ---- with a disk tier (AVD_SPOOL_DIR) ------------------------------------------------------


def tiered(
    directory: Path,
    *,
    memory: int = 100,
    disk: int = 1 << 20,
    age_us: int = 10**9,
    now_us: int = 10**6,
) -> Spool:
    """A spool whose memory holds ``memory`` bytes, the rest going to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tier = DiskSpool(directory, max_bytes=disk, segment_bytes=400, segment_us=10**12)
    tier.recover(boot_id="boot", now_us=now_us, max_age_us=age_us)
    return Spool(max_bytes=memory, max_age_us=age_us, disk=tier)


def sized(seq: int, size: int = 30) -> CapturedFrame:
    return CapturedFrame(capture_us=seq * 1000, data=f"{seq:05d}".encode() * (size // 5))


def test_beyond_the_memory_cap_the_oldest_frames_go_to_disk_not_lost(tmp_path: Path) -> None:
    spool = tiered(tmp_path)
    assert [spool.add(seq, sized(seq)) for seq in range(50)] == [0] * 50
    assert spool.lost == 0
    assert len(spool) == 50
    assert spool.memory_bytes <= 100
    assert spool.bytes == 50 * 30
    assert spool.disk is not None
    assert len(spool.disk) == 47
    assert list(tmp_path.glob("*.spool"))


def test_next_after_walks_disk_then_memory_in_seq_order(tmp_path: Path) -> None:
    spool = tiered(tmp_path)
    for seq in range(20):
        spool.add(seq, sized(seq))
    assert walk_frames(spool) == [(seq, sized(seq)) for seq in range(20)]
    assert spool.next_after(16) == (17, sized(17))  # in memory
    assert spool.next_after(3) == (4, sized(4))  # on disk
    assert spool.oldest_seq() == 0
    assert spool.floor() == 0


def test_acks_cover_both_tiers_and_delete_acknowledged_segments(tmp_path: Path) -> None:
    spool = tiered(tmp_path)
    for seq in range(40):
        spool.add(seq, sized(seq))
    files = len(list(tmp_path.glob("*.spool")))
    assert spool.ack(20) == 21
    assert 0 < len(list(tmp_path.glob("*.spool"))) < files
    assert spool.floor() == 21
    assert spool.ack(39) == 19
    assert list(tmp_path.glob("*.spool")) == []
    assert (len(spool), spool.bytes, spool.lost) == (0, 0, 0)
    assert spool.floor() == 40


def test_the_age_window_evicts_from_disk_first(tmp_path: Path) -> None:
    spool = tiered(tmp_path, age_us=10_000)  # 10 frames' worth
    for seq in range(30):
        spool.add(seq, sized(seq))
    assert spool.lost == 19  # frames 0-18 are more than 10 ms older than frame 29
    assert spool.oldest_seq() == 19
    assert [seq for seq, _ in walk_frames(spool)] == list(range(19, 30))


def test_beyond_both_caps_the_oldest_frames_are_lost(tmp_path: Path) -> None:
    spool = tiered(tmp_path, disk=1200)  # three segments of 400 bytes
    lost = sum(spool.add(seq, sized(seq)) for seq in range(100))
    assert lost == spool.lost > 0
    held = [seq for seq, _ in walk_frames(spool)]
    assert held == list(range(100 - len(held), 100))  # the newest, without a gap
    assert len(held) + lost == 100


def test_close_puts_memory_on_disk_and_a_new_spool_numbers_on_above_it(tmp_path: Path) -> None:
    spool = tiered(tmp_path)
    for seq in range(20):
        spool.add(seq, sized(seq))
    spool.ack(4)
    assert spool.close() == tmp_path, "where the frames left are kept"
    again = tiered(tmp_path)
    assert walk_frames(again) == [(seq, sized(seq)) for seq in range(5, 20)]
    assert again.floor() == 5
    assert again.next_seq_hint() == 20
    again.ack(19)
    again.close()
    assert tiered(tmp_path).next_seq_hint() == 20  # all acknowledged: numbering still goes on


def test_without_a_disk_the_numbering_starts_at_zero() -> None:
    spool = Spool(max_bytes=100, max_age_us=10**9)
    assert spool.next_seq_hint() == 0
    spool.add(0, frame(0))
    assert spool.next_seq_hint() == 1
    spool.close()  # nothing to do
    assert len(spool) == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 60), st.integers(0, 3)), max_size=150),
    st.integers(0, 150),
)
def test_with_a_disk_every_frame_is_held_acked_or_lost_across_a_restart(
    ops: list[tuple[int, int]], restart_at: int
) -> None:
    """Sizes and acks at random, one restart: held + acked + lost == added, bounds hold."""
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder) / "video"
        spool = tiered(directory, memory=150, disk=1000, age_us=40_000)
        acked = lost_before = 0
        for seq, (size, ack_back) in enumerate(ops):
            if seq == restart_at:
                spool.close()
                lost_before += spool.lost
                now_us = (seq - 1) * 1000  # the last capture: the window drops nothing more
                spool = tiered(directory, memory=150, disk=1000, age_us=40_000, now_us=now_us)
                assert spool.next_seq_hint() >= seq
            spool.add(seq, sized(seq, size * 5))
            if ack_back:
                acked += spool.ack(seq - ack_back)
            assert spool.memory_bytes <= 150
            assert spool.disk is not None
            assert spool.disk.file_bytes <= 1000
            oldest = spool.oldest_seq()
            assert oldest is None or seq - oldest <= 40
        held = walk_frames(spool)
        assert held == [(s, sized(s, ops[s][0] * 5)) for s, _ in held]
        assert len(held) == len(spool)
        assert len(held) + acked + lost_before + spool.lost == len(ops)
        spool.close()


# ---- end to end: a sender killed during an outage sends its disk spool after a restart ----


@pytest.mark.slow
def test_a_sender_killed_during_an_outage_sends_what_its_disk_held_after_restarting(
    launch: Launcher, tmp_path: Path
) -> None:
    receiver = launch.receiver("receiver-1")
    spooling = {
        "AVD_SPOOL_DIR": str(tmp_path / "spool"),
        "AVD_SPOOL_MAX_MB": "1",
        "AVD_AUDIO_SOURCE": "none",
    }
    first = launch.sender(receiver, "sender-1", **spooling)
    wait_until(lambda: metric(receiver.metrics(), "avd_frames_received_total", stream="video") > 20)
    assert receiver.daemon.stop() == 0
    time.sleep(4)  # ~2 MB of video: half of it beyond the memory cap, on disk
    first.kill()  # what was in memory is gone; what was on disk is not

    second = launch.sender(receiver, "sender-2", **spooling)
    found = second.wait_for_log(r"(\d+) spooled frames \(.*seq (\d+)-(\d+)\) read back")
    recovered, newest = int(found.group(1)), int(found.group(3))
    url = sender_metrics_url(second)
    assert recovered > 20
    # The receiver is still away: the new sender's frames overflow to disk too, numbered
    # above the recovered ones, as the first new segment's name (its first seq) shows.
    spooled = tmp_path / "spool" / "video"

    def first_seqs() -> set[int]:
        return {int(path.stem) for path in spooled.glob("*.spool")}

    old = first_seqs()
    wait_until(lambda: first_seqs() - old, timeout=15)
    assert min(first_seqs() - old) > newest

    back = launch.receiver_again(receiver, "receiver-2")

    def sender_metric(name: str) -> float:
        return metric(scrape(url), name, stream="video")

    wait_until(lambda: sender_metric("avd_frames_backfilled_total") >= recovered, timeout=20)
    wait_until(lambda: not list(spooled.glob("*.spool")), timeout=15)
    assert sender_metric("avd_frames_lost_total") == 0
    assert metric(back.metrics(), "avd_frames_late_total", stream="video") >= recovered
    assert second.stop() == 0


def test_the_exit_summary_says_where_unacknowledged_frames_went(
    launch: Launcher, tmp_path: Path
) -> None:
    """It said ``unacknowledged=0`` when they were all kept on disk (the spool was closed
    before it was counted), and gave no hint when, with no spool folder, they were gone."""
    receiver = launch.receiver()
    assert receiver.daemon.stop() == 0  # its ports now refuse: an outage from the start
    spool_dir = tmp_path / "spool"
    kept = launch.sender(receiver, "kept", AVD_SPOOL_DIR=str(spool_dir), AVD_AUDIO_SOURCE="none")
    gone = launch.sender(receiver, "gone", AVD_AUDIO_SOURCE="none")
    for sender in (kept, gone):
        sender.wait_for_log(r"capturing test pattern")
    time.sleep(2)
    assert kept.stop() == 0
    assert gone.stop() == 0
    disk = DiskSpool(spool_dir / "video", max_bytes=1 << 30, segment_bytes=1 << 30, segment_us=1)
    disk.recover(boot_id=None, now_us=monotonic_us(), max_age_us=10**12)
    on_disk = len(disk)
    disk.close()
    line = kept.wait_for_log(r"video: captured=(\d+) .*lost=0 unacknowledged=(\d+)(.*)")
    assert int(line.group(1)) == int(line.group(2)) == on_disk > 10
    assert line.group(3) == f" (kept in {spool_dir / 'video'}: sent after the next start)"
    line = gone.wait_for_log(r"video: captured=(\d+) .*lost=0 unacknowledged=(\d+)(.*)")
    assert int(line.group(1)) == int(line.group(2)) > 10
    assert line.group(3) == " (gone with this process: AVD_SPOOL_DIR would keep them)"


def test_frames_lost_from_the_spool_are_logged_at_once_then_a_line_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from avd.sender import SpoolLossLog  # noqa: PLC0415 - the sender daemon's, not the spool's

    losses = SpoolLossLog("audio", 30.0)
    with caplog.at_level(logging.WARNING, logger="avd.sender"):
        losses.note(1, 100.0)
        losses.note(5, 110.0)  # within the minute: counted, not logged
        losses.note(2, 159.9)
        losses.note(3, 160.0)  # a minute after the first line: the ten since
        losses.note(4, 300.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "audio: 1 frame left the spool before the receiver acknowledged it: lost (the spool "
        "keeps 30 s of frames, AVD_SPOOL_SECONDS, within its size caps)",
        "audio: 10 frames left the spool before the receiver acknowledged them: lost (the "
        "spool keeps 30 s of frames, AVD_SPOOL_SECONDS, within its size caps)",
        "audio: 4 frames left the spool before the receiver acknowledged them: lost (the "
        "spool keeps 30 s of frames, AVD_SPOOL_SECONDS, within its size caps)",
    ]
