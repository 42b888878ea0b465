"""One TryMatch tick for one mode: snapshot, decode, pair, fenced commit (which tells the
players, from inside the script so notices keep Redis' order)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from server import metrics
from server.app.lease import Lease
from server.config import MatchingConfig, ModeConfig
from server.matching.plan import Candidates, MatchPlan, plan_matches
from server.store.errors import StoreUnavailable
from server.store.matches import CommitResult, MatchStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HoldCheck:
    """Issue 16: form no matches while no game server listens on ``request_channel`` or the
    back-off after failed handoffs runs."""

    request_channel: str
    no_server_ms: int


class TryMatch:
    def __init__(
        self, name: str, mode: ModeConfig, config: MatchingConfig, matches: MatchStore,
        lease: Lease, hold: HoldCheck | None = None,
    ) -> None:
        self.name = name
        self.mode = mode
        self.config = config
        self.matches = matches
        self.lease = lease
        self.hold = hold
        self.held = ""  # why this mode forms no matches now ("" when it does)
        self.ticks = 0
        # Epochs start again at 1 when Redis loses its data: the tag keeps match ids unique
        # (a client's loading_session_id, a game server's match_id) across such a restart.
        self.tag = secrets.token_hex(3)

    async def plan(self) -> tuple[list[MatchPlan], list[str]]:
        """Snapshot and pair: the matches to commit, and the poison candidates seen."""
        snap = await self.matches.snapshot(self.name, self.config.snapshot_chunk)
        metrics.QUEUE_SIZE.labels(self.name).set(len(snap.players))
        cands = Candidates.decode(snap.players, snap.tickets)
        self.ticks += 1
        prefix = f"{self.lease.epoch}.{self.tag}.{self.ticks}"
        return plan_matches(cands, self.mode, snap.now_ms, prefix), cands.poison

    async def run(self, token: str) -> int:
        """One tick under ``token``'s lease; returns the number of matches committed."""
        started = time.monotonic()
        try:
            plans, poison = await self.plan()
            await self.remove_poison(poison)
            # Asked only when a match could form: a quiet mode costs no probe.
            if not plans or await self._held():
                return 0
            return await self.commit(token, plans, started)
        finally:
            metrics.observe(metrics.TRY_MATCH_SECONDS, time.monotonic() - started, self.name)

    async def _held(self) -> bool:
        """Players keep their wait (and are told why by `status`) instead of going through
        ready checks that cannot end in a match."""
        if self.hold is None:
            return False
        reason = await self.matches.hold(self.name, self.hold.request_channel, self.hold.no_server_ms)
        if reason != self.held:
            if reason:
                log.warning("%s: forming no matches (%s)", self.name, reason)
            else:
                log.info("%s: forming matches again (was held: %s)", self.name, self.held)
            self.held = reason
        return bool(reason)

    async def commit(self, token: str, plans: Sequence[MatchPlan], started: float) -> int:
        budget_s = self.config.tick_budget_ms / 1000
        by_id = {p.match_id: p for p in plans}
        committed = tried = 0
        for batch in _batches(plans, self.config.commit_batch_players):
            if not self.lease.holds(token):
                log.warning("%s: lease lost mid-tick; %d of %d matches left uncommitted",
                            self.name, len(plans) - tried, len(plans))
                break
            if time.monotonic() - started > budget_s:
                log.warning("%s: tick budget of %.0f ms spent; %d of %d matches wait for the next "
                            "tick", self.name, budget_s * 1000, len(plans) - tried, len(plans))
                break
            tried += len(batch)
            result = await self._commit_batch(token, batch)
            if result.fenced:
                metrics.inc(metrics.COMMITS_FENCED, self.name)
                self.lease.lose()
                log.warning("%s: commit fenced: this worker is no longer the leader", self.name)
                break
            committed += len(result.committed)
            self._record(result, by_id)
        return committed

    async def _commit_batch(self, token: str, batch: Sequence[MatchPlan]) -> CommitResult:
        try:
            return await self.matches.commit(self.name, token, self.config.ready_timeout_ms, batch)
        except StoreUnavailable as exc:
            # The script may have run before the reply was lost: the same ids make a retry safe.
            log.warning("%s: commit failed (%s); retrying once with the same match ids", self.name, exc)
            return await self.matches.commit(self.name, token, self.config.ready_timeout_ms, batch)

    def _record(self, result: CommitResult, by_id: dict[str, MatchPlan]) -> None:
        mode = self.name
        for match_id in result.committed:
            plan = by_id[match_id]
            metrics.inc(metrics.MATCHES_CREATED, mode)
            metrics.inc(metrics.PLAYERS_MATCHED, mode, amount=len(plan.waits_ms))
            metrics.observe(metrics.MATCH_SPREAD, plan.spread, mode)
            metrics.observe(metrics.MATCH_TEAM_GAP, plan.team_gap, mode)
            for wait in plan.waits_ms:
                metrics.observe(metrics.MATCH_WAIT, wait / 1000, mode)
        if result.poisoned:
            metrics.inc(metrics.POISONED, mode, amount=len(result.poisoned))
            log.warning("%s: removed %d tickets whose owner is gone: %s",
                        mode, len(result.poisoned), result.poisoned[:10])

    async def remove_poison(self, players: Sequence[str]) -> None:
        """DESIGN P1: an undecodable ticket is removed and counted; it never blocks the rest.
        The script tells a connected owner (`dequeued{removed}`)."""
        for player in players:
            if await self.matches.remove_ticket(self.name, player):
                metrics.inc(metrics.POISONED, self.name)
                log.warning("%s: removed undecodable ticket of %s", self.name, player)


def _batches(plans: Sequence[MatchPlan], max_players: int) -> Iterator[Sequence[MatchPlan]]:
    start = 0
    while start < len(plans):
        end, players = start, 0
        while end < len(plans) and (end == start or players + len(plans[end].waits_ms) <= max_players):
            players += len(plans[end].waits_ms)
            end += 1
        yield plans[start:end]
        start = end
