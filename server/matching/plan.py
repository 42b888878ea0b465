"""Turn the kernel's flat output into matches with ids, teams and quality figures (pure)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

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


def plan_matches(cands: Candidates, mode: ModeConfig, now_ms: int, id_prefix: str) -> list[MatchPlan]:
    flat = kernel.active.pair(
        cands.ratings, cands.queued, now_ms, mode.team_size, mode.teams, mode.window_base,
        mode.window_growth_per_s, mode.window_max, mode.max_wait_ms,
    )
    k = mode.match_size
    plans = []
    for g, start in enumerate(range(0, len(flat), k)):
        members = flat[start:start + k]
        teams = [
            [cands.players[cands.index[c]] for c in members[t * mode.team_size:(t + 1) * mode.team_size]]
            for t in range(mode.teams)
        ]
        ratings = [cands.ratings[c] for c in members]
        sums = [
            sum(ratings[t * mode.team_size:(t + 1) * mode.team_size]) for t in range(mode.teams)
        ]
        plans.append(MatchPlan(
            match_id=f"{id_prefix}.{g}",
            teams=teams,
            spread=max(ratings) - min(ratings),
            team_gap=max(sums) - min(sums),
            waits_ms=[max(now_ms - cands.queued[c], 0) for c in members],
        ))
    return plans
