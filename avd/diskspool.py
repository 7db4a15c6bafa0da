"""The spool's disk tier: frames the memory tier cannot hold, kept across a sender restart.

With ``AVD_SPOOL_DIR`` set, each stream's spool (``avd.spool``) moves its oldest frames here
once its memory cap is reached, instead of losing them. One folder per stream, mode 0700::

    lock          flock'd while a sender uses the folder: two senders would corrupt it
    boot_id       the kernel's boot id when the folder was last opened
    acked         the highest seq the receiver acknowledged (u64, crc32)
    <seq>.spool   segments, named by their first seq (20 digits), mode 0600, append-only

A segment is an 8-byte magic, then records: seq u64, capture µs u64, length u32, crc32 u32
(of the 20 bytes before it and of the payload), payload. A segment is deleted whole once
every record in it is acknowledged or evicted; a new one starts past ``segment_bytes`` or
``segment_us`` of capture time, so acks and the age window free the disk a file at a time.
The cap counts whole files: to make room for a new frame the oldest segment goes, its
frames counted lost (the spool always keeps the newest). An in-memory index (four arrays,
40 bytes a record) maps seq to segment, offset and length: a backfill read is one pread.

No fsync per frame (each can take tens of ms on an SD card): a segment is fsync'd once,
when closed (full or old), by the capture thread outside the spool's lock. A crashed sender
loses nothing the kernel holds; a power cut may tear the newest segment's tail, which the
crc finds.

On start the segments are read back, every record checked (crc, length, seq increasing);
reading a file stops at its first bad record and the file is cut there. Records at or below
``acked`` are skipped. Capture times are the sender's monotonic clock, which restarts with
the host: the receiver maps them to its own clock with the offset it estimates for the
current boot, so frames spooled before a reboot would be recorded at wrong times. Those are
dropped (the boot id differs, or a capture time lies in the future), as are frames older
than the age window, each case with one log line.

Not thread-safe: ``Spool`` calls it under its lock.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from avd.logthrottle import LogThrottle, suppressed_note
from avd.media.base import CapturedFrame

log = logging.getLogger("avd.sender")

MAGIC = b"AVDSPL\x00\x01"
RECORD = struct.Struct(">QQII")  # seq, capture µs, length, crc32
SEALED = struct.Struct(">QQI")  # the header fields the crc covers
ACKED = struct.Struct(">QI")  # seq, crc32
SUFFIX = ".spool"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
MIB = 1024 * 1024


def current_boot_id() -> str | None:
    """The kernel's id of this boot (Linux); None where there is none."""
    try:
        return BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None


def segment_size(max_bytes: int) -> int:
    """About 64 files under the cap at most: each holds a descriptor open for reads."""
    return max(max_bytes // 64, 256 * 1024)


def record_crc(seq: int, capture_us: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(SEALED.pack(seq, capture_us, len(payload))))


def sync_and_close(fds: list[int]) -> None:
    """fsync then close descriptors of full segments (duplicates: the index keeps its own)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.fsync(fd)
        os.close(fd)


class CorruptRecord(ValueError):
    """A record read back does not match what was written."""


@dataclass(eq=False, slots=True)
class _Segment:
    path: Path
    fd: int  # O_RDWR | O_APPEND: appended to while current, pread for backfill
    size: int
    first_capture_us: int
    live: int = 0  # records neither acknowledged nor evicted


class _Index:
    """Where every live record is, oldest first; parallel arrays keep a record at 40 bytes."""

    def __init__(self) -> None:
        self.seq, self.capture = array("q"), array("q")
        self.offset, self.length = array("q"), array("q")
        self.segment: list[_Segment] = []
        self.head = 0  # entries before it are gone

    def __len__(self) -> int:
        return len(self.seq) - self.head

    def add(self, seq: int, capture_us: int, offset: int, length: int, seg: _Segment) -> None:
        self.seq.append(seq)
        self.capture.append(capture_us)
        self.offset.append(offset)
        self.length.append(length)
        self.segment.append(seg)

    def first_after(self, seq: int) -> int | None:
        i = bisect.bisect_right(self.seq, seq, lo=self.head)
        return i if i < len(self.seq) else None

    def remove(self, i: int) -> tuple[_Segment, int]:
        seg, length = self.segment[i], self.length[i]
        if i != self.head:  # an unreadable record: rare, so O(n) is fine
            for column in (self.seq, self.capture, self.offset, self.length, self.segment):
                del column[i]
            return seg, length
        self.head += 1
        if self.head > 1024 and self.head * 2 > len(self.seq):  # amortised compaction
            for column in (self.seq, self.capture, self.offset, self.length, self.segment):
                del column[: self.head]
            self.head = 0
        return seg, length


class DiskSpool:
    def __init__(
        self, directory: Path, *, max_bytes: int, segment_bytes: int, segment_us: int
    ) -> None:
        self.directory = directory
        self.max_bytes, self.segment_bytes, self.segment_us = max_bytes, segment_bytes, segment_us
        self.lost = 0  # evicted for room or age, unwritable or unreadable
        self.bytes = 0  # payload bytes of live records
        self.file_bytes = 0  # what the segments take on disk, counted against max_bytes
        self.newest_seq = -1  # highest seq ever written or acknowledged here
        self._index = _Index()
        self._segments: list[_Segment] = []  # oldest first; the last may be _writing
        self._writing: _Segment | None = None
        self._to_sync: list[int] = []
        self._write_failing = False
        self._log_throttle = LogThrottle(60.0)  # a failing or flapping disk: a line a minute
        self._acked_fd = -1
        self._acked_seq = -1  # the newest acknowledgement, for an ``acked`` file made again
        self._boot_id: str | None = None
        self._lock_fd = _lock_folder(directory)

    def __len__(self) -> int:
        return len(self._index)

    # ---- the Spool's interface ------------------------------------------------------------

    def oldest(self) -> tuple[int, int] | None:
        """(seq, capture µs) of the oldest record."""
        idx = self._index
        return (idx.seq[idx.head], idx.capture[idx.head]) if len(idx) else None

    def append(self, seq: int, frame: CapturedFrame) -> int:
        """Write one frame (newer than all here); returns how many frames this lost."""
        lost_before = self.lost
        size = RECORD.size + len(frame.data)
        if size + len(MAGIC) > self.max_bytes:
            self.lost += 1
            return 1
        seg = self._writing
        if seg and (
            seg.size + size > self.segment_bytes
            or frame.capture_us - seg.first_capture_us >= self.segment_us
        ):
            self._seal()
        while self._segments and (
            self.file_bytes + size + (0 if self._writing else len(MAGIC)) > self.max_bytes
        ):
            self._evict_oldest_segment()
        try:
            self._write(seq, frame)
        except OSError as exc:
            self._write_failed(exc)
            self.lost += 1
        return self.lost - lost_before

    def next_after(self, seq: int) -> tuple[int, CapturedFrame] | None:
        """The oldest record above ``seq``; one that cannot be read back is dropped, lost."""
        while (i := self._index.first_after(seq)) is not None:
            try:
                frame = self._read(i)
            except (OSError, CorruptRecord) as exc:
                if (quiet := self._throttled("read")) is not None:
                    log.error(
                        "%s: spooled frame %d unreadable (%s): lost%s",
                        self.directory, self._index.seq[i], exc, suppressed_note(quiet),
                    )  # fmt: skip
                self._forget(i)
                self.lost += 1
                continue
            return self._index.seq[i], frame
        return None

    def drop_through(self, seq: int) -> int:
        """Acknowledged: forget every record up to ``seq``; returns how many."""
        count = self._drop_while(lambda i: self._index.seq[i] <= seq)
        if count:
            self._acked_seq = max(self._acked_seq, seq)
            self._store_acked()
        return count

    def _store_acked(self) -> None:
        seq = self._acked_seq
        if self._acked_fd >= 0 and seq >= 0:
            with contextlib.suppress(OSError):
                os.pwrite(self._acked_fd, ACKED.pack(seq, zlib.crc32(ACKED.pack(seq, 0))), 0)

    def evict_older_than(self, limit_us: int) -> int:
        """Beyond the age window: lost."""
        count = self._drop_while(lambda i: self._index.capture[i] < limit_us)
        self.lost += count
        return count

    def take_unsynced(self) -> list[int]:
        """Descriptors of sealed segments for ``sync_and_close``, outside the lock."""
        fds, self._to_sync = self._to_sync, []
        return fds

    def close(self) -> None:
        """Seal and fsync the current segment, release the folder. Records stay on disk."""
        if self._writing is not None:
            self._seal()
        sync_and_close(self.take_unsynced())
        for fd in [seg.fd for seg in self._segments] + [self._acked_fd, self._lock_fd]:
            if fd >= 0:
                os.close(fd)
        self._segments, self._acked_fd, self._lock_fd = [], -1, -1

    # ---- writing --------------------------------------------------------------------------

    def _write(self, seq: int, frame: CapturedFrame) -> None:
        seg = self._writing or self._create(seq, frame.capture_us)
        data = frame.data
        head = RECORD.pack(
            seq, frame.capture_us, len(data), record_crc(seq, frame.capture_us, data)
        )
        if os.writev(seg.fd, [head, data]) != len(head) + len(data):
            raise OSError(errno.ENOSPC, "short write")
        self._add_record(seg, seq, frame.capture_us, seg.size, len(data))
        seg.size += len(head) + len(data)
        self.file_bytes += len(head) + len(data)
        self.newest_seq = max(self.newest_seq, seq)
        if self._write_failing and self._throttled("resumed") is not None:
            log.info("%s: writable again; spooling to disk resumed", self.directory)
        self._write_failing = False

    def _create(self, seq: int, capture_us: int) -> _Segment:
        path = self.directory / f"{seq:020d}{SUFFIX}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            if self.directory.is_dir():
                raise
            self._make_folder_again()
            fd = os.open(path, flags, 0o600)
        seg = _Segment(path, fd, 0, capture_us)
        self._segments.append(seg)
        self._writing = seg  # from here a failure is cleaned up by _write_failed
        if os.write(seg.fd, MAGIC) != len(MAGIC):
            raise OSError(errno.ENOSPC, "short write")
        seg.size = len(MAGIC)
        self.file_bytes += len(MAGIC)
        return seg

    def _make_folder_again(self) -> None:
        """The folder was deleted while in use (a clean-up of the disk, not avd's doing).
        The frames spooled there are still read through their open files, but new segments,
        the lock, the acknowledged seq and the boot id need a folder: without one, every
        frame beyond the memory cap was lost until the sender restarted."""
        self.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        lock_fd = _lock_folder(self.directory)
        os.close(self._lock_fd)
        self._lock_fd = lock_fd
        acked_fd = os.open(self.directory / "acked", os.O_RDWR | os.O_CREAT, 0o600)
        if self._acked_fd >= 0:
            os.close(self._acked_fd)
        self._acked_fd = acked_fd
        self._store_acked()
        _write_boot_id(self.directory, self._boot_id)
        held = (
            f"; the {len(self)} frames spooled in the deleted files are still sent, but a "
            "restart of the sender before then would lose them"
            if len(self)
            else ""
        )
        log.warning("%s was deleted while in use (not by avd): made again%s", self.directory, held)

    def _write_failed(self, exc: OSError) -> None:
        seg, self._writing = self._writing, None
        if seg is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(seg.fd, seg.size)  # no partial record before the next one
            if seg.live == 0:
                self._delete(seg)
        if (quiet := self._throttled("write")) is not None:
            log.error(
                "%s: cannot write (%s): frames beyond the memory cap are lost until it can%s",
                self.directory, exc.strerror or exc, suppressed_note(quiet),
            )  # fmt: skip
        self._write_failing = True

    def _throttled(self, kind: str) -> int | None:
        return self._log_throttle.admit(kind, "", time.monotonic())

    def _seal(self) -> None:
        seg, self._writing = self._writing, None
        if seg is not None:
            with contextlib.suppress(OSError):
                self._to_sync.append(os.dup(seg.fd))

    # ---- forgetting -----------------------------------------------------------------------

    def _add_record(self, seg: _Segment, seq: int, capture_us: int, offset: int, n: int) -> None:
        self._index.add(seq, capture_us, offset, n, seg)
        seg.live += 1
        self.bytes += n

    def _drop_while(self, doomed: Callable[[int], bool]) -> int:
        count = 0
        while len(self._index) and doomed(self._index.head):
            self._forget(self._index.head)
            count += 1
        return count

    def _forget(self, i: int) -> None:
        seg, length = self._index.remove(i)
        self.bytes -= length
        seg.live -= 1
        if seg.live == 0:
            self._delete(seg)

    def _evict_oldest_segment(self) -> None:
        seg = self._segments[0]
        self.lost += self._drop_while(lambda i: self._index.segment[i] is seg)
        if self._segments and self._segments[0] is seg:  # held no live record
            self._delete(seg)

    def _delete(self, seg: _Segment) -> None:
        self._segments.remove(seg)
        if seg is self._writing:
            self._writing = None
        self.file_bytes -= seg.size
        os.close(seg.fd)
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: cannot delete (%s)", seg.path, exc.strerror or exc)

    # ---- reading back what an earlier run left --------------------------------------------

    def recover(self, *, boot_id: str | None, now_us: int, max_age_us: int) -> None:
        """Index the segments found; drop frames that would be recorded at wrong times."""
        acked = _read_acked(self.directory / "acked")
        self._acked_seq, self._boot_id = acked, boot_id
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            self._load(path, acked)
        self.newest_seq = max(self.newest_seq, acked)  # the sender numbers on from here
        self._acked_fd = os.open(self.directory / "acked", os.O_RDWR | os.O_CREAT, 0o600)
        if len(self) and self._from_another_boot(boot_id, now_us):
            dropped = self._drop_while(lambda i: True)
            log.warning(
                "%s: %d frames spooled before this host rebooted are dropped: their capture "
                "times are on the previous boot's clock and would be recorded at wrong times",
                self.directory,
                dropped,
            )
        aged = self._drop_while(lambda i: self._index.capture[i] < now_us - max_age_us)
        if aged:
            log.info(
                "%s: %d spooled frames older than the spool window dropped", self.directory, aged
            )
        _write_boot_id(self.directory, boot_id)
        if len(self):
            log.info(
                "%s: %d spooled frames (%.1f MiB, seq %d-%d) read back; sent once the "
                "receiver is reachable",
                self.directory,
                len(self),
                self.bytes / MIB,
                self._index.seq[self._index.head],
                self._index.seq[-1],
            )

    def _load(self, path: Path, acked: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        with open(path, "rb") as file:  # buffered: the scan reads sequentially
            magic = file.read(len(MAGIC))
            if magic != MAGIC:
                os.close(fd)
                if MAGIC.startswith(magic):  # cut short as it was created
                    path.unlink()
                else:
                    log.warning("%s: not a spool segment; left alone", path)
                return
            seg = _Segment(path, fd, len(MAGIC), 0)
            self._segments.append(seg)
            problem = self._scan(file, seg, acked, os.fstat(fd).st_size)
        if problem:
            log.warning("%s: %s at byte %d; the file is cut there", path, problem, seg.size)
            os.ftruncate(fd, seg.size)
        self.file_bytes += seg.size
        if seg.live == 0:
            self._delete(seg)

    def _scan(self, file: BinaryIO, seg: _Segment, acked: int, file_size: int) -> str | None:
        """Index ``file``'s records; what is wrong with the first bad one, if any."""
        while head := file.read(RECORD.size):
            if len(head) < RECORD.size:
                return "torn record header"
            seq, capture_us, length, crc = RECORD.unpack(head)
            if seg.size + RECORD.size + length > file_size:  # never read a corrupt length
                return "torn record"
            payload = file.read(length)
            if crc != record_crc(seq, capture_us, payload):
                return "crc mismatch"
            if seq <= self.newest_seq:
                return "seq out of order"
            self.newest_seq = seq
            if seq > acked:
                self._add_record(seg, seq, capture_us, seg.size, length)
            seg.size += RECORD.size + length
        return None

    def _from_another_boot(self, boot_id: str | None, now_us: int) -> bool:
        try:
            stored: str | None = (self.directory / "boot_id").read_text().strip()
        except FileNotFoundError:
            stored = None  # written before any segment: records without it are of unknown boot
        if boot_id is not None and stored != boot_id:
            return True
        return self._index.capture[-1] > now_us  # no boot id here: a future time tells

    # ---- reading --------------------------------------------------------------------------

    def _read(self, i: int) -> CapturedFrame:
        idx = self._index
        seq, capture_us, length = idx.seq[i], idx.capture[i], idx.length[i]
        raw = os.pread(idx.segment[i].fd, RECORD.size + length, idx.offset[i])
        if len(raw) != RECORD.size + length:
            raise CorruptRecord(f"{idx.segment[i].path} is shorter than its index says")
        payload = raw[RECORD.size :]
        if RECORD.unpack_from(raw) != (
            seq,
            capture_us,
            length,
            record_crc(seq, capture_us, payload),
        ):
            raise CorruptRecord(f"{idx.segment[i].path}: record changed on disk")
        return CapturedFrame(capture_us, payload)


def _lock_folder(directory: Path) -> int:
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(errno.EBUSY, "another process uses this spool folder") from None
    return fd


def _read_acked(path: Path) -> int:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return -1
    if len(raw) != ACKED.size:
        return -1
    seq, crc = ACKED.unpack(raw)
    return seq if crc == zlib.crc32(ACKED.pack(seq, 0)) else -1


def _write_boot_id(directory: Path, boot_id: str | None) -> None:
    path = directory / "boot_id"
    if boot_id is None:
        path.unlink(missing_ok=True)
        return
    temporary = directory / "boot_id.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{boot_id}\n".encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)


def open_disk_spool(
    root: Path, stream: str, *, max_bytes: int, max_age_us: int, now_us: int, boot_id: str | None
) -> DiskSpool | None:
    """``stream``'s disk tier under ``root``, read back; None (logged) if it cannot be used."""
    directory = root / stream
    spool = None
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        if directory.stat().st_mode & 0o077:
            directory.chmod(0o700)  # spooled media is as private as the recordings
        segment_us = max(max_age_us // 8, 1_000_000)
        spool = DiskSpool(
            directory,
            max_bytes=max_bytes,
            segment_bytes=segment_size(max_bytes),
            segment_us=segment_us,
        )
        spool.recover(boot_id=boot_id, now_us=now_us, max_age_us=max_age_us)
    except OSError as exc:
        if spool is not None:
            with contextlib.suppress(OSError):
                spool.close()
        log.error(
            "AVD_SPOOL_DIR: cannot spool the %s stream in %s (%s); spooling it in memory only",
            stream,
            directory,
            exc.strerror or exc,
        )
        return None
    return spool
