"""avd.eventloop: each name runs the coroutine on the loop it names, and returns its result."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from avd import eventloop
from avd.config import ReceiverSettings, SenderSettings


async def _loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_uvloop_is_uvloops_loop() -> None:
    assert eventloop.run(_loop_type(), "uvloop") is uvloop.Loop


def test_asyncio_is_pythons_own_loop() -> None:
    loop_type = eventloop.run(_loop_type(), "asyncio")
    assert loop_type is not uvloop.Loop
    assert issubclass(loop_type, asyncio.BaseEventLoop)


@pytest.mark.parametrize("cls", [ReceiverSettings, SenderSettings])
def test_the_daemons_default_to_uvloop(cls: type[ReceiverSettings | SenderSettings]) -> None:
    assert cls.model_fields["event_loop"].default == "uvloop"
