"""A cheap JPEG validity check for every video frame the receiver accepts (no decoding).

The receiver records frames by stream copy and never decodes them, so this is the only
look it takes at a payload: the frame must start with SOI, end with EOI, and its marker
segments must be well formed up to the first SOFn, whose height and width must match the
size announced in the stream's hello. Only the few header segments before SOF are walked
(a few µs), never the entropy-coded data.

Whatever the bytes, the only exception raised is ``BadFrame`` with a short reason: the
payload comes from the network, and a parser that can be made to raise ``IndexError`` is a
parser that can be made to kill a session in a way nobody planned for.
"""

from __future__ import annotations

from avd.errors import BadFrame

SOI = 0xD8
EOI = 0xD9
SOS = 0xDA
# Start-of-frame markers: C0-C3, C5-C7, C9-CB, CD-CF. C4 (DHT), C8 (reserved JPG) and
# CC (DAC) share the range but are not frame headers (ITU T.81, table B.1).
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field: TEM and RST0-RST7 (T.81, B.1.1.3).
STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# An SOF segment holds its length (2), precision (1), height (2), width (2) and count (1).
SOF_MIN_LENGTH = 8


def _byte_view(data: bytes | memoryview) -> memoryview:
    """A flat view of single bytes, whatever buffer the caller handed in."""
    try:
        view = memoryview(data)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as exc:
        raise BadFrame("not a contiguous byte buffer") from exc


def _u16(view: memoryview, pos: int) -> int:
    return (view[pos] << 8) | view[pos + 1]


def jpeg_dimensions(data: bytes | memoryview) -> tuple[int, int]:
    """``(width, height)`` of a JPEG, read from its first SOFn; ``BadFrame`` if malformed."""
    view = _byte_view(data)
    end = len(view)
    if end < 4:
        raise BadFrame(f"too short for a JPEG ({end} bytes)")
    if view[0] != 0xFF or view[1] != SOI:
        raise BadFrame("no SOI marker")
    if view[end - 2] != 0xFF or view[end - 1] != EOI:
        raise BadFrame("no EOI marker at the end")
    pos = 2
    while pos < end - 1:
        if view[pos] != 0xFF:
            raise BadFrame(f"no marker at offset {pos}")
        marker = view[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker (T.81, B.1.1.2)
            pos += 1
            continue
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        _refuse_before_sof(marker)
        length = _segment_length(view, pos, end)
        if marker in SOF_MARKERS:
            return _sof_dimensions(view, pos, length)
        pos += 2 + length
    raise BadFrame("no SOF marker")


def _refuse_before_sof(marker: int) -> None:
    """Markers that may not appear before the frame header."""
    if marker == SOS:
        raise BadFrame("no SOF before SOS")
    if marker == EOI:
        raise BadFrame("no SOF before EOI")
    if marker == SOI:
        raise BadFrame("second SOI marker")
    if marker == 0x00:
        raise BadFrame("stuffed byte outside entropy-coded data")


def _segment_length(view: memoryview, pos: int, end: int) -> int:
    """The length field of the segment whose marker is at ``pos``, checked against ``end``."""
    if pos + 4 > end:  # cannot happen while the frame ends in FFD9; kept for the walk's own sake
        raise BadFrame("truncated segment")
    length = _u16(view, pos + 2)
    if length < 2:
        raise BadFrame(f"segment length {length} at offset {pos} is below 2")
    if pos + 2 + length > end:
        raise BadFrame("truncated segment")
    return length


def _sof_dimensions(view: memoryview, pos: int, length: int) -> tuple[int, int]:
    if length < SOF_MIN_LENGTH:
        raise BadFrame(f"SOF segment too short ({length} bytes)")
    height = _u16(view, pos + 5)
    width = _u16(view, pos + 7)
    if width == 0:
        raise BadFrame("zero width in SOF")
    if height == 0:  # legal in T.81 with a later DNL segment, which no camera emits
        raise BadFrame("zero height in SOF (DNL not supported)")
    return width, height


def check_video_frame(data: bytes | memoryview, expected_width: int, expected_height: int) -> None:
    """``BadFrame`` unless ``data`` is a well-formed JPEG of exactly the announced size."""
    width, height = jpeg_dimensions(data)
    if (width, height) != (expected_width, expected_height):
        raise BadFrame(
            f"size {width}x{height} does not match the hello's {expected_width}x{expected_height}"
        )
