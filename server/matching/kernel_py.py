"""Pure-Python twin of ``_fastmatch/kernel.pyx``: the reference and the fallback.

Must accept and reject exactly what the extension does (tests compare them on random input).
"""

from __future__ import annotations

import math
import re
from array import array
from itertools import combinations
from typing import Final

_RATING: Final = re.compile(rb"[0-9.eE+\-]+")
_QUEUED: Final = re.compile(rb"[0-9]{1,15}")

Decoded = tuple["array[int]", "array[float]", "array[int]", list[int]]


def _parse(value: object) -> tuple[float, int] | None:
    if type(value) is not bytes:
        return None
    parts = value.split(b"|", 2)
    if len(parts) < 3 or not _RATING.fullmatch(parts[0]) or not _QUEUED.fullmatch(parts[1]):
        return None
    try:
        rating = float(parts[0])
    except ValueError:
        return None
    if not math.isfinite(rating):
        return None
    return rating, int(parts[1])


def decode_tickets(values: list[bytes | None]) -> Decoded:
    """(index, ratings, queued_at, bad): see the extension's docstring."""
    index: array[int] = array("q")
    ratings: array[float] = array("d")
    queued: array[int] = array("q")
    bad: list[int] = []
    for i, value in enumerate(values):
        parsed = _parse(value)
        if parsed is None:
            bad.append(i)
            continue
        index.append(i)
        ratings.append(parsed[0])
        queued.append(parsed[1])
    return index, ratings, queued, bad


# -- pairing -------------------------------------------------------------------------------------
#
# Input: parallel arrays of ratings and queued_at_ms (any order), the clock, and the mode's rules.
# Output: a flat array of candidate positions, ``team_size * teams`` per group, team after team.
#
# 1. Every candidate's window: inf once it has waited max_wait_ms, else
#    min(base + growth * (waited_ms / 1000.0), max). A group is valid when its rating spread
#    (max - min) is <= the window of every member, or when its anchor has waited max_wait_ms.
# 2. Anchors in order of (queued_at, position): the longest-waiting first.
# 3. For an anchor, the unused candidates around it in (rating, queued_at, position) order are
#    gathered, and of the contiguous runs of k containing it (the smallest-spread k-sets that
#    contain it), the valid one with the smallest spread wins; ties go to the lower-rated run.
# 4. Teams: one team, or one player per team, are trivial; two teams of up to 16 players are
#    split exactly (every split with the lowest-rated member in team A, in lexicographic order;
#    the first with the smallest |total - 2 * sum A| = |sum B - sum A| wins); otherwise
#    greedy: highest rating first, into the team with the lowest sum that has room (lowest team
#    index on ties).
# Sums are accumulated left to right so both implementations round identically.

EXACT_SPLIT_MAX: Final = 16
INF: Final = math.inf


def windows(queued: array[int], now_ms: int, base: float, growth: float, cap: float,
            max_wait_ms: int) -> list[float]:
    out = []
    for q in queued:
        waited = now_ms - q
        if waited >= max_wait_ms:
            out.append(INF)
        else:
            out.append(min(base + growth * (max(waited, 0) / 1000.0), cap))
    return out


def pair(ratings: array[float], queued: array[int], now_ms: int, team_size: int, teams: int,
         window_base: float, window_growth_per_s: float, window_max: float,
         max_wait_ms: int) -> array[int]:
    n = len(ratings)
    k = team_size * teams
    out: array[int] = array("q")
    if k < 1 or n < k:
        return out
    if len(queued) != n:
        raise ValueError("ratings and queued differ in length")
    if not all(math.isfinite(r) for r in ratings):
        raise ValueError("ratings must be finite")
    win = windows(queued, now_ms, window_base, window_growth_per_s, window_max, max_wait_ms)
    order = sorted(range(n), key=lambda i: (ratings[i], queued[i], i))
    pos = [0] * n
    for p, i in enumerate(order):
        pos[i] = p
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    used = [False] * n
    for a in sorted(range(n), key=lambda i: (queued[i], i)):
        if used[a]:
            continue
        seq = _around(order, prev, nxt, pos[a], k)
        left = seq.index(a)
        expired = win[a] == INF
        best = -1
        best_spread = INF
        for start in range(max(0, left - k + 1), min(left, len(seq) - k) + 1):
            members = seq[start:start + k]
            spread = ratings[members[-1]] - ratings[members[0]]
            if spread < best_spread and (expired or all(spread <= win[m] for m in members)):
                best, best_spread = start, spread
        if best < 0:
            continue
        members = seq[best:best + k]
        for m in members:
            used[m] = True
            p = pos[m]
            if prev[p] >= 0:
                nxt[prev[p]] = nxt[p]
            if nxt[p] < n:
                prev[nxt[p]] = prev[p]
        out.extend(split_teams(members, ratings, team_size, teams))
    return out


def _around(order: list[int], prev: list[int], nxt: list[int], p: int, k: int) -> list[int]:
    left: list[int] = []
    q = prev[p]
    while q >= 0 and len(left) < k - 1:
        left.append(order[q])
        q = prev[q]
    right: list[int] = []
    q = nxt[p]
    while q < len(order) and len(right) < k - 1:
        right.append(order[q])
        q = nxt[q]
    left.reverse()
    return [*left, order[p], *right]


def split_teams(members: list[int], ratings: array[float], team_size: int, teams: int) -> list[int]:
    """``members`` in rating order -> the same players, team after team."""
    k = len(members)
    if teams == 1 or team_size == 1:
        return list(members)
    if teams == 2 and k <= EXACT_SPLIT_MAX:
        return _split_exact(members, ratings, team_size)
    return _split_greedy(members, ratings, team_size, teams)


def _split_exact(members: list[int], ratings: array[float], team_size: int) -> list[int]:
    k = len(members)
    total = 0.0
    for m in members:
        total += ratings[m]
    best_gap = INF
    best: tuple[int, ...] = ()
    for rest in combinations(range(1, k), team_size - 1):
        sum_a = ratings[members[0]]
        for c in rest:
            sum_a += ratings[members[c]]
        gap = abs(total - 2.0 * sum_a)
        if gap < best_gap:
            best_gap, best = gap, (0, *rest)
    team_a = [members[j] for j in best]
    team_b = [members[j] for j in range(k) if j not in best]
    return team_a + team_b


def _split_greedy(members: list[int], ratings: array[float], team_size: int, teams: int) -> list[int]:
    sums = [0.0] * teams
    rosters: list[list[int]] = [[] for _ in range(teams)]
    for j in sorted(range(len(members)), key=lambda j: (-ratings[members[j]], j)):
        t = min((t for t in range(teams) if len(rosters[t]) < team_size), key=lambda t: (sums[t], t))
        rosters[t].append(members[j])
        sums[t] += ratings[members[j]]
    return [m for roster in rosters for m in roster]
