"""Percentiles of measured samples: one definition for the bench, the load generator and
the peer comparison, so that their p50 and p99 figures mean the same thing."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("a percentile of no values")
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])
