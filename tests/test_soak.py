"""The soak command, briefly: ``python -m tests.soak`` for half a minute with two senders.

A smoke run so CI keeps the command working: it runs as a real subprocess (in a session of
its own, so a hung run is killed with every daemon it started), and its JSON summary must
say that everything stayed up, frames flowed and were recorded, none went missing, and
memory stayed within a generous bound (half a minute is too short to measure a slow leak;
the full run's ``--max-growth`` default is for that).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from .conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SMOKE_ARGS = ["--minutes", "0.5", "--senders", "2", "--seed", "5", "--max-growth", "60", "--json"]


def run_soak(args: list[str], timeout: float = 200) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.soak", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its process group holds the daemons it starts
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the soak run did not end within {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def smoke() -> tuple[int, str, dict[str, Any]]:
    code, out = run_soak(SMOKE_ARGS)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    assert last.startswith("{"), f"no JSON summary on the last line:\n{out[-4000:]}"
    summary: dict[str, Any] = json.loads(last)
    return code, out, summary


def test_the_soak_run_passes_its_own_verdict(smoke: tuple[int, str, dict[str, Any]]) -> None:
    code, out, summary = smoke
    assert code == 0, out[-4000:]
    assert summary["ok"]
    assert "verdict: GOOD" in out


def test_every_daemon_stayed_up_and_stopped_cleanly(
    smoke: tuple[int, str, dict[str, Any]],
) -> None:
    processes = smoke[2]["processes"]
    assert set(processes) == {"receiver", "soak1", "soak2"}
    for name, proc in processes.items():
        assert proc["alive"], name
        assert proc["exit_code"] == 0, name
    assert len(smoke[2]["restarts"]) == 1  # the receiver was killed and came back


def test_frames_flowed_and_every_one_below_the_cutoff_was_recorded(
    smoke: tuple[int, str, dict[str, Any]],
) -> None:
    for sender_id, sender in smoke[2]["senders"].items():
        for stream, row in sender["streams"].items():
            where = f"{sender_id} {stream}"
            for counter in ("captured", "sent", "received", "recorded", "cutoff"):
                assert row[counter] > 0, f"{where}: {counter} = 0"
            assert row["lost"] == 0, where  # no outage here comes near the 30 s spool
            assert row["missing"] == 0, where
            assert row["recorded"] >= row["cutoff"], where


def test_faults_were_injected(smoke: tuple[int, str, dict[str, Any]]) -> None:
    injected = sum(sum(s["faults"].values()) for s in smoke[2]["senders"].values())
    assert injected >= 1


def test_memory_stayed_bounded(smoke: tuple[int, str, dict[str, Any]]) -> None:
    for name, proc in smoke[2]["processes"].items():
        rss = proc["rss_kb"]
        assert rss["max"] - rss["start"] < 100 * 1024, name  # a leak of ~3 MB/s shows
        assert proc["fds"]["max"] < 64, name


def test_bad_arguments_are_refused() -> None:
    code, out = run_soak(["--senders", "0"], timeout=30)
    assert code == 2
    assert "--senders" in out
