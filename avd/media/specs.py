"""What an audio source setting names, from its text alone: no device is looked at.

Pure, so that the settings refuse a spec no source would take when they are loaded (the
daemon's exit 78, and ``avd check`` saying so) rather than when the sources open.
"""

from __future__ import annotations


def is_mic_spec(spec: str) -> bool:
    """ "mic" or "mic:<device>", in any case and spacing."""
    return spec.strip().partition(":")[0].strip().casefold() == "mic"


def parse_mic_spec(spec: str) -> str:
    """The device part of "mic" or "mic:<index or name>" ("default" for plain "mic").

    ValueError for anything else; the sender adds the name of the setting to the message.
    """
    kind, sep, device = spec.strip().partition(":")
    if kind.strip().casefold() != "mic":
        raise ValueError(f"audio source {spec!r} is not a microphone (mic or mic:<device>)")
    if not sep:
        return "default"
    if not device.strip():
        raise ValueError(f"audio source {spec!r} names no device after 'mic:'")
    return device.strip()


def is_wav_spec(spec: str) -> bool:
    return spec.lower().endswith(".wav")


def check_audio_source(spec: str) -> str:
    """``spec`` if some audio source takes it; ValueError saying what would."""
    if spec in ("none", "test") or is_wav_spec(spec):
        return spec
    if is_mic_spec(spec):
        parse_mic_spec(spec)
        return spec
    raise ValueError("not none, test, mic, mic:<index or name>, nor a .wav file")
