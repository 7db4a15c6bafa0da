"""``python -m tests.peers``: its arithmetic, and a short real run of avd beside both peers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import compare
from tests.peers.__main__ import verdict
from tests.peers.compare import (
    Durations,
    Figures,
    Sample,
    combine,
    frames_per_second,
    latency_ms,
)

REPO = Path(__file__).resolve().parents[1]


def test_latency_counts_the_frames_captured_inside_the_window() -> None:
    rows = [(1_000, 3_000), (2_000, 2_500), (5_000, 9_000), (9_999, 10_001)]
    assert latency_ms(rows, (2_000, 9_000)) == [0.5, 4.0]


def test_throughput_counts_the_frames_decoded_inside_the_window() -> None:
    rows = [(0, 999_999), (0, 1_000_000), (0, 1_500_000), (0, 2_000_000), (0, 2_000_001)]
    assert frames_per_second(rows, (1_000_000, 2_000_000)) == 3.0


def test_rounds_pool_the_latencies_and_take_the_median_of_the_rest() -> None:
    def cpu(x: float) -> dict[str, float]:
        return {"sender": x, "receiver": 2 * x, "idle": x / 10}

    rounds = [
        Sample([1.0, 2.0], 100, cpu(1)),
        Sample([3.0, 4.0], 300, cpu(5)),
        Sample([5.0, 6.0], 200, cpu(3)),
    ]
    figures = combine(rounds)
    assert (figures.latency_p50_ms, figures.latency_p99_ms, figures.frames) == (3.0, 6.0, 6)
    assert figures.throughput_fps == 200
    assert (figures.sender_cpu_pct, figures.receiver_cpu_pct) == (3, 6)
    assert figures.receiver_idle_cpu_pct == 0.3


def test_each_round_starts_one_system_later(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    def measured(name: str) -> Sample:
        order.append(name)
        return Sample([1.0], 1.0, {"sender": 1, "receiver": 1, "idle": 0})

    monkeypatch.setattr(compare, "measure_avd", lambda ws, d: measured("avd"))
    monkeypatch.setattr(compare, "measure_peer", lambda ws, name, d: measured(name))
    results = compare.measure_all(None, Durations(1, 1, 1), ("imagezmq", "netgear"), rounds=4)  # type: ignore[arg-type]
    assert order == [
        *("avd", "imagezmq", "netgear"),
        *("imagezmq", "netgear", "avd"),
        *("netgear", "avd", "imagezmq"),
        *("avd", "imagezmq", "netgear"),
    ]
    assert {name: f.frames for name, f in results.items()} == {
        "avd": 4,
        "imagezmq": 4,
        "netgear": 4,
    }


def test_the_verdict_says_yes_only_when_avd_beats_every_peer() -> None:
    def system(p99_ms: float, fps: float, idle: float) -> Figures:
        return Figures(1.0, p99_ms, 60, fps, 3.0, 3.0, idle)

    avd = system(2.0, 1200, 0.0)
    peers = [system(2.5, 1100, 0.0), system(3.0, 1300, 20.0)]
    assert verdict(avd, peers, "latency_p99_ms", lower_is_better=True) == "yes"
    assert verdict(avd, peers, "throughput_fps", lower_is_better=False) == "NO"
    assert verdict(avd, peers, "receiver_idle_cpu_pct", lower_is_better=True) == "tie"
    assert verdict(avd, peers[:1], "throughput_fps", lower_is_better=False) == "yes"


@pytest.mark.slow
def test_a_quick_comparison_measures_all_three_systems(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tests.peers", "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    floor = figures["floor_ms"]
    assert 0 < floor < 20
    for name in ("avd", "imagezmq", "netgear"):
        system = figures[name]
        # 3 s at 20 fps: every frame of the window measured, none lost on loopback.
        assert 55 <= system["frames"] <= 61, (name, system)
        # One clock for both processes: a frame cannot arrive decoded before it was encoded
        # and decoded (half the floor: NetGear's own codec is faster than cv2's).
        assert floor / 2 < system["latency_p50_ms"] <= system["latency_p99_ms"] < 100, name
        assert system["throughput_fps"] > 100, (name, system)
        assert 0 < system["receiver_cpu_pct"] < 100, (name, system)
    for line in ("avd (TLS 1.3, tokens, recording)", "imagezmq REQ/REP", "NetGear REQ/REP"):
        assert line in run.stdout
    assert "avd ahead of every peer on latency_p99_ms: " in run.stdout


def test_a_missing_peer_is_named_with_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util  # noqa: PLC0415

    from tests.peers.__main__ import main  # noqa: PLC0415

    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vidgear" else found(name)
    )
    assert main(["--quick"]) == 1
    assert "vidgear not installed: pip install -e '.[peers]'" in capsys.readouterr().err
