"""avd.media.mkvblocks on hand-built Matroska: its EBML integers and the blocks it counts."""

from __future__ import annotations

import errno
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avd.media import mkvblocks
from avd.media.mkvblocks import ClusterScanner


def vint(value: int, length: int | None = None) -> bytes:
    """The EBML variable-length integer of ``value``, in its shortest form by default."""
    if length is None:
        length = next(n for n in range(1, 9) if value < (1 << (7 * n)) - 1)
    return ((1 << (7 * length)) | value).to_bytes(length, "big")


def element(ident: int, payload: bytes) -> bytes:
    return ident.to_bytes((ident.bit_length() + 7) // 8, "big") + vint(len(payload)) + payload


def block(track: int, size: int) -> bytes:
    return vint(track) + b"\x00\x00\x80" + b"\xab" * size  # track, timecode, flags, data


@given(st.integers(0, 2**56 - 2), st.integers(1, 8))
def test_vint_reads_what_ebml_writes(value: int, extra: int) -> None:
    shortest = vint(value)
    length = min(8, len(shortest) + extra - 1)  # also longer forms than needed: legal EBML
    encoded = vint(value, length)
    assert mkvblocks._vint(b"\x00" + encoded, 1, keep_marker=False) == (value, length)
    marked = int.from_bytes(encoded, "big")
    assert mkvblocks._vint(encoded, 0, keep_marker=True) == (marked, length)
    assert mkvblocks._vint(encoded[:-1], 0, keep_marker=False) is None or length == 1


def test_blocks_are_counted_per_track_from_simple_blocks_and_block_groups(
    tmp_path: Path,
) -> None:
    header = element(0x1A45DFA3, element(0x4282, b"matroska"))
    clusters = [
        element(0xE7, b"\x00") + element(0xA3, block(1, 30_000)) + element(0xA3, block(2, 40)),
        # BlockGroups: the Block first (as FFmpeg writes it) or after the duration, and
        # BlockAdditions behind it, whose bytes must not be taken for blocks.
        element(0xE7, b"\x05")
        + element(0xA0, element(0xA1, block(1, 20_000)) + element(0x75A1, b"\xa3" * 30))
        + element(0xA0, element(0x9B, b"\x17") + element(0xA1, block(2, 10))),
        element(0xE7, b"\x09") + element(0xA3, block(200, 5)),  # a two-byte track number
    ]
    body = b"".join(element(0x1F43B675, c) for c in clusters)
    segment = b"\x18\x53\x80\x67" + vint(len(body), 8) + body
    path = tmp_path / "hand.mkv"
    path.write_bytes(header + segment)
    assert dict(ClusterScanner(path).scan()) == {1: 2, 2: 2, 200: 1}

    # Cut inside the last cluster: only the complete ones count, and the rest comes later.
    whole = header + segment
    path.write_bytes(whole[:-3])
    scanner = ClusterScanner(path)
    assert dict(scanner.scan()) == {1: 2, 2: 2}
    path.write_bytes(whole)
    assert dict(scanner.scan()) == {200: 1}


def mjpeg_like_file(path: Path, frames: int) -> None:
    """A cluster per frame, each a timestamp and a BlockGroup: as FFmpeg writes MJPEG."""
    header = element(0x1A45DFA3, element(0x4282, b"matroska"))
    frame = element(0xA0, element(0xA1, block(1, 25_000)) + element(0x9B, b"\x32"))
    body = b"".join(element(0x1F43B675, element(0xE7, bytes([n])) + frame) for n in range(frames))
    path.write_bytes(header + b"\x18\x53\x80\x67" + vint(len(body), 8) + body)


def test_a_frames_cluster_takes_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Five small reads a frame, one per element header, were five system calls a frame in
    # the recording process; the headers lie within a few dozen bytes of one another.
    path = tmp_path / "mjpeg.mkv"
    mjpeg_like_file(path, 40)
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        reads.append(offset)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    assert dict(ClusterScanner(path).scan()) == {1: 40}
    assert len(reads) <= 40 + 2  # a read per cluster, and the file's own headers


def test_a_file_that_cannot_be_opened_for_now_is_scanned_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of descriptors in the recording process: the scan that finds none must not raise
    # (it ran inside a segment's close, and the close with it), and the next one counts all.
    path = tmp_path / "mjpeg.mkv"
    mjpeg_like_file(path, 3)
    scanner = ClusterScanner(path)
    real_open = Path.open

    def out_of_descriptors(self: Path, *args: object, **kwargs: object) -> object:
        raise OSError(errno.EMFILE, "Too many open files", str(self))

    monkeypatch.setattr(Path, "open", out_of_descriptors)
    assert scanner.scan() == Counter()
    monkeypatch.setattr(Path, "open", real_open)
    assert dict(scanner.scan()) == {1: 3}


@st.composite
def clusters(draw: st.DrawFn) -> list[list[tuple[bool, int, int]]]:
    """Clusters of blocks: (in a BlockGroup, track, payload size), small and large."""
    one = st.tuples(st.booleans(), st.integers(1, 300), st.sampled_from([0, 3, 700, 2048, 9000]))
    return draw(st.lists(st.lists(one, min_size=1, max_size=6), min_size=1, max_size=8))


@given(clusters(), st.floats(0, 1))
def test_counts_match_the_file_cut_anywhere(
    layout: list[list[tuple[bool, int, int]]], cut_at: float
) -> None:
    """Scanning a file cut anywhere, then whole, counts every block once, and the cut file's
    scan only the blocks of its complete clusters."""
    bodies: list[bytes] = []
    ends: list[int] = []
    header = element(0x1A45DFA3, element(0x4282, b"matroska"))
    for n, blocks in enumerate(layout):
        body = element(0xE7, bytes([n % 256]))
        for grouped, track, size in blocks:
            simple = element(0xA1 if grouped else 0xA3, block(track, size))
            body += element(0xA0, simple + element(0x9B, b"\x01")) if grouped else simple
        bodies.append(element(0x1F43B675, body))
    segment_body = b"".join(bodies)
    whole = header + b"\x18\x53\x80\x67" + vint(len(segment_body), 8) + segment_body
    offset = len(whole) - len(segment_body)
    for cluster in bodies:
        offset += len(cluster)
        ends.append(offset)
    cut = int(len(whole) * cut_at)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cut.mkv"
        path.write_bytes(whole[:cut])
        scanner = ClusterScanner(path)
        first = scanner.scan()
        path.write_bytes(whole)
        second = scanner.scan()
    complete = sum(1 for end in ends if end <= cut)
    expected_first: Counter[int] = Counter(t for c in layout[:complete] for _, t, _ in c)
    assert first == expected_first
    assert first + second == Counter(t for c in layout for _, t, _ in c)
