"""Runs one media source on its own thread, handing each frame to a non-blocking callback.

Capture and JPEG encoding stay off the event loop. If the source cannot be opened, or
fails while reading, the failure is logged once with the device's name and the device is
reopened with capped backoff, so a camera or microphone plugged in late, or back after a
fault, is picked up without a restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from avd.errors import DeviceError
from avd.logs import LogEvent, log_event
from avd.media.base import CapturedFrame, MediaSource

log = logging.getLogger("avd.capture")

OPEN_RETRY_FIRST_S = 1.0
OPEN_RETRY_MAX_S = 10.0


class CaptureThread:
    def __init__(
        self,
        source: MediaSource,
        deliver: Callable[[CapturedFrame], None],
        finished: Callable[[], None],
    ) -> None:
        self.source = source
        self.deliver = deliver  # must not block: it hands the frame to a drop-oldest queue
        self.finished = finished
        self.stopping = threading.Event()
        self.opened = threading.Event()
        self.error: str | None = None
        label = source.kind.label
        # In the journal: DEVICE=..., STREAM=... beside the MESSAGE_ID of each change of state.
        self._fields = {"stream": label, "device": source.description}
        self._thread = threading.Thread(target=self._run, name=f"capture-{label}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self.stopping.set()
        self.source.stop()
        self._thread.join(timeout)

    def _open_until_stopped(self) -> bool:
        delay = OPEN_RETRY_FIRST_S
        while not self.stopping.is_set():
            try:
                self.source.open()
            except DeviceError as exc:
                if self.error != str(exc):
                    self.error = str(exc)
                    message = f"{exc}; retrying until it appears"
                    log_event(log, logging.ERROR, LogEvent.DEVICE_LOST, message, **self._fields)
                self.stopping.wait(delay)
                delay = min(delay * 2, OPEN_RETRY_MAX_S)
                continue
            if self.error is not None:
                message = f"{self.source.description} is available again"
                log_event(log, logging.INFO, LogEvent.DEVICE_BACK, message, **self._fields)
            self.error = None
            self.opened.set()
            return True
        return False

    def _run(self) -> None:
        try:
            while self._open_until_stopped() and self._capture_until_lost():
                pass
        finally:
            self.source.close()
            self.finished()
            if not self.stopping.is_set():
                log.info("%s ended; its stream stops", self.source.description)

    def _capture_until_lost(self) -> bool:
        """Deliver frames; True when the device was lost (reopen it), False when done."""
        log.info("capturing %s", self.source.description)
        try:
            while not self.stopping.is_set():
                frame = self.source.read()
                if frame is None:
                    return False
                self.deliver(frame)
        except DeviceError as exc:
            # An unplugged microphone: the network sessions stay up while we wait for it.
            self.error = str(exc)
            log_event(
                log, logging.WARNING, LogEvent.DEVICE_LOST, f"{exc}; reopening it", **self._fields
            )
            self.source.close()
            return True
        except Exception:
            log.exception("capture from %s failed", self.source.description)
        return False
