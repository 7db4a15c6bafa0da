"""Which packets of a Matroska file still being written are already in the file.

FFmpeg's Matroska muxer builds each cluster in memory and writes it whole when the next one
starts (on every video keyframe, and after ``cluster_time_limit`` ms), and its interleaving
queue holds the newest packet back too; PyAV offers no call to force either out. So "muxed"
is not "in the file": a kill -9 loses what is still buffered. ``ClusterScanner`` reads the
clusters that have reached the file since its last call (the kernel's page cache, which is
what survives a kill -9) and counts their blocks per track. Packets of one track reach the
file in the order they were muxed, so the first N muxed packets of a track are safe once N
of its blocks are seen.

Only the element headers of the file's top level are walked and only complete clusters are
read; a cluster of unknown size (a live, unseekable output) stops the scan, which then errs
on the safe side: nothing more is reported until the file is closed.
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


def _vint(buf: bytes | memoryview, pos: int, *, keep_marker: bool) -> tuple[int, int] | None:
    """(value, length) of the EBML variable-length integer at ``pos``; None if cut short."""
    if pos >= len(buf) or buf[pos] == 0:
        return None
    first = buf[pos]
    length = 9 - first.bit_length()
    if pos + length > len(buf):
        return None
    value = first if keep_marker else first & (0xFF >> length)
    for byte in buf[pos + 1 : pos + length]:
        value = value << 8 | byte
    return value, length


def _header(buf: bytes | memoryview, pos: int) -> tuple[int, int | None, int] | None:
    """(element ID, data size or None if unknown, header length) at ``pos``."""
    ident = _vint(buf, pos, keep_marker=True)
    if ident is None:
        return None
    size = _vint(buf, pos + ident[1], keep_marker=False)
    if size is None:
        return None
    unknown = size[0] == (1 << (7 * size[1])) - 1
    return ident[0], None if unknown else size[0], ident[1] + size[1]


def _children(buf: memoryview) -> list[tuple[int, memoryview]]:
    found: list[tuple[int, memoryview]] = []
    pos = 0
    while (head := _header(buf, pos)) is not None and head[1] is not None:
        start = pos + head[2]
        found.append((head[0], buf[start : start + head[1]]))
        pos = start + head[1]
    return found


def count_blocks(cluster: memoryview) -> Counter[int]:
    """Blocks per track number in one cluster's data (SimpleBlocks and BlockGroups)."""
    tracks: Counter[int] = Counter()
    for ident, element in _children(cluster):
        if ident == _BLOCK_GROUP:
            block = next((d for i, d in _children(element) if i == _BLOCK), memoryview(b""))
        elif ident == _SIMPLE_BLOCK:
            block = element
        else:
            continue
        track = _vint(block, 0, keep_marker=False)
        if track is not None:
            tracks[track[0]] += 1
    return tracks


class ClusterScanner:
    """Counts, call after call, the blocks of each track newly complete in one file.

    The file is opened at the first scan that finds it and kept open until ``close``, so
    the scanner follows it through a rename.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: BinaryIO | None = None
        self._offset = 0  # the next top-level element to read
        self._in_segment = False
        self._stuck = False  # an unknown-size cluster: nothing more can be trusted
        self._size_seen = -1

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
        size = os.fstat(self._file.fileno()).st_size
        if size == self._size_seen:
            return found
        self._size_seen = size
        while self._offset + 2 <= size:
            step = self._step(self._file, size)
            if step is None:
                break
            found += step
        return found

    def _step(self, file: BinaryIO, size: int) -> Counter[int] | None:
        """Read the top-level element at the offset and move past it; None to stop here."""
        file.seek(self._offset)
        head = _header(file.read(_MAX_HEADER), 0)
        if head is None:
            return None
        ident, length, header_len = head
        if not self._in_segment and ident == _SEGMENT:  # descend: clusters are its children
            self._in_segment = True
            self._offset += header_len
            return Counter()
        if length is None or not (self._in_segment or ident == _EBML_HEADER):
            self._stuck = True  # a live (unseekable) layout, or not Matroska at all
            return None
        end = self._offset + header_len + length
        if end > size:
            return None  # not complete yet
        blocks: Counter[int] = Counter()
        if ident == _CLUSTER:
            file.seek(self._offset + header_len)
            blocks = count_blocks(memoryview(file.read(length)))
        self._offset = end
        return blocks
