"""One percentile definition for every report: nearest rank, never one rank high."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.quantile import nearest_rank
from server.sim.report import percentile


def test_nearest_rank_on_small_samples() -> None:
    hundred = [float(i) for i in range(1, 101)]
    assert nearest_rank(hundred, 0.99) == 99.0  # the 99th of 100, not the largest
    assert nearest_rank(hundred, 0.5) == 50.0
    assert nearest_rank([1.0, 2.0], 0.5) == 1.0
    assert nearest_rank([7.0], 0.999) == 7.0
    assert percentile([], 99) is None and percentile([3.0, 1.0, 2.0], 100) == 3.0


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300), st.floats(0.001, 1.0))
def test_the_smallest_sample_with_q_of_them_at_or_below(values: list[float], q: float) -> None:
    ordered = sorted(values)
    got = nearest_rank(ordered, q)
    n = len(ordered)
    assert sum(v <= got for v in ordered) >= q * n
    assert sum(v < got for v in ordered) < q * n
