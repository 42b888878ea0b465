"""Periodic upkeep every worker runs: heartbeat, resume-grace expiry, reaping dead workers.

Every step is an idempotent script, so any number of workers may run it at once; the results
never depend on which worker gets there first (DESIGN "Failure handling": worker death).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from server.aio import raise_if_cancelling
from server.store import keys
from server.store.errors import StoreError
from server.store.players import PlayerStore
from server.transport.connection import ClientConnection
from server.transport.frontend import FrontEnd
from server.transport.services import MatchEvents

log = logging.getLogger(__name__)


class Housekeeper:
    def __init__(
        self, store: PlayerStore, front: FrontEnd, events: MatchEvents, modes: Iterable[str], *,
        interval_s: float, heartbeat_ttl_s: float, audit_interval_s: float = 30.0,
        reap_hold_s: float = 0.0,
    ) -> None:
        """``reap_hold_s``: after this worker could not reach Redis, it reaps nobody for this
        long once it can again. An outage (a Sentinel failover, a restart) stops every worker's
        heartbeat, not only a dead one's: the live ones must get the time to notice Redis is
        back (their breaker's next probe) and heartbeat again, or each would reap the others
        and put every player of theirs in the resume grace."""
        self.store = store
        self.events = events
        self.front = front
        self.modes = sorted(modes)
        self.interval = interval_s
        self.ttl_ms = int(heartbeat_ttl_s * 1000)
        self.audit_interval_s = audit_interval_s
        self._audit_at = 0.0
        self.reap_hold_s = reap_hold_s
        self._reap_from = 0.0  # loop time: no reaping before (set by an unreachable Redis)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="housekeeping")

    async def close(self) -> None:
        self._closing = True  # ends the loop even if a library swallowed the cancellation
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self.tick()
            except StoreError as exc:
                raise_if_cancelling()
                self._reap_from = asyncio.get_running_loop().time() + self.reap_hold_s
                if self.front.ready:
                    log.warning("storage unavailable, not ready: %s", exc)
                self.front.ready = False
            except Exception:  # task boundary: log and keep the loop alive
                raise_if_cancelling()
                log.exception("housekeeping tick failed")
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        await self.store.heartbeat(self.ttl_ms)
        if not self.front.ready:
            log.info("storage reachable, ready")
        self.front.ready = True
        if self.front.pending_detach:
            holders = self.front.holders()
            for player, conn in list(self.front.pending_detach):
                await self.front.settle_ended(player, conn, holders)
        for mode in self.modes:
            await self.expire_grace(mode)
        loop = asyncio.get_running_loop()
        if loop.time() >= self._reap_from:
            for worker_id in await self.store.due(keys.workers()):
                if worker_id != self.store.worker_id:
                    await self.reap(worker_id)
        if self.audit_interval_s and loop.time() >= self._audit_at:
            self._audit_at = loop.time() + self.audit_interval_s
            await self.audit()

    async def audit(self) -> int:
        """Release records Redis says this worker holds but no connection of its own has (an
        outcome lost and never settled, whatever the cause): DESIGN invariant 6 must hold even
        after a bug. Players still attaching are registered first, so they are never taken."""
        players = await self.store.worker_members(self.store.worker_id)
        live = self.front.connections
        released = 0
        front = self.front
        held: dict[str, ClientConnection] | None = None  # player -> its connection here
        for player, (worker, conn) in zip(players, await self.store.owners(players), strict=True):
            # Looked at now, after the read: a connection lost meanwhile is already releasing.
            settling = (player, conn) in front.detaching or (player, conn) in front.pending_detach
            if (worker == self.store.worker_id and conn in live) or settling:
                continue  # served, or its connection's own detach is on its way
            if held is None:
                held = {c.player_id: c for c in live.values()}
            holder = held.get(player)
            ours = worker == self.store.worker_id
            if holder is not None and (not conn or (ours and not holder.open)):
                # No record, but a live connection of the player: Redis lost it and that
                # connection is attaching again. A detach of "any connection of this worker"
                # (what an empty conn means) could release the record it is writing. Or an
                # ended connection of ours while the player's next one is still attaching:
                # that attach settles the record.
                continue
            # An ended connection of ours: a live connection of the player here takes the
            # record back (settle_ended). Not ours any more (another worker, no record, or
            # released since the read) makes the detach "stale": it only drops the player
            # from our set, and says nothing.
            outcome = (await front.settle_ended(player, conn, held) if ours
                       else await front.detach(player, conn))
            if outcome == "taken":
                log.warning("audit: %s was recorded on connection %s, which ended; its "
                            "connection %s took it back", player, conn, held[player].conn_id)
            elif outcome not in ("stale", ""):
                log.warning("audit: released %s, recorded on connection %s, which this worker "
                            "does not hold", player, conn)
                released += 1
        return released

    async def expire_grace(self, mode: str) -> int:
        removed = 0
        for player in await self.store.due(keys.grace(mode)):
            if await self.store.expire_grace(player, mode):
                log.info("resume grace over for %s in %s: ticket removed", player, mode)
                removed += 1
        return removed

    async def reap(self, worker_id: str) -> None:
        """A worker missed its heartbeat: its players get the resume grace, then it is forgotten."""
        players = await self.store.worker_members(worker_id)
        log.warning("worker %s is gone; releasing %d players", worker_id, len(players))
        for player in players:
            result = await self.store.detach(player, "", worker_id)
            if result.outcome == "loading" and result.match_id:
                try:
                    await self.events.left_loading(result.mode, result.match_id, player, shutdown=False)
                except StoreError as exc:  # recorded by the detach: the mode's leader cancels it
                    log.warning("match %s of %s left to its leader: %s", result.match_id, player, exc)
        await self.store.forget_worker(worker_id)
