"""Closing an asyncio stream connection, bounded in time, without a reference cycle.

A connection lost with an error (a reset) keeps that exception in its reader and in its
protocol's closed future, and ``wait_closed()`` raises it again. Caught by a coroutine,
the exception's traceback then holds that coroutine's frame, and the frame holds the
stream: a cycle that keeps the reader, the TLS buffers and whatever the frame refers to
(a whole session) until the garbage collector's full pass, which comes rarely in a
long-lived daemon; memory freed that late mostly stays with the process. A reset storm
grew the receiver by about 5 KB a session for good this way (tests/test_session_memory.py).
"""

from __future__ import annotations

import asyncio


async def close_stream(writer: asyncio.StreamWriter, timeout_s: float) -> None:
    """Close ``writer``'s connection and wait up to ``timeout_s`` for it to end.

    A peer that never answers our close would hold the socket and its TLS buffers for
    asyncio's 30 s close timeout, and a lost connection has nothing left to wait for: both
    are aborted (what we wrote had ``timeout_s`` to go).
    """
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout=timeout_s)
    except Exception as exc:
        writer.transport.abort()
        # It holds this frame, and the stream keeps it: a cycle. It is the very object the
        # reader keeps (asyncio hands one exception to both), so whatever frames an earlier
        # catch of it attached (the session's read loop) go with this traceback too.
        exc.__traceback__ = None
