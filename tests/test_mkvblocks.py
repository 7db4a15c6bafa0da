"""avd.media.mkvblocks on hand-built Matroska: its EBML integers and the blocks it counts."""

from __future__ import annotations

from pathlib import Path

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
