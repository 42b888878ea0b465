"""Turn the kernel's flat output into matches with ids, teams and quality figures (pure)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

from server.config import ModeConfig
from server.matching import kernel


@dataclass(frozen=True, slots=True)
class MatchPlan:
    """A match the pairing found: what the fenced commit writes, and its quality figures."""

    match_id: str
    teams: list[list[str]]
    spread: float = 0.0  # max - min rating in the match
    team_gap: float = 0.0  # max - min of the teams' rating sums
    waits_ms: list[int] = field(default_factory=list)  # each player's wait at the snapshot

    @property
    def players(self) -> list[str]:
        return [p for team in self.teams for p in team]


@dataclass(frozen=True, slots=True)
class Candidates:
    """Decoded snapshot: ``players[index[c]]`` has rating ``ratings[c]``, queued ``queued[c]``."""

    players: Sequence[str]
    index: array[int]
    ratings: array[float]
    queued: array[int]
    bad: list[int]

    @classmethod
    def decode(cls, players: Sequence[str], tickets: list[bytes | None]) -> Candidates:
        index, ratings, queued, bad = kernel.decode_tickets(tickets)
        return cls(players, index, ratings, queued, bad)

    @property
    def poison(self) -> list[str]:
        return [self.players[i] for i in self.bad]


class Plans(Sequence[MatchPlan]):
    """The matches one pairing found, in the kernel's order, each built when first read: a tick
    whose commit budget runs out pays only for the matches it reached (a dense pool of 100k
    yields 50k matches, and building them all would cost a tick hundreds of milliseconds)."""

    __slots__ = ("_built", "_cands", "_flat", "_k", "_mode", "_now_ms", "_prefix")

    def __init__(self, cands: Candidates, mode: ModeConfig, now_ms: int, id_prefix: str,
                 flat: array[int]) -> None:
        self._cands, self._mode, self._now_ms, self._prefix = cands, mode, now_ms, id_prefix
        self._flat = flat
        self._k = mode.match_size
        self._built: dict[int, MatchPlan] = {}

    def __len__(self) -> int:
        return len(self._flat) // self._k

    @overload
    def __getitem__(self, g: int) -> MatchPlan: ...
    @overload
    def __getitem__(self, g: slice) -> list[MatchPlan]: ...

    def __getitem__(self, g: int | slice) -> MatchPlan | list[MatchPlan]:
        if isinstance(g, slice):
            return [self[i] for i in range(*g.indices(len(self)))]
        if g < 0:
            g += len(self)
        if not 0 <= g < len(self):
            raise IndexError(g)
        plan = self._built.get(g)
        if plan is None:
            plan = self._built[g] = self._build(g)
        return plan

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Plans | list):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Plans({list(self)!r})"

    def _build(self, g: int) -> MatchPlan:
        cands, mode, k = self._cands, self._mode, self._k
        members = self._flat[g * k:(g + 1) * k]
        ts = mode.team_size
        teams = [[cands.players[cands.index[c]] for c in members[t * ts:(t + 1) * ts]]
                 for t in range(mode.teams)]
        ratings = [cands.ratings[c] for c in members]
        sums = [sum(ratings[t * ts:(t + 1) * ts]) for t in range(mode.teams)]
        return MatchPlan(
            match_id=f"{self._prefix}.{g}",
            teams=teams,
            spread=max(ratings) - min(ratings),
            team_gap=max(sums) - min(sums),
            waits_ms=[max(self._now_ms - cands.queued[c], 0) for c in members],
        )


def plan_matches(cands: Candidates, mode: ModeConfig, now_ms: int, id_prefix: str) -> Plans:
    flat = kernel.active.pair(
        cands.ratings, cands.queued, now_ms, mode.team_size, mode.teams, mode.window_base,
        mode.window_growth_per_s, mode.window_max, mode.max_wait_ms,
    )
    return Plans(cands, mode, now_ms, id_prefix, flat)
