"""Pairing kernel properties (hypothesis), for the compiled kernel and the pure-Python twin."""

from __future__ import annotations

import itertools
from array import array
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.matching import kernel, kernel_py

IMPLS = kernel.implementations()
NOW = 1_000_000_000


@st.composite
def pools(draw: st.DrawFn) -> tuple[array, array, tuple]:  # type: ignore[type-arg]
    team_size, teams = draw(st.sampled_from([(1, 2), (5, 2), (2, 2), (3, 2), (1, 4), (2, 3), (4, 1)]))
    n = draw(st.integers(0, 70))
    # Few distinct ratings and wait times so ties (the hard cases for identical output) are common.
    ratings = draw(st.lists(st.sampled_from([1000.0, 1200.0, 1210.5, 1500.0, 1501.0, 1530.0, 1800.0,
                                             2400.0, -3.0]) | st.floats(-1e4, 1e4), min_size=n, max_size=n))
    waits = draw(st.lists(st.sampled_from([0, 500, 5_000, 30_000, 200_000]) | st.integers(-1000, 300_000),
                          min_size=n, max_size=n))
    rules = (
        team_size, teams, draw(st.sampled_from([0.0, 50.0, 100.0])),
        draw(st.sampled_from([0.0, 10.0, 25.0])), draw(st.sampled_from([100.0, 400.0, 1e9])),
        draw(st.sampled_from([60_000, 120_000, 10**12])),
    )
    return array("d", ratings), array("q", [NOW - w for w in waits]), rules


def run(impl: ModuleType, ratings: array, queued: array, rules: tuple) -> list[list[int]]:  # type: ignore[type-arg]
    team_size, teams, base, growth, cap, max_wait = rules
    flat = impl.pair(ratings, queued, NOW, team_size, teams, base, growth, cap, max_wait)
    k = team_size * teams
    assert len(flat) % k == 0
    return [list(flat[i:i + k]) for i in range(0, len(flat), k)]


@pytest.mark.skipif("cython" not in IMPLS, reason="extension not built")
@settings(max_examples=400)
@given(pools())
def test_extension_and_twin_return_identical_matches(pool: tuple) -> None:  # type: ignore[type-arg]
    ratings, queued, rules = pool
    assert run(IMPLS["cython"], ratings, queued, rules) == run(IMPLS["python"], ratings, queued, rules)


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
@settings(max_examples=150)
@given(pool=pools())
def test_groups_are_disjoint_and_within_every_window(impl: ModuleType, pool: tuple) -> None:  # type: ignore[type-arg]
    ratings, queued, rules = pool
    _, _, base, growth, cap, max_wait = rules
    groups = run(impl, ratings, queued, rules)
    seen = [m for g in groups for m in g]
    assert len(seen) == len(set(seen))
    win = kernel_py.windows(queued, NOW, base, growth, cap, max_wait)
    for group in groups:
        spread = max(ratings[m] for m in group) - min(ratings[m] for m in group)
        longest = min(group, key=lambda m: (queued[m], m))
        # Valid, or accepted because its longest-waiting member passed max_wait (DESIGN).
        assert all(spread <= win[m] for m in group) or win[longest] == float("inf")
    assert run(impl, ratings, queued, rules) == groups  # deterministic


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
@given(st.integers(1, 5).flatmap(lambda size: st.tuples(
    st.just(size), st.lists(st.floats(0, 5000), min_size=2 * size, max_size=2 * size))))
def test_two_team_split_is_optimal(impl: ModuleType, case: tuple[int, list[float]]) -> None:
    size, values = case
    ratings = array("d", sorted(values))
    queued = array("q", [NOW] * len(ratings))
    [group] = run(impl, ratings, queued, (size, 2, 1e9, 0.0, 1e9, 10**12))
    team_a, team_b = group[:size], group[size:]
    gap = abs(sum(ratings[m] for m in team_a) - sum(ratings[m] for m in team_b))
    best = min(
        abs(sum(ratings[m] for m in combo) - sum(ratings[m] for m in range(2 * size) if m not in combo))
        for combo in itertools.combinations(range(2 * size), size)
    )
    assert gap <= best + 1e-6 * max(1.0, best)


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_longest_waiting_first_and_smallest_spread(impl: ModuleType) -> None:
    # 0 waited longest; its tightest partner is 2 (spread 5), not 1 (spread 20).
    ratings = array("d", [1500.0, 1520.0, 1505.0, 1700.0])
    queued = array("q", [NOW - 9000, NOW - 100, NOW - 50, NOW - 10])
    assert run(impl, ratings, queued, (1, 2, 50.0, 0.0, 50.0, 10**12)) == [[0, 2]]


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_window_growth_and_max_wait(impl: ModuleType) -> None:
    ratings = array("d", [1000.0, 1300.0])
    fresh = array("q", [NOW, NOW])
    assert run(impl, ratings, fresh, (1, 2, 100.0, 10.0, 1000.0, 60_000)) == []
    waited_20s = array("q", [NOW - 20_000, NOW - 20_000])  # window 100 + 10*20 = 300
    assert run(impl, ratings, waited_20s, (1, 2, 100.0, 10.0, 1000.0, 60_000)) == [[0, 1]]
    one_expired = array("q", [NOW - 61_000, NOW])  # the anchor waited past max_wait
    assert run(impl, array("d", [0.0, 5000.0]), one_expired, (1, 2, 100.0, 0.0, 100.0, 60_000)) == [[0, 1]]
