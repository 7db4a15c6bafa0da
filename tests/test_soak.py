"""The soak command, briefly: ``python -m tests.soak`` for half a minute with two senders.

A smoke run so CI keeps the command working: it runs as a real subprocess (in a session of
its own, so a hung run is killed with every daemon it started), and its JSON summary must
say that everything stayed up, frames flowed and were recorded, none went missing, and
memory stayed within a generous bound (half a minute is too short for the growth verdict,
which waits for the daemons' warm-up). The soak's arithmetic (growth, restart times) is
tested on its own, without daemons.
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
from .soak import growth_mb_per_min, restart_times

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


@pytest.mark.slow
@pytest.mark.timeout(240)  # the first one runs the soak (about 40 s)
def test_the_soak_run_passes_its_own_verdict(smoke: tuple[int, str, dict[str, Any]]) -> None:
    code, out, summary = smoke
    assert code == 0, out[-4000:]
    assert summary["ok"]
    assert "verdict: GOOD" in out


@pytest.mark.slow
@pytest.mark.timeout(240)  # the first one runs the soak (about 40 s)
def test_every_daemon_stayed_up_and_stopped_cleanly(
    smoke: tuple[int, str, dict[str, Any]],
) -> None:
    processes = smoke[2]["processes"]
    assert set(processes) == {"receiver", "soak1", "soak2"}
    for name, proc in processes.items():
        assert proc["alive"], name
        assert proc["exit_code"] == 0, name
    assert len(smoke[2]["restarts"]) == 1  # the receiver was killed and came back


@pytest.mark.slow
@pytest.mark.timeout(240)  # the first one runs the soak (about 40 s)
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


@pytest.mark.slow
@pytest.mark.timeout(240)  # the first one runs the soak (about 40 s)
def test_faults_were_injected(smoke: tuple[int, str, dict[str, Any]]) -> None:
    injected = sum(sum(s["faults"].values()) for s in smoke[2]["senders"].values())
    assert injected >= 1


@pytest.mark.slow
@pytest.mark.timeout(240)  # the first one runs the soak (about 40 s)
def test_memory_stayed_bounded(smoke: tuple[int, str, dict[str, Any]]) -> None:
    for name, proc in smoke[2]["processes"].items():
        rss = proc["rss_kb"]
        assert rss["max"] - rss["start"] < 100 * 1024, name  # a leak of ~3 MB/s shows
        assert proc["fds"]["max"] < 64, name


@pytest.mark.slow
@pytest.mark.timeout(240)  # the first one runs the soak (about 40 s)
def test_bad_arguments_are_refused() -> None:
    code, out = run_soak(["--senders", "0"], timeout=30)
    assert code == 2
    assert "--senders" in out


# ---- the soak's arithmetic, without daemons -------------------------------------------------


def test_growth_is_the_slope_after_the_warmup_within_each_incarnation() -> None:
    # 1 MiB/min after a 60 s warm-up that climbed 50 MiB; a restart at 300 s drops to 70 MiB.
    points = [(t, 1, 80_000 + int(t * 1024 / 60)) for t in range(60, 300, 5)]
    points = [(t, 1, 30_000 + t * 800) for t in range(0, 60, 5)] + points
    points += [(t, 2, 70_000 + int((t - 300) * 1024 / 60)) for t in range(300, 600, 5)]
    growth, window = growth_mb_per_min(points, since_run_s=60, since_start_s=0)
    assert growth == pytest.approx(1.0, abs=0.01)
    assert window == pytest.approx(235 + 295)
    growth, window = growth_mb_per_min(points, since_run_s=0, since_start_s=400)
    assert (growth, window) == (None, 0.0)  # no incarnation lived past its warm-up


def test_restarts_are_spread_over_the_run_and_never_at_its_very_end() -> None:
    assert restart_times(300, 120) == [120, 240]
    assert restart_times(180, 120) == [120]
    assert restart_times(30, 120) == [15]  # a short run still sees one
    assert restart_times(600, 0) == []
