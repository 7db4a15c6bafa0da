"""StreamClient's retry loop (a unit test: the session itself is scripted)."""

from __future__ import annotations

import asyncio
import logging
import ssl

import pytest

from avd.backoff import Backoff
from avd.errors import LocalProtocolError
from avd.media.base import CapturedFrame, StreamKind, VideoFormat
from avd.metrics import SenderMetrics
from avd.queues import DropOldestQueue
from avd.spool import Spool
from avd.stream_client import Endpoint, StreamClient
from avd.tokens import Token


def test_an_unexpected_error_in_a_session_is_logged_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        client = StreamClient(
            kind=StreamKind.VIDEO,
            endpoint=Endpoint("127.0.0.1", 9, "localhost", ssl.create_default_context(), 1.0),
            sender_id="cam1",
            token=Token("t" * 43),
            media_format=VideoFormat(640, 480, 20, 70),
            queue=DropOldestQueue[tuple[int, CapturedFrame]](4, loop),
            spool=Spool(max_bytes=1 << 20, max_age_us=10**7),
            metrics=SenderMetrics(),
            backoff=Backoff(first_s=0.01, cap_s=0.02),
        )
        stop = asyncio.Event()
        attempts = 0

        async def session(_: asyncio.Event) -> None:
            nonlocal attempts
            attempts += 1
            if attempts >= 3:
                stop.set()
            raise LocalProtocolError("cannot send Media as sender in state closed")

        client._session = session  # type: ignore[method-assign,assignment]
        await asyncio.wait_for(client.run(stop), timeout=5)
        return attempts

    caplog.set_level(logging.ERROR, "avd.sender")
    assert asyncio.run(scenario()) == 3  # retried, not crashed
    assert "unexpected error; reconnecting" in caplog.text
