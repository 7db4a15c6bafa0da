"""The README's metric tables name exactly what each daemon serves, with its labels."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from avd.media.done import RecorderStats
from avd.metrics import ReceiverMetrics, RecorderCollector, SenderMetrics

README = Path(__file__).resolve().parent.parent / "README.md"
METRIC = re.compile(r"`(avd_[a-z_]+)(?:\{([a-z_,]+)\})?`")


def _documented() -> dict[str, dict[str, tuple[str, ...]]]:
    """{"receiver": {name: labels}, "sender": {...}} from the README's two tables."""
    section = README.read_text().split("serves Prometheus metrics", 1)[1].split("\n## ", 1)[0]
    receiver, sender = section.split("\nReceiver:\n", 1)[1].split("\nSender:\n", 1)
    tables = {}
    for daemon, text in (("receiver", receiver), ("sender", sender)):
        rows = [line for line in text.splitlines() if line.startswith("| `")]
        # Only the first cell names metrics; the second may quote label values.
        cells = [row.split(" | ", 1)[0] for row in rows]
        tables[daemon] = {
            name: tuple(labels.split(",")) if labels else ()
            for cell in cells
            for name, labels in METRIC.findall(cell)
        }
    return tables


def _served(registry: CollectorRegistry) -> dict[str, tuple[str, ...]]:
    served = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {key for sample in family.samples for key in sample.labels if key != "le"}
        served[name] = tuple(sorted(labels))
    return served


def _fill(metrics: object) -> None:
    """A child for every labelled family, so that its labels show in the samples."""
    for value in vars(metrics).values():
        names = getattr(value, "_labelnames", ())
        if names:
            value.labels(**dict.fromkeys(names, "x"))


def test_the_readme_lists_every_metric_each_daemon_serves_and_no_other() -> None:
    documented = _documented()
    receiver, sender = ReceiverMetrics(), SenderMetrics()
    _fill(receiver)
    _fill(sender)
    receiver.registry.register(RecorderCollector(lambda: {"s": RecorderStats()}))
    for daemon, registry in (("receiver", receiver.registry), ("sender", sender.registry)):
        served = _served(registry)
        listed = {name: tuple(sorted(labels)) for name, labels in documented[daemon].items()}
        assert sorted(set(served) - set(listed)) == [], f"{daemon}: served, not in the README"
        assert sorted(set(listed) - set(served)) == [], f"{daemon}: in the README, not served"
        wrong = {n: (listed[n], served[n]) for n in served if listed[n] != served[n]}
        assert wrong == {}, f"{daemon}: labels (README, served)"
