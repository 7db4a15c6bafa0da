"""Which packets of a Matroska file still being written are already in the file.

FFmpeg's Matroska muxer builds each cluster in memory and writes it whole when the next one
starts (on every video keyframe, and after ``cluster_time_limit`` ms), and its interleaving
queue holds the newest packet back too; PyAV offers no call to force either out. So "muxed"
is not "in the file": a kill -9 loses what is still buffered. ``ClusterScanner`` reads the
clusters that have reached the file since its last call (the kernel's page cache, which is
what survives a kill -9) and counts their blocks per track. Packets of one track reach the
file in the order they were muxed, so the first N muxed packets of a track are safe once N
of its blocks are seen.

Only element headers are read: those of the file's top level, and in each complete cluster
those of its blocks with their track numbers (a few dozen bytes per block, not the media:
reading whole clusters back cost the recorder a copy of every frame). A cluster of unknown
size (a live, unseekable output) stops the scan, which then errs on the safe side: nothing
more is reported until the file is closed.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import BinaryIO

_EBML_HEADER = 0x1A45DFA3
_SEGMENT = 0x18538067
_CLUSTER = 0x1F43B675
_SIMPLE_BLOCK = 0xA3
_BLOCK_GROUP = 0xA0
_BLOCK = 0xA1
_MAX_HEADER = 12  # a 4-byte ID and an 8-byte size
_MAX_TRACK = 8  # a block's track number, the first field of its data
# What one read takes in: a cluster's own headers (its timestamp, a BlockGroup, its Block
# and track number) lie within a few dozen bytes, so one read serves them all, where a read
# per header cost five system calls a frame (FFmpeg writes a cluster per MJPEG frame).
_READ_AHEAD = 512


def _vint(buf: bytes, pos: int, *, keep_marker: bool) -> tuple[int, int] | None:
    """(value, length) of the EBML variable-length integer at ``pos``; None if cut short."""
    if pos >= len(buf):
        return None
    first = buf[pos]
    if first & 0x80:  # one byte, by far the commonest: IDs of blocks, sizes under 127
        return (first if keep_marker else first & 0x7F), 1
    if first == 0:
        return None
    length = 9 - first.bit_length()
    if pos + length > len(buf):
        return None
    value = int.from_bytes(buf[pos : pos + length], "big")
    # The length marker is the highest 1 bit: bit 7 * length, counting from the lowest.
    return (value if keep_marker else value & ((1 << (7 * length)) - 1)), length


def _header(buf: bytes, pos: int) -> tuple[int, int | None, int] | None:
    """(element ID, data size or None if unknown, header length) at ``pos``."""
    ident = _vint(buf, pos, keep_marker=True)
    if ident is None:
        return None
    size = _vint(buf, pos + ident[1], keep_marker=False)
    if size is None:
        return None
    unknown = size[0] == (1 << (7 * size[1])) - 1
    return ident[0], None if unknown else size[0], ident[1] + size[1]


class _Reader:
    """Reads a file at given offsets through a window of ``_READ_AHEAD`` bytes.

    Made afresh for each scan: bytes read past the file's end (still being written) are
    never served from an earlier scan.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._start = 0
        self._window = b""

    def read(self, pos: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``pos``; fewer at the end of the file."""
        offset = pos - self._start
        if offset < 0 or offset + size > len(self._window):
            self._window = os.pread(self._fd, max(size, _READ_AHEAD), pos)
            self._start, offset = pos, 0
        return self._window[offset : offset + size]


def _count_blocks(reader: _Reader, start: int, end: int, tracks: Counter[int]) -> None:
    """Count into ``tracks`` the blocks per track number among the elements of the file
    between ``start`` and ``end`` (a cluster's data, or a BlockGroup's): SimpleBlocks, and
    the Block of each BlockGroup. Only the element headers and the track numbers are read, a
    few dozen bytes per block, not the media."""
    pos = start
    while pos < end:
        buf = reader.read(pos, _MAX_HEADER + _MAX_TRACK)
        if (head := _header(buf, 0)) is None:
            return
        ident, size, header_len = head
        if size is None:
            return
        if ident in (_SIMPLE_BLOCK, _BLOCK):  # a Block is met inside its BlockGroup
            track = _vint(buf, header_len, keep_marker=False)
            if track is not None:
                tracks[track[0]] += 1
            if ident == _BLOCK:
                return  # a BlockGroup holds one Block; the rest of it is not needed
        elif ident == _BLOCK_GROUP:
            _count_blocks(reader, pos + header_len, pos + header_len + size, tracks)
        pos += header_len + size


class ClusterScanner:
    """Counts, call after call, the blocks of each track newly complete in one file.

    The file is opened at the first scan that finds it and kept open until ``close``, so
    the scanner follows it through a rename, and sees when it has been deleted: then
    ``unlinked`` is set and no more blocks are counted, as none of them will be kept.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: BinaryIO | None = None
        self._offset = 0  # the next top-level element to read
        self._in_segment = False
        self._stuck = False  # an unknown-size cluster: nothing more can be trusted
        self._size_seen = -1
        self.unlinked = False

    def close(self) -> None:
        """Stop scanning: later scans find nothing."""
        self._stuck = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def scan(self) -> Counter[int]:
        """Blocks per track number in the clusters completed since the previous call."""
        found: Counter[int] = Counter()
        if self._stuck:
            return found
        if self._file is None:
            try:
                self._file = self._path.open("rb")
            except FileNotFoundError:
                return found  # nothing muxed yet: FFmpeg creates the file at the first packet
            except OSError:
                # Out of descriptors for now (EMFILE), say: tried again at the next scan. What
                # the file holds meanwhile is only reported later, never lost.
                return found
        status = os.fstat(self._file.fileno())
        if status.st_nlink == 0:
            self.unlinked = True
            return found
        size = status.st_size
        if size == self._size_seen:
            return found
        self._size_seen = size
        reader = _Reader(self._file.fileno())
        while self._offset + 2 <= size and self._step(reader, size, found):
            pass
        return found

    def _step(self, reader: _Reader, size: int, found: Counter[int]) -> bool:
        """Read the top-level element at the offset, count its blocks into ``found`` if it is
        a cluster, and move past it; False to stop here."""
        head = _header(reader.read(self._offset, _MAX_HEADER), 0)
        if head is None:
            return False
        ident, length, header_len = head
        if not self._in_segment and ident == _SEGMENT:  # descend: clusters are its children
            self._in_segment = True
            self._offset += header_len
            return True
        if length is None or not (self._in_segment or ident == _EBML_HEADER):
            self._stuck = True  # a live (unseekable) layout, or not Matroska at all
            return False
        end = self._offset + header_len + length
        if end > size:
            return False  # not complete yet
        if ident == _CLUSTER:
            _count_blocks(reader, self._offset + header_len, end, found)
        self._offset = end
        return True
