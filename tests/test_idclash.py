"""avd.idclash: two senders sharing an id are told apart from a sender that reconnects."""

from __future__ import annotations

from avd.idclash import MAX_KEYS, THRESHOLD, WINDOW_S, IdClashes


def replace(
    clashes: IdClashes,
    now: float,
    *,
    sender: str = "cam1",
    stream: str = "video",
    idle_s: float = 0.05,
    old_ip: str = "10.0.0.5",
    new_ip: str = "10.0.0.6",
) -> str | None:
    return clashes.replaced(
        sender, stream, old_idle_s=idle_s, old_ip=old_ip, new_ip=new_ip, now=now
    )


def test_live_sessions_replacing_each_other_are_reported_once_a_minute_with_the_addresses() -> None:
    clashes = IdClashes()
    said = [replace(clashes, 100.0 + i, old_ip=ip, new_ip=other) for i, (ip, other) in
            enumerate([("10.0.0.5", "10.0.0.6"), ("10.0.0.6", "10.0.0.5")] * 3)]  # fmt: skip
    assert said[: THRESHOLD - 1] == [None] * (THRESHOLD - 1)
    assert said[THRESHOLD - 1] == (
        "cam1: its video sessions replaced each other 3 times in the last 60 s while still "
        "streaming, from 10.0.0.5 and 10.0.0.6: are two senders using the id cam1 and its "
        "token? Give each its own AVD_SENDER_ID and token (avd token new --sender-id ID)"
    )
    assert said[THRESHOLD:] == [None] * (len(said) - THRESHOLD), "once a minute"
    # The audio stream of the same sender clashes too: still one line a minute per sender.
    assert [replace(clashes, 107.0 + i, stream="audio") for i in range(3)] == [None] * 3
    later = [replace(clashes, 100.0 + WINDOW_S + 10 + i) for i in range(3)]
    assert later[:2] == [None, None], "what is older than a minute no longer counts"
    assert later[2] is not None
    assert "replaced each other 3 times" in later[2]


def test_reconnects_are_not_a_clash() -> None:
    clashes = IdClashes()
    # A sender that found its connection dead (it waits at least 0.25 s before it tries
    # again), or restarted under systemd (2 s): the old session had gone quiet, however
    # often it happens.
    idle = [0.25, 0.4, 2.0, 3.5]
    assert [replace(clashes, float(i), idle_s=idle[i % 4]) for i in range(20)] == [None] * 20
    # Two live replacements a minute apart (a sender restarted by hand, twice) are not either.
    assert [replace(clashes, i * (WINDOW_S / 2 + 1)) for i in range(6)] == [None] * 6


def test_one_host_running_two_senders_is_named_once() -> None:
    clashes = IdClashes()
    said = [replace(clashes, float(i), old_ip="127.0.0.1", new_ip="127.0.0.1") for i in range(3)]
    assert said[2] is not None
    assert "while still streaming, all from 127.0.0.1:" in said[2]


def test_senders_are_counted_apart_and_memory_is_bounded() -> None:
    clashes = IdClashes()
    for i in range(MAX_KEYS + 100):
        assert replace(clashes, 1.0, sender=f"cam{i}") is None
    assert len(clashes._replaced) == len(clashes._addresses) == MAX_KEYS
    assert replace(clashes, 2.0, sender="cam0") is None, "the oldest was forgotten"
    assert replace(clashes, 2.0, sender=f"cam{MAX_KEYS + 99}") is None
    assert replace(clashes, 3.0, sender=f"cam{MAX_KEYS + 99}") is not None
