"""Periodic upkeep every worker runs: heartbeat, resume-grace expiry, reaping dead workers.

Every step is an idempotent script, so any number of workers may run it at once; the results
never depend on which worker gets there first (DESIGN "Failure handling": worker death).

The heartbeat has a timer of its own: a reap or an expiry of thousands of players takes
seconds, and a heartbeat queued behind it would lapse, so that the live workers reaped each
other. A worker that did go silent past its deadline anyway (a stall, a paused VM) learns it
from its next heartbeat: the reapers stop at their next player (their detach sees it is alive
again) and it reads its players back, re-attaching whatever they had released.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from server.aio import in_batches, raise_if_cancelling
from server.logthrottle import Throttled
from server.store import keys
from server.store.client import as_str
from server.store.errors import StoreError, StoreUnavailable
from server.store.players import PlayerStore
from server.transport.connection import ClientConnection
from server.transport.frontend import FrontEnd
from server.transport.services import MatchEvents

log = logging.getLogger(__name__)
# Players released (or graces expired) at once: calls issued together leave in one write, so a
# dead worker's thousands of players take a few round trips each way, not thousands.
BATCH: Final = 64
# A dead worker that could not be reaped in full (a player record no script can read) is tried
# again after this long, doubling up to the maximum: not at every tick, and not in the way of
# the other dead workers.
REAP_RETRY_S: Final = 1.0
REAP_RETRY_MAX_S: Final = 60.0
_step_failed = Throttled(log, "housekeeping step failed", level=logging.ERROR)
_unreleased = Throttled(log, "players of a dead worker not released (retried later)")
_poison = Throttled(log, "unreadable player records dropped from a dead worker's players",
                    level=logging.ERROR)
_not_reaped = Throttled(log, "dead workers not reaped in full (retried later)")


class Housekeeper:
    def __init__(
        self, store: PlayerStore, front: FrontEnd, events: MatchEvents, modes: Iterable[str], *,
        interval_s: float, heartbeat_ttl_s: float, heartbeat_interval_s: float = 1.0,
        audit_interval_s: float = 30.0, reap_hold_s: float = 0.0,
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
        self.heartbeat_interval = heartbeat_interval_s
        self.ttl_ms = int(heartbeat_ttl_s * 1000)
        self._read_back_due = False  # a lapse (or a heartbeat with no answer) not yet read back
        self._reading_back = False
        self.audit_interval_s = audit_interval_s
        self._audit_at = 0.0
        self.reap_hold_s = reap_hold_s
        self._reap_from = 0.0  # loop time: no reaping before (set by an unreachable Redis)
        # Dead workers whose last reap was incomplete: (loop time of the next try, its backoff,
        # the players it still held at that try).
        self._reap_retry: dict[str, tuple[float, float, int | None]] = {}
        self._members_seen: dict[str, int] = {}  # players a reap found (read by _reap_due)
        self._tasks: list[asyncio.Task[None]] = []
        self._policy_checked = False  # since the last heartbeat that failed (maybe another node)
        self._checking_policy = False
        self._closing = False

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._every(self.heartbeat_interval, self.heartbeat),
                                               name="heartbeat"),
                           asyncio.create_task(self._every(self.interval, self.tick), name="housekeeping")]

    async def close(self) -> None:
        self._closing = True  # ends the loops even if a library swallowed the cancellation
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _check_eviction(self) -> None:
        """A Redis that evicts keys at its memory limit may drop a ready check's record or a
        player's in the middle of its lifecycle, which no script can put right: players stuck
        until their records expire, or told nothing. Said once per (re)connection; Redis'
        own default, `noeviction`, refuses writes instead (the breaker's business). Run
        beside the heartbeat, never on its timer (config: the heartbeat TTL's bound)."""
        try:
            policy = await self.store.client.maxmemory_policy()
        except StoreError:
            return  # asked again after the next heartbeat
        finally:
            self._checking_policy = False
        self._policy_checked = True
        if policy and policy != "noeviction":
            log.warning("redis maxmemory-policy is %s: at its memory limit Redis evicts keys, "
                        "and players in the middle of a lifecycle may be lost; set "
                        "maxmemory-policy noeviction (README \"Deployment\")", policy)

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while not self._closing:
            try:
                await step()
            except StoreUnavailable as exc:
                raise_if_cancelling()
                if self.store.client.breaker.closed:
                    # One call failed (a timeout under load, this worker's own back-pressure)
                    # while Redis answers the rest: no outage. (A lost heartbeat is covered
                    # by the TTL: config's bound.)
                    _step_failed("%s: %s", getattr(step, "__name__", step), exc)
                else:  # Redis unreachable: an outage, maybe everyone's
                    self._reap_from = asyncio.get_running_loop().time() + self.reap_hold_s
                    if self.front.ready:
                        log.warning("storage unavailable, not ready: %s", exc)
                    self.front.ready = False
            except StoreError as exc:
                # Redis answered with an error (a script's, a key of the wrong type, an ACL):
                # no outage, and no reason to hold every reap or leave the balancers' rotation.
                raise_if_cancelling()
                _step_failed("%s: %s", getattr(step, "__name__", step), exc)
            except Exception:  # task boundary: a bug; log it and keep the loop alive
                raise_if_cancelling()
                _step_failed("%s", getattr(step, "__name__", step), exc_info=True)
            # Call, then sleep: a heartbeat whose call failed after the operation timeout is
            # followed by the next one interval later (config: the heartbeat TTL's bound).
            await asyncio.sleep(interval)

    async def heartbeat(self) -> None:
        try:
            beat = await self.store.heartbeat(self.ttl_ms)
        except StoreError as exc:
            # It may have run, its answer lost (and with it the news of a lapse): read the
            # players back once a heartbeat succeeds again.
            self._read_back_due = True
            self._policy_checked = False
            if not isinstance(exc, StoreUnavailable) and self.front.ready:
                # Redis answers, but this worker's registration is not renewed: the others
                # would reap it under its players. Not ready (no reap hold: no outage).
                log.error("heartbeat failed, not ready: %s", exc)
                self.front.ready = False
            raise
        if not self.front.ready:
            log.info("storage reachable, ready")
        self.front.ready = True
        if not self._policy_checked and not self._checking_policy:
            self._checking_policy = True
            self.front.spawn(self._check_eviction())
        if beat.lapsed:
            # Silent past the TTL: others may have released some of its players (and, once
            # none was left, forgotten it). From now on their detaches refuse (it is alive
            # again); read back what they did.
            self._read_back_due = True
            if self.front.connections:
                log.warning("worker %s was silent past its heartbeat deadline; reading its "
                            "players back", self.store.worker_id)
        if self._read_back_due and not self._reading_back:
            self._reading_back = True
            self.front.spawn(self._read_back())

    async def _read_back(self) -> None:
        """Until it succeeds (a heartbeat retries it): the reaper took these players out of
        this worker's set, so neither the audit nor anything else would find them again."""
        # Cleared before the read: a lapse reported while it runs asks for another one.
        self._read_back_due = False
        try:
            if self.front.connections:
                await self.front.resync()
        except StoreError as exc:
            self._read_back_due = True
            log.warning("could not read the players back after a lapsed heartbeat (the next "
                        "heartbeat tries again): %s", exc)
        finally:
            self._reading_back = False

    async def tick(self) -> None:
        for worker, player, conn in list(self.front.pending_replace):
            await self.front.send_replace(worker, player, conn)
        if self.front.pending_detach:
            holders = self.front.holders()
            for player, conn in list(self.front.pending_detach):
                await self.front.settle_ended(player, conn, holders)
        for mode in self.modes:
            await self.expire_grace(mode)
        loop = asyncio.get_running_loop()
        if loop.time() >= self._reap_from:
            await self._reap_due(loop)
        if self.audit_interval_s and loop.time() >= self._audit_at:
            self._audit_at = loop.time() + self.audit_interval_s
            await self.audit()

    async def _reap_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reap every dead worker; one that cannot be reaped in full is tried again later, with
        a backoff, and is not in the way of the others (they come back in deadline order)."""
        due = [w for w in await self.store.due(keys.workers()) if w != self.store.worker_id]
        retry = {w: when for w, when in self._reap_retry.items() if w in due}
        self._reap_retry = retry
        for worker_id in due:
            if worker_id in retry and loop.time() < retry[worker_id][0]:
                continue
            try:
                done = await self.reap(worker_id)
            except StoreUnavailable as exc:
                if not self.store.client.breaker.closed:
                    raise  # an outage: _every holds every reap for a while
                # One call failed (a timeout under load, this worker's own back-pressure)
                # while Redis answers the rest: this worker is tried again soon.
                _not_reaped("worker %s: %s", worker_id, exc)
                done = False
            except Exception as exc:  # this worker's keys only: the others go on
                raise_if_cancelling()
                _not_reaped("worker %s: %s", worker_id, exc, exc_info=not isinstance(exc, StoreError))
                done = False
            seen = self._members_seen.pop(worker_id, None)
            if done:
                retry.pop(worker_id, None)
                continue
            _, backoff, before = retry.get(worker_id, (0.0, 0.0, None))
            # Doubling while nothing moves; back to the first step while players are released
            # (a failure of some of them must not slow the release of thousands).
            moved = before is None or seen is None or seen < before
            backoff = REAP_RETRY_S if moved else min(backoff * 2, REAP_RETRY_MAX_S)
            retry[worker_id] = (loop.time() + backoff, backoff, seen)

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
        async def expire(player: str) -> bool:
            if await self.store.expire_grace(player, mode):
                log.info("resume grace over for %s in %s: ticket removed", player, mode)
                return True
            return False

        return sum(await in_batches(await self.store.due(keys.grace(mode)), expire, BATCH))

    async def reap(self, worker_id: str) -> bool:
        """A worker missed its heartbeat: its players get the resume grace, then it is forgotten.
        Released as a drain would release them (``abort``): a worker that crashed is the
        server's fault, so a player of it in a ready check is not penalised, and the others of
        that match are requeued with ``server_shutdown``. Stops as soon as the worker turns
        out to be alive again (its heartbeat came back).

        A player whose release fails with an error of Redis' (not an outage) is logged and
        the others go on. Its record is not a hash (a key written by hand: poison, as
        lua/commit_matches.lua calls it): no script can ever release it, so it only leaves the
        worker's set, the key itself left as it is for an operator. Any other failure keeps
        the player in the set and the worker registered: False, and the caller tries again
        later. True once the worker is forgotten or found alive."""
        players = await self.store.worker_members(worker_id)
        self._members_seen[worker_id] = len(players)
        log.warning("worker %s is gone; releasing %d players", worker_id, len(players))

        async def release(player: str) -> str:
            try:
                result = await self.store.detach(player, "", worker_id, shutdown=True, reaping=True)
            except StoreUnavailable:
                raise
            except StoreError as exc:
                return "dropped" if await self._drop_poison(worker_id, player, exc) else "failed"
            if result.outcome == "loading" and result.match_id:
                try:
                    await self.events.left_loading(result.mode, result.match_id, player, shutdown=True)
                except StoreError as exc:  # recorded by the detach: the mode's leader ends it
                    log.warning("match %s of %s left to its leader: %s", result.match_id, player, exc)
            return result.outcome

        outcomes = await in_batches(players, release, BATCH, stop=lambda batch: "alive" in batch)
        if "alive" in outcomes:
            log.warning("worker %s is alive again; stopped releasing its players", worker_id)
            return True
        if failed := outcomes.count("failed"):
            _not_reaped("worker %s: %d of its players could not be released; it stays "
                        "registered and is tried again later", worker_id, failed)
            return False
        await self.store.forget_worker(worker_id, reaping=True)
        return True

    async def _drop_poison(self, worker_id: str, player: str, exc: StoreError) -> bool:
        """After ``player``'s detach failed: drop it from the dead worker's set if its record
        is not a hash (True); else log the failure (False: the player stays, retried later)."""
        key = keys.player(player)
        try:
            kind = as_str(await self.store.client.command("TYPE", key))
            if kind not in ("hash", "none"):
                await self.store.client.command("SREM", keys.worker_players(worker_id), player)
                _poison("player %s of dead worker %s: its record %s is a %s, not a hash, and "
                        "cannot be released; dropped from the worker's players, the key left "
                        "as it is (%s)", player, worker_id, key, kind, exc)
                return True
        except StoreUnavailable:
            raise
        except StoreError as other:
            exc = other
        _unreleased("player %s of dead worker %s: %s", player, worker_id, exc)
        return False

