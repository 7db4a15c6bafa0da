"""The spool's disk tier on a real file system: segments, caps, acks, and reading back.

Crashes are real: a child process writes and leaves with ``os._exit`` (nothing closed,
nothing fsync'd), torn and corrupt records are made by cutting and changing the files, and
a write failure comes from RLIMIT_FSIZE (the kernel's short write, then EFBIG). Last, real
daemons: a receiver away longer than the sender's memory cap holds, then everything
backfilled from disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avd.diskspool import MAGIC, RECORD, SUFFIX, DiskSpool, open_disk_spool
from avd.media.base import CapturedFrame

from .conftest import (
    Launcher,
    metric,
    scrape,
    sender_metrics_url,
    wait_until,
    walk_frames,
)

BASE_US = 1_000_000_000
FRAME_US = 50_000
NOW_US = BASE_US + 3600 * 1_000_000  # an hour after the first frame: same boot, later
DAY_US = 86_400 * 1_000_000
REPO = Path(__file__).resolve().parent.parent


def frame(seq: int, size: int = 96) -> CapturedFrame:
    """A frame whose bytes name its seq, so a mix-up shows."""
    return CapturedFrame(BASE_US + seq * FRAME_US, f"{seq:08d}".encode() * (size // 8))


def disk_at(
    directory: Path,
    *,
    max_bytes: int = 1 << 20,
    segment_bytes: int = 1000,
    segment_us: int = DAY_US,
    now_us: int = NOW_US,
    max_age_us: int = DAY_US,
    boot_id: str | None = "boot-a",
) -> DiskSpool:
    directory.mkdir(parents=True, exist_ok=True)
    disk = DiskSpool(
        directory, max_bytes=max_bytes, segment_bytes=segment_bytes, segment_us=segment_us
    )
    disk.recover(boot_id=boot_id, now_us=now_us, max_age_us=max_age_us)
    return disk


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SUFFIX))


def test_frames_come_back_in_order_byte_identical(tmp_path: Path) -> None:
    disk = disk_at(tmp_path)
    for seq in range(30):
        assert disk.append(seq, frame(seq)) == 0
    assert walk_frames(disk) == [(seq, frame(seq)) for seq in range(30)]
    assert disk.oldest() == (0, frame(0).capture_us)
    assert disk.next_after(12) == (13, frame(13))
    assert len(disk) == 30
    assert disk.bytes == 30 * 96
    assert disk.file_bytes == sum(p.stat().st_size for p in segments(tmp_path))


def test_a_segment_is_named_by_its_first_seq_and_rolls_at_its_size(tmp_path: Path) -> None:
    disk = disk_at(tmp_path, segment_bytes=MAGIC.__len__() + 4 * (RECORD.size + 96))
    for seq in range(10):
        disk.append(seq, frame(seq))
    assert [p.name for p in segments(tmp_path)] == [f"{first:020d}{SUFFIX}" for first in (0, 4, 8)]


def test_a_segment_rolls_after_its_time_span(tmp_path: Path) -> None:
    disk = disk_at(tmp_path, segment_bytes=1 << 20, segment_us=5 * FRAME_US)
    for seq in range(12):
        disk.append(seq, frame(seq))
    assert [int(p.stem) for p in segments(tmp_path)] == [0, 5, 10]


def test_acks_delete_a_segment_once_all_its_frames_are_acknowledged(tmp_path: Path) -> None:
    disk = disk_at(tmp_path, segment_bytes=len(MAGIC) + 4 * (RECORD.size + 96))
    for seq in range(10):
        disk.append(seq, frame(seq))
    assert disk.drop_through(2) == 3
    assert [int(p.stem) for p in segments(tmp_path)] == [0, 4, 8]  # seq 3 still in the first
    assert disk.drop_through(3) == 1
    assert [int(p.stem) for p in segments(tmp_path)] == [4, 8]
    assert disk.drop_through(9) == 6
    assert segments(tmp_path) == []
    assert (len(disk), disk.bytes, disk.file_bytes, disk.lost) == (0, 0, 0, 0)


def test_the_age_window_evicts_the_oldest_as_lost(tmp_path: Path) -> None:
    disk = disk_at(tmp_path, segment_bytes=len(MAGIC) + 4 * (RECORD.size + 96))
    for seq in range(10):
        disk.append(seq, frame(seq))
    assert disk.evict_older_than(frame(6).capture_us) == 6
    assert disk.lost == 6
    assert disk.oldest() == (6, frame(6).capture_us)
    assert [int(p.stem) for p in segments(tmp_path)] == [4, 8]


def test_the_cap_drops_the_oldest_segment_and_keeps_the_newest(tmp_path: Path) -> None:
    record = RECORD.size + 96
    cap = 3 * (len(MAGIC) + 4 * record)  # three full segments
    disk = disk_at(tmp_path, max_bytes=cap, segment_bytes=len(MAGIC) + 4 * record)
    lost = [disk.append(seq, frame(seq)) for seq in range(20)]
    assert sum(lost) == disk.lost == 8  # two segments of four went to make room
    assert lost[12] == 4  # the first frame of a fourth segment pushes out the first
    assert disk.file_bytes <= cap
    assert sum(p.stat().st_size for p in segments(tmp_path)) == disk.file_bytes
    assert [seq for seq, _ in walk_frames(disk)] == list(range(8, 20))


def test_a_frame_larger_than_the_cap_is_lost_alone(tmp_path: Path) -> None:
    disk = disk_at(tmp_path, max_bytes=200)
    assert disk.append(0, frame(0, size=400)) == 1
    assert disk.append(1, frame(1, size=64)) == 0
    assert [seq for seq, _ in walk_frames(disk)] == [1]


def test_folder_and_files_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        disk = open_disk_spool(
            tmp_path / "spool", "video", max_bytes=1 << 20, max_age_us=DAY_US,
            now_us=NOW_US, boot_id="boot-a",
        )  # fmt: skip
        assert disk is not None
        disk.append(0, frame(0))
    finally:
        os.umask(old_umask)
    for folder in (tmp_path / "spool", tmp_path / "spool" / "video"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (tmp_path / "spool" / "video").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_an_existing_open_folder_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "video").mkdir(mode=0o755)
    os.chmod(tmp_path / "video", 0o755)
    disk = open_disk_spool(
        tmp_path, "video", max_bytes=1 << 20, max_age_us=DAY_US, now_us=NOW_US, boot_id="b"
    )
    assert disk is not None
    assert stat.S_IMODE((tmp_path / "video").stat().st_mode) == 0o700


def test_an_unusable_folder_means_memory_only_with_one_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "plain-file").write_text("not a folder")
    with caplog.at_level(logging.ERROR, logger="avd.sender"):
        disk = open_disk_spool(
            tmp_path / "plain-file" / "spool", "audio", max_bytes=1 << 20,
            max_age_us=DAY_US, now_us=NOW_US, boot_id="boot-a",
        )  # fmt: skip
    assert disk is None
    [record] = caplog.records
    assert "AVD_SPOOL_DIR" in record.getMessage()
    assert "plain-file/spool/audio" in record.getMessage()
    assert "memory only" in record.getMessage()


def test_a_folder_in_use_by_another_sender_is_not_shared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = open_disk_spool(
        tmp_path, "video", max_bytes=1 << 20, max_age_us=DAY_US, now_us=NOW_US, boot_id="b"
    )
    assert first is not None
    with caplog.at_level(logging.ERROR, logger="avd.sender"):
        second = open_disk_spool(
            tmp_path, "video", max_bytes=1 << 20, max_age_us=DAY_US, now_us=NOW_US, boot_id="b"
        )
    assert second is None
    assert "another process uses this spool folder" in caplog.text
    first.close()
    third = open_disk_spool(
        tmp_path, "video", max_bytes=1 << 20, max_age_us=DAY_US, now_us=NOW_US, boot_id="b"
    )
    assert third is not None


# ---- after a crash ------------------------------------------------------------------------

CRASHING_WRITER = """
import os, sys
from pathlib import Path
from tests.test_diskspool import disk_at, frame
disk = disk_at(Path(sys.argv[1]), boot_id=sys.argv[2])
for seq in range(int(sys.argv[3])):
    disk.append(seq, frame(seq))
disk.drop_through(int(sys.argv[4]))
os._exit(0)  # a crash: nothing closed, nothing fsync'd
"""


def crash_after_writing(directory: Path, count: int, acked: int, boot_id: str = "boot-a") -> None:
    subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(directory), boot_id, str(count), str(acked)],
        cwd=REPO,
        check=True,
        timeout=30,
    )


def test_after_a_crash_every_unacknowledged_frame_comes_back(tmp_path: Path) -> None:
    crash_after_writing(tmp_path, count=40, acked=9)
    disk = disk_at(tmp_path)
    assert walk_frames(disk) == [(seq, frame(seq)) for seq in range(10, 40)]
    assert disk.newest_seq == 39
    assert disk.lost == 0
    # Writing goes on in a new segment, and a second restart finds both runs' frames.
    for seq in range(40, 45):
        disk.append(seq, frame(seq))
    disk.close()
    assert [seq for seq, _ in walk_frames(disk_at(tmp_path))] == list(range(10, 45))


def test_acknowledged_frames_do_not_come_back_and_numbering_goes_on_above_them(
    tmp_path: Path,
) -> None:
    crash_after_writing(tmp_path, count=8, acked=7)  # all acknowledged, files deleted
    disk = disk_at(tmp_path)
    assert len(disk) == 0
    assert segments(tmp_path) == []
    assert disk.newest_seq == 7  # a sender restarting numbers from 8


def test_a_torn_last_record_is_ignored_and_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crash_after_writing(tmp_path, count=10, acked=-1)
    last = segments(tmp_path)[-1]
    full = last.stat().st_size
    os.truncate(last, full - 10)  # the last record's payload cut short
    with caplog.at_level(logging.WARNING, logger="avd.sender"):
        disk = disk_at(tmp_path)
    assert [seq for seq, _ in walk_frames(disk)] == list(range(9))
    assert last.stat().st_size == full - RECORD.size - 96
    assert "torn record" in caplog.text
    disk.append(9, frame(9))
    disk.close()
    assert walk_frames(disk_at(tmp_path)) == [(seq, frame(seq)) for seq in range(10)]


def test_a_torn_header_and_a_segment_torn_at_creation_are_ignored(tmp_path: Path) -> None:
    crash_after_writing(tmp_path, count=5, acked=-1)
    with segments(tmp_path)[-1].open("ab") as file:
        file.write(RECORD.pack(5, 0, 96, 0)[:7])
    (tmp_path / f"{6:020d}{SUFFIX}").write_bytes(MAGIC[:3])
    disk = disk_at(tmp_path)
    assert [seq for seq, _ in walk_frames(disk)] == list(range(5))
    assert [int(p.stem) for p in segments(tmp_path)] == [0]


def test_a_length_beyond_the_file_is_taken_for_a_torn_record_not_read(tmp_path: Path) -> None:
    crash_after_writing(tmp_path, count=3, acked=-1)
    [path] = segments(tmp_path)
    with path.open("ab") as file:
        file.write(RECORD.pack(3, 0, 0xFFFF_FFFF, 0) + b"x" * 100)  # 4 GiB claimed
    assert [seq for seq, _ in walk_frames(disk_at(tmp_path))] == [0, 1, 2]
    assert path.stat().st_size == len(MAGIC) + 3 * (RECORD.size + 96)


def test_a_corrupt_record_ends_what_is_read_of_its_file(tmp_path: Path) -> None:
    crash_after_writing(tmp_path, count=10, acked=-1)
    first, _second = segments(tmp_path)  # seq 0-7, 8-9
    data = bytearray(first.read_bytes())
    data[len(MAGIC) + 2 * (RECORD.size + 96) + RECORD.size + 5] ^= 0xFF  # 3rd record's payload
    first.write_bytes(bytes(data))
    assert [seq for seq, _ in walk_frames(disk_at(tmp_path))] == [0, 1, 8, 9]
    assert first.stat().st_size == len(MAGIC) + 2 * (RECORD.size + 96)


def test_frames_from_before_a_reboot_are_dropped_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crash_after_writing(tmp_path, count=10, acked=-1, boot_id="boot-a")
    with caplog.at_level(logging.INFO, logger="avd.sender"):
        disk = disk_at(tmp_path, boot_id="boot-b")
    assert len(disk) == 0
    assert segments(tmp_path) == []
    [record] = caplog.records
    assert "10 frames spooled before this host rebooted are dropped" in record.getMessage()
    assert (tmp_path / "boot_id").read_text().strip() == "boot-b"


def test_without_a_boot_id_a_capture_time_in_the_future_means_another_boot(
    tmp_path: Path,
) -> None:
    crash_after_writing(tmp_path, count=10, acked=-1, boot_id="boot-a")
    disk = disk_at(tmp_path, boot_id=None, now_us=frame(20).capture_us)
    assert len(disk) == 10
    disk.close()
    assert len(disk_at(tmp_path, boot_id=None, now_us=frame(5).capture_us)) == 0


def test_frames_older_than_the_window_are_dropped_when_read_back(tmp_path: Path) -> None:
    crash_after_writing(tmp_path, count=10, acked=-1)
    disk = disk_at(tmp_path, now_us=frame(12).capture_us, max_age_us=10 * FRAME_US)
    assert [seq for seq, _ in walk_frames(disk)] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert disk.lost == 0  # lost by an earlier run, not counted in this one's metrics


def test_a_file_that_is_not_a_segment_is_left_alone(tmp_path: Path) -> None:
    stranger = tmp_path / f"{0:020d}{SUFFIX}"
    stranger.write_bytes(b"something else entirely")
    disk = disk_at(tmp_path)
    disk.append(1, frame(1))
    assert stranger.read_bytes() == b"something else entirely"
    assert [seq for seq, _ in walk_frames(disk)] == [1]


# ---- the disk failing under a running spool ------------------------------------------------

FILE_SIZE_LIMITED_WRITER = """
import logging, resource, signal, sys
from pathlib import Path
from tests.test_diskspool import disk_at, frame
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death past the limit
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
disk = disk_at(Path(sys.argv[1]), segment_bytes=1 << 20)
lost = [disk.append(seq, frame(seq)) for seq in range(7)]
print("lost", lost, "files", disk.file_bytes, "held", len(disk))
disk.close()
"""


def test_a_failing_write_loses_that_frame_only_and_leaves_no_torn_record(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMITED_WRITER, str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    # Each 200-byte file takes two 120-byte records (8 + 2 x 120 = 248 > 200: the second is
    # a short write): every other frame is lost, the files hold the rest, intact.
    assert "lost [0, 1, 0, 1, 0, 1, 0]" in done.stdout, done.stdout + done.stderr
    assert done.stderr.count("cannot write") == 1, done.stderr  # once a minute, not per frame
    assert done.stderr.count("writable again") == 1, done.stderr
    assert [seq for seq, _ in walk_frames(disk_at(tmp_path))] == [0, 2, 4, 6]


def test_a_record_changed_on_disk_is_skipped_as_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = disk_at(tmp_path)
    for seq in range(3):
        disk.append(seq, frame(seq))
    [path] = segments(tmp_path)
    with path.open("r+b") as file:
        file.seek(len(MAGIC) + RECORD.size + 96 + RECORD.size + 1)
        file.write(b"!")
    with caplog.at_level(logging.ERROR, logger="avd.sender"):
        assert disk.next_after(0) == (2, frame(2))
    assert disk.lost == 1
    assert "spooled frame 1 unreadable" in caplog.text


def test_a_backfill_read_is_one_pread_of_tens_of_microseconds(tmp_path: Path) -> None:
    """Not a timing assertion that can flake: a generous bound, the figure is printed."""
    disk = disk_at(tmp_path, segment_bytes=4 << 20, max_bytes=64 << 20)
    count = 400
    for seq in range(count):
        disk.append(seq, frame(seq, size=40_000))  # a 640x480 JPEG at quality 70
    started = time.perf_counter()
    assert len(walk_frames(disk)) == count
    per_read_us = (time.perf_counter() - started) / count * 1e6
    print(f"disk spool read of a 40 kB frame: {per_read_us:.1f} µs")
    assert per_read_us < 5_000


# ---- end to end: real daemons, the receiver away longer than the memory cap holds ---------


def _sender_sample(url: str, name: str, stream: str = "video") -> float:
    return metric(scrape(url), name, stream=stream)


@pytest.mark.slow
def test_an_outage_beyond_the_memory_cap_is_backfilled_from_disk(
    launch: Launcher, tmp_path: Path
) -> None:
    receiver = launch.receiver("receiver-1")
    spool_dir = tmp_path / "spool"
    sender = launch.sender(receiver, AVD_SPOOL_DIR=str(spool_dir), AVD_SPOOL_MAX_MB="1")
    url = sender_metrics_url(sender)
    wait_until(lambda: metric(receiver.metrics(), "avd_frames_received_total", stream="video") > 20)

    assert receiver.daemon.stop() == 0
    captured_before = _sender_sample(url, "avd_frames_captured_total")
    time.sleep(8)  # ~4 MB of video at ~24 kB a frame: three quarters of it must go to disk
    held = _sender_sample(url, "avd_spool_bytes")
    assert held > 2 * 1024 * 1024, held  # beyond the 1 MiB memory cap, so on disk
    assert list((spool_dir / "video").glob("*.spool"))

    back = launch.receiver_again(receiver, "receiver-2")
    captured_during = _sender_sample(url, "avd_frames_captured_total") - captured_before
    wait_until(lambda: _sender_sample(url, "avd_spool_frames") < 20, timeout=30)
    wait_until(lambda: not list((spool_dir / "video").glob("*.spool")), timeout=10)

    backfilled = _sender_sample(url, "avd_frames_backfilled_total")
    late = metric(back.metrics(), "avd_frames_late_total", stream="video")
    print(f"outage: {captured_during:.0f} video frames captured, {backfilled:.0f} backfilled")
    for stream in ("video", "audio"):
        assert _sender_sample(url, "avd_frames_lost_total", stream) == 0
    # Backfilled: the outage's frames, plus those sent but unacknowledged when the receiver
    # went, minus the few still fresh enough to go live at the reconnection.
    assert 0.9 * captured_during - 10 <= backfilled <= captured_during + 30
    assert late >= backfilled - 5  # each backfilled frame arrived marked late
    assert sender.stop() == 0


def test_a_folder_deleted_while_in_use_is_made_again_and_spooling_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A clean-up of the disk takes the spool folder: until this was handled, every frame
    beyond the memory cap was lost until the sender restarted."""
    root = tmp_path / "spool"
    directory = root / "video"
    disk = disk_at(directory, segment_bytes=len(MAGIC) + 4 * (RECORD.size + 96))
    for seq in range(10):
        disk.append(seq, frame(seq))
    assert disk.drop_through(1) == 2
    shutil.rmtree(root)
    with caplog.at_level(logging.WARNING, logger="avd.sender"):
        for seq in range(10, 20):
            assert disk.append(seq, frame(seq)) == 0, f"frame {seq} lost"
    made_again = [r.getMessage() for r in caplog.records if "deleted while in use" in r.message]
    assert made_again == [
        f"{directory} was deleted while in use (not by avd): made again; the 10 frames "
        "spooled in the deleted files are still sent, but a restart of the sender before "
        "then would lose them"
    ]
    assert walk_frames(disk) == [(seq, frame(seq)) for seq in range(2, 20)]
    assert stat.S_IMODE(directory.stat().st_mode) == stat.S_IMODE(root.stat().st_mode) == 0o700
    assert (directory / "boot_id").read_text().strip() == "boot-a"
    assert disk.drop_through(13) == 12
    disk.close()
    # What went into the files made since is read back after a restart, from the last ack on.
    again = disk_at(directory)
    assert [seq for seq, _ in walk_frames(again)] == list(range(14, 20))
    with pytest.raises(OSError, match="another process"):
        disk_at(directory)  # the lock was taken again too
    again.close()
    caplog.clear()
    shutil.rmtree(root)
    empty = disk_at(directory)  # nothing held when it goes: nothing to warn about
    shutil.rmtree(root)
    with caplog.at_level(logging.WARNING, logger="avd.sender"):
        assert empty.append(30, frame(30)) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"{directory} was deleted while in use (not by avd): made again"
    ]
