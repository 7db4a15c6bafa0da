"""avd: secured, headless audio/video streaming daemons.

A sender captures a camera and a microphone and streams JPEG video and PCM audio to a
receiver over TLS with token authentication; the receiver authenticates senders, records
the streams and plays the audio.
"""

__version__ = "0.1.0"
