"""The leader's candidate pool of one mode (issue 10): loaded once, then kept up to date with
the queue's changes, so a tick costs what changed instead of a re-read of the whole queue.

    pool = Pool()
    poison = pool.load(players, tickets, grace)   # a full snapshot, queue order, grace included
    ...                                           # each tick:
    poison = pool.apply(changes)                  # what changed since, in order (changes.py)
    plans = plan_matches(pool.candidates(), mode, now_ms, prefix)

``candidates()`` holds the matchable players (grace left out) in queue order, with their
ratings and queued_at, exactly as ``Candidates.decode`` of a full re-read of the same Redis
state holds them, so ``plan_matches`` returns the same matches, teams and tie-breaks. The
pool's semantics are written down in ``pool_py.py`` (the twin of ``_fastmatch/pool.pyx``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from server.matching import kernel, pool_py
from server.matching.changes import Added, Change, GraceOff, GraceOn, Removed
from server.matching.plan import Candidates

__all__ = ["Added", "Change", "GraceOff", "GraceOn", "Pool", "PoolCheck", "Removed"]


class PoolCheck(NamedTuple):
    """What Redis can confirm cheaply: ``size`` = ZCARD of the queue, ``graced`` = ZCARD of
    the grace set, ``queued_sum`` = the sum of the queue's scores (queued_at_ms, exact)."""

    size: int
    graced: int
    queued_sum: int


class Pool:
    def __init__(self, core: pool_py.PoolCore | None = None) -> None:
        self._core = core if core is not None else kernel.PoolCore()

    def load(self, players: Sequence[str], tickets: Sequence[bytes | None],
             grace: Iterable[str] = ()) -> list[str]:
        """Replace the pool by a snapshot of the whole queue (grace players included, with
        their tickets), ideally in queue order (anything else is sorted); ``grace``: the
        players in resume grace (others are ignored). Returns the poison players (not added)."""
        return self._core.load(players, tickets, grace)

    def apply(self, changes: Iterable[Change]) -> list[str]:
        """Apply a batch of changes in the order they happened. Returns the players left in
        the queue with an undecodable ticket by this batch (poison: not added)."""
        return self._core.apply(changes)

    def candidates(self) -> Candidates:
        """The matchable players in queue order: ``players[index[c]]`` with ``ratings[c]``
        and ``queued[c]`` (``players`` may hold others: only ``index`` picks). Read only;
        shared with the pool, and still valid after later changes."""
        players, index, ratings, queued = self._core.view()
        return Candidates(players, index, ratings, queued, [])

    def queue(self) -> list[str]:
        """Every player in queue order, grace included (for checks and tests: O(n))."""
        return self._core.queue()

    def __len__(self) -> int:
        """Every entry, grace included (ZCARD of the queue)."""
        return len(self._core)

    @property
    def matchable(self) -> int:
        return len(self._core) - self._core.graced

    def check(self) -> PoolCheck:
        return PoolCheck(len(self._core), self._core.graced, self._core.queued_sum)
