"""ALSA test configuration and helpers for real PyAudio without a sound card."""
