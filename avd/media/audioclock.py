"""Where PCM chunks go on a sender's capture clock: by their sample count, not their arrival."""

from __future__ import annotations

from avd.media.base import AudioFormat


class AudioClock:
    """Places PCM chunks on the capture clock by their sample count, not their arrival.

    A capture thread stamps chunks with jitter; following the sample count keeps the audio
    gapless (as aiortc does). The position re-anchors to the capture time when the two
    disagree by more than one chunk (a lost chunk, or clock drift); a chunk that would
    overlap the previous one by more than that is refused.
    """

    def __init__(self, fmt: AudioFormat) -> None:
        self._rate = fmt.rate
        self._frame_bytes = fmt.channels * fmt.sample_width
        self._tolerance_us = max(1, fmt.chunk_duration_us)
        self._anchor_us: int | None = None
        self._samples = 0  # written since the anchor

    def _at(self, samples: int) -> int:
        assert self._anchor_us is not None
        return self._anchor_us + samples * 1_000_000 // self._rate

    def place(self, capture_us: int, size: int) -> tuple[int, int] | None:
        """(start, end) in capture µs for a chunk of ``size`` bytes, or None to refuse it."""
        if self._anchor_us is not None:
            expected = self._at(self._samples)
            if capture_us < expected - self._tolerance_us:
                return None
            if capture_us > expected + self._tolerance_us:
                self._anchor_us = None
        if self._anchor_us is None:
            self._anchor_us, self._samples = capture_us, 0
        start = self._at(self._samples)
        self._samples += size // self._frame_bytes
        return start, self._at(self._samples)
