"""Percentiles of measured samples, one definition for every report (sim, benchmarks, probes)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 < q <= 1) of sorted, non-empty ``ordered``: the smallest sample
    with at least ``q`` of the samples at or below it (the nearest-rank method, so a p99 of
    100 samples is the 99th, not the largest)."""
    rank = math.ceil(q * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]
