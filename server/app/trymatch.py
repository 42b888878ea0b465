"""One TryMatch tick for one mode: bring the pool up to date, pair, fenced commit (which tells
the players, from inside the script so notices keep Redis' order).

The pool (issue 10) is the mode's queue held in memory: loaded once by a full snapshot, then
kept up to date with the changes stream the scripts append to, so a tick costs what changed,
not a re-read of the whole queue. A pool that disagrees with the queue's size, or whose stream
position is gone, is loaded again. A stale pool can only cost a skipped commit (the commit
re-checks every player), never a wrong match."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from server import metrics
from server.app.lease import Lease
from server.config import MatchingConfig, ModeConfig
from server.logthrottle import Throttled
from server.matching.changes import Added, Removed
from server.matching.plan import MatchPlan, plan_matches
from server.matching.pool import Pool
from server.store.errors import StoreError, StoreUnavailable
from server.store.matches import ChangeBatch, CommitResult, MatchStore

log = logging.getLogger(__name__)
_disagrees = Throttled(log, "pool disagreements")

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
        self._exported: str | None = None  # the hold the gauge shows (None: not yet set)
        self.ticks = 0
        # Epochs start again at 1 when Redis loses its data: the tag keeps match ids unique
        # (a client's loading_session_id, a game server's match_id) across such a restart.
        self.tag = secrets.token_hex(3)
        # Kept across leadership terms: the changes since `position` bring it up to date
        # whoever ticked meanwhile (or it is loaded again when they are trimmed away).
        self.pool: Pool | None = None
        self.position = ""
        # Queued players whose ticket does not decode (not in the pool), until their removal
        # comes through the stream: the queue's size counts them.
        self.poison: dict[str, None] = {}
        self.loads = 0
        self._reload_wait_s = 0.0  # the back-off of loads that still disagree with the queue
        self._reload_at = 0.0
        self._after_load: tuple[int, int] = (0, 0)  # the difference the last load still saw

    async def plan(self) -> tuple[Sequence[MatchPlan], list[str]]:
        """Bring the pool up to date and pair: the matches to commit, and the poison seen."""
        now_ms = await self.sync()
        assert self.pool is not None
        metrics.QUEUE_SIZE.labels(self.name).set(self.pool.matchable)
        self.ticks += 1
        prefix = f"{self.lease.epoch}.{self.tag}.{self.ticks}"
        return plan_matches(self.pool.candidates(), self.mode, now_ms, prefix), list(self.poison)

    async def sync(self) -> int:
        """Apply every change since the pool's position, loading the queue instead when there
        is no pool yet, its position is gone from the stream, or it disagrees with the queue's
        size. Returns the Redis clock."""
        if self.pool is None:
            return await self.load()
        sizes = await self._follow()
        if sizes is None:
            log.warning("%s: the pool's stream position is gone; loading the queue again", self.name)
            return await self.load()
        residual = self._residual(sizes)
        if not self._agrees(residual):
            if time.monotonic() < self._reload_at and residual == self._after_load:
                return sizes.now_ms  # the same difference a load just left: see load()
            _disagrees("%s: the pool holds %d players (%d in grace, %d poison), the queue %d "
                       "(%d in grace); loading it again", self.name, len(self.pool),
                       sizes.graced - residual[1], len(self.poison), sizes.queue_size, sizes.graced)
            return await self.load()
        self._reload_wait_s = 0.0
        return sizes.now_ms

    async def load(self) -> int:
        """A full read of the queue, then the changes made while it ran."""
        started = time.monotonic()
        self.pool = None  # until the load completes, nothing half-read is used
        snap = await self.matches.snapshot(self.name, self.config.snapshot_chunk)
        pool = Pool()
        self.poison = dict.fromkeys(pool.load(snap.players, snap.tickets, snap.grace))
        self.position = snap.position
        self.pool = pool
        self.loads += 1
        metrics.inc(metrics.POOL_LOADS, self.name)
        sizes = await self._follow()
        if sizes is None:
            self.pool = None
            raise StoreError(f"{self.name}: the changes stream lost its position during a load")
        self._reload_at = 0.0  # agreeing, or told again below
        residual = self._residual(sizes)
        if not self._agrees(residual):
            # Something changes the queue without telling the stream (a script that does not
            # append, a hand edit, an older release in a rolling deploy): matching goes on with
            # what was read (commits re-check every player), and the next full load waits, 1 s
            # doubling to a minute, instead of costing every tick a read of the whole queue.
            # Only that same difference waits: a new one (another change behind the stream's
            # back) is read at once, as ever.
            self._reload_wait_s = min(max(self._reload_wait_s * 2, 1.0), 60.0)
            self._reload_at = time.monotonic() + self._reload_wait_s
            self._after_load = residual
            _disagrees("%s: the queue changed outside the scripts during a load; the next "
                       "load in %.0f s at the earliest", self.name, self._reload_wait_s)
        log.info("%s: loaded %d queued players in %.0f ms", self.name, len(pool),
                 (time.monotonic() - started) * 1000)
        return sizes.now_ms

    async def _follow(self) -> ChangeBatch | None:
        """Apply the changes after the position until the stream has no more; the last read
        (with the queue's sizes after it), or None when the position is gone."""
        assert self.pool is not None
        while True:
            batch = await self.matches.changes(self.name, self.position, self.config.changes_chunk)
            if batch is None:
                return None
            try:
                found = self.pool.apply(batch.changes)
            except BaseException:
                self.pool = None  # half applied: never used, the next tick loads the queue
                raise
            for change in batch.changes:
                if isinstance(change, Added | Removed):
                    self.poison.pop(change.player, None)
            self.poison.update(dict.fromkeys(found))
            self.position = batch.position
            if batch.complete:
                return batch

    def _residual(self, sizes: ChangeBatch) -> tuple[int, int]:
        """How the queue's sizes differ from the pool's (0, 0 when they agree exactly)."""
        assert self.pool is not None
        check = self.pool.check()
        return sizes.queue_size - check.size - len(self.poison), sizes.graced - check.graced

    def _agrees(self, residual: tuple[int, int]) -> bool:
        queued, graced = residual
        # Poison players are not in the pool, so the ones in grace are not counted there.
        return queued == 0 and (graced == 0 or (bool(self.poison) and graced > 0))

    async def run(self, token: str) -> int:
        """One tick under ``token``'s lease; returns the number of matches committed."""
        started = time.monotonic()
        try:
            plans, poison = await self.plan()
            await self.remove_poison(poison)
            # Asked only when a match could form: a quiet mode costs no probe (and nobody in it
            # waits for a game server, so its gauge says not held).
            if not plans:
                self.export_held("")
                return 0
            if await self._held():
                return 0
            # The budget is the commit's: a long load (a new leader) still commits after it.
            return await self.commit(token, plans, time.monotonic())
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
        self.export_held(reason)
        return bool(reason)

    def export_held(self, reason: str) -> None:
        """`fastmatch_matching_held{mode,reason}`: 1 while players who could be matched wait
        for ``reason``. Only the leader checks the hold, so this is the one signal of a
        game-server outage that does not wait for a match to fail."""
        if reason == self._exported:
            return
        self._exported = reason
        for known in metrics.HOLD_REASONS:
            metrics.MATCHING_HELD.labels(self.name, known).set(1 if known == reason else 0)

    def step_down(self) -> None:
        """Leadership ended: the next leader checks (and exports) the hold itself."""
        self.held = ""
        self.export_held("")

    async def commit(self, token: str, plans: Sequence[MatchPlan], started: float) -> int:
        """Commit in fenced batches, a few in flight at once (Redis runs one while the next is
        prepared and sent), until done, fenced, the lease is gone or the budget is spent."""
        budget_s = self.config.tick_budget_ms / 1000
        committed = tried = 0
        fenced = False
        in_flight: deque[tuple[Sequence[MatchPlan], asyncio.Task[CommitResult]]] = deque()
        try:
            for batch in _batches(plans, self.config.commit_batch_players):
                if fenced or not self.lease.holds(token):
                    log.warning("%s: lease lost mid-tick; %d of %d matches left uncommitted",
                                self.name, len(plans) - tried, len(plans))
                    break
                if time.monotonic() - started > budget_s:
                    log.warning("%s: tick budget of %.0f ms spent; %d of %d matches wait for the "
                                "next tick", self.name, budget_s * 1000, len(plans) - tried, len(plans))
                    break
                tried += len(batch)
                in_flight.append((batch, asyncio.create_task(self._commit_batch(token, batch))))
                if len(in_flight) >= self.config.commits_in_flight:
                    done, fenced = await self._settle(in_flight.popleft(), fenced)
                    committed += done
            while in_flight:
                done, fenced = await self._settle(in_flight.popleft(), fenced)
                committed += done
        finally:
            for _, task in in_flight:  # cancelled mid-tick: the ids make a later retry safe
                task.cancel()
            # Batches that finished before a failure are recorded (metrics, poison), and the
            # others' exceptions are retrieved here rather than at garbage collection.
            left = await asyncio.gather(*(task for _, task in in_flight), return_exceptions=True)
            for (batch, _), result in zip(in_flight, left, strict=True):
                if isinstance(result, CommitResult) and not result.fenced:
                    self._record(result, {plan.match_id: plan for plan in batch})
        return committed

    async def _settle(
        self, sent: tuple[Sequence[MatchPlan], asyncio.Task[CommitResult]], fenced: bool,
    ) -> tuple[int, bool]:
        batch, task = sent
        result = await task
        if result.fenced:
            if not fenced:
                metrics.inc(metrics.COMMITS_FENCED, self.name)
                self.lease.lose()
                log.warning("%s: commit fenced: this worker is no longer the leader", self.name)
            return 0, True
        self._record(result, {plan.match_id: plan for plan in batch})
        if result.failure:
            raise StoreError(f"commit_matches failed after committing {len(result.committed)} "
                             f"matches: {result.failure}")
        return len(result.committed), fenced

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
        if result.skipped:
            # A player the pool holds may be gone from the queue (a ghost): a difference in
            # the sizes is read at once again, back-off or not.
            self._reload_at = 0.0
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
