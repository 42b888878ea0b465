"""Hand a ready match to a game server (PROTOCOL 7) and watch game-server health (DESIGN P1)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from server import metrics
from server.config import GameServerConfig
from server.logthrottle import Throttled
from server.matching import tickets
from server.protocol import gameserver as gs
from server.protocol.results import ReadyResult
from server.store.errors import StoreError, StoreUnavailable
from server.store.matches import LoadingStore
from server.store.players import PlayerStore

log = logging.getLogger(__name__)
# Redis down: every handoff in flight fails alike, and its ending cannot be written either; the
# match keeps its allocation deadline in the loading set, where the mode's leader ends it.
_unpublished = Throttled(log, "battle requests not published, storage unavailable")
_unended = Throttled(log, "handoffs not ended, storage unavailable; their deadline ends them")
_assign_retry = Throttled(log, "assignments not written yet, storage unavailable; retrying")
# A game server's answer in hand when the worker shuts down: its assignment (one script call)
# is waited for this long rather than cancelled, which would requeue a match a server took.
_ANSWERED_WAIT_S = 2.0
# After a request that reached no game server, how often the worker looks whether one listens
# again: a worker that sends no request for hours must not report the fleet down all that time.
HEALTH_RECHECK_S = 2.0
# Retrying the write of an assignment while Redis is unavailable: from this pause, doubling.
_ASSIGN_RETRY_S = 0.05


class HealthMonitor:
    """PUBLISH receiver count 0 is a miss. After ``critical_after`` misses in a row a CRITICAL
    line, at most every ``interval_s``; recovery is logged with how long it was down."""

    def __init__(self, critical_after: int = 10, interval_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.critical_after = critical_after
        self.interval_s = interval_s
        self.clock = clock
        self.consecutive = 0
        self.down_since: float | None = None
        self._last_critical = -math.inf
        metrics.GAME_SERVER_AVAILABLE.set(1)

    def observe(self, receivers: int) -> None:
        if receivers > 0:
            self.listening()
            return
        self.consecutive += 1
        metrics.inc(metrics.GAME_SERVER_MISSES)
        metrics.GAME_SERVER_AVAILABLE.set(0)
        if self.down_since is None:
            self.down_since = self.clock()
        now = self.clock()
        if self.consecutive >= self.critical_after and now - self._last_critical >= self.interval_s:
            self._last_critical = now
            log.critical("no game server has received the last %d battle requests (%.0fs); "
                         "matches are being requeued", self.consecutive, now - self.down_since)

    def listening(self) -> None:
        """A game server received a request, or is seen listening again (Allocator's recheck)."""
        if self.down_since is not None:
            log.info("game servers are back after %.1fs (%d requests found none)",
                     self.clock() - self.down_since, self.consecutive)
            metrics.GAME_SERVER_AVAILABLE.set(1)
        self.consecutive, self.down_since = 0, None


class Allocator:
    """Publishes battle requests and waits for the answer on this worker's reply channel."""

    def __init__(self, store: PlayerStore, loading: LoadingStore, config: GameServerConfig,
                 reply_channel: str) -> None:
        self.store = store
        self.loading = loading
        self.config = config
        self.reply_channel = reply_channel
        self.health = HealthMonitor(config.misses_before_critical, config.critical_interval_s)
        self._pending: dict[str, asyncio.Future[gs.BattleReply]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by match id
        self._modes: dict[str, str] = {}
        self._active: set[str] = set()  # match ids handed off (or requeued) by a task now
        self._closing = False
        self._bound: asyncio.AbstractEventLoop | None = None
        self._rechecking: asyncio.Task[None] | None = None

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once: asyncio.get_running_loop() (and create_task,
        timeout_at, which call it) makes a getpid() system call on Python 3.11, several per
        match on this path."""
        if self._bound is None:
            self._bound = asyncio.get_running_loop()
        return self._bound

    def start(self, mode: str, match_id: str, ready: ReadyResult) -> None:
        if match_id in self._active:
            return  # a repeated ready (lua/ready.lua): this handoff runs already
        self._active.add(match_id)
        work = self._requeue(mode, match_id, ready) if self._closing else self.allocate(mode, match_id, ready)
        loop = self._loop
        task = loop.create_task(self._owned(work, mode, match_id), name=f"allocate:{match_id}")
        self._tasks[match_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(match_id, None))
        # Kept past the handoff's own end, to its deadline: a handoff that ended without an
        # outcome (Redis failed at assign) leaves the match `allocating`, and a repeated ready
        # then must not publish a second request for the same match.
        loop.call_later(
            self.config.allocation_timeout_ms / 1000 + 1.0, self._active.discard, match_id)

    @staticmethod
    async def _owned(work: Coroutine[Any, Any, None], mode: str, match_id: str) -> None:
        try:
            await work
        except StoreUnavailable as exc:
            _unended("%s match %s: %s", mode, match_id, exc)
        except Exception:  # task boundary: a bug (or a reply not understood), not an outage
            log.exception("%s match %s: handoff failed; its deadline ends it", mode, match_id)

    async def _requeue(self, mode: str, match_id: str, ready: ReadyResult) -> None:
        """A handoff that would start while the worker shuts down: nobody would own it."""
        players = [p for team in ready.teams for p in team]
        await self.loading.fail(mode, match_id, "server_shutdown", players)

    async def allocate(self, mode: str, match_id: str, ready: ReadyResult) -> None:
        metrics.observe(metrics.LOADING_SECONDS, max(
            ready.deadline_ms - self.config.allocation_timeout_ms - ready.created_ms, 0) / 1000, mode)
        players = [p for team in ready.teams for p in team]
        request = gs.BattleRequest(
            match_id=match_id, game_mode=mode, teams=ready.teams,
            players={p: _player_info(t) for p, t in ready.tickets.items()},
            reply_to=self.reply_channel, deadline_ms=ready.deadline_ms,
        )
        loop = self._loop
        # The match's handoff deadline is all-ready + allocation_timeout_ms, which is about now:
        # the wait for the answer ends there, however long the publish itself took.
        until = loop.time() + self.config.allocation_timeout_ms / 1000
        future: asyncio.Future[gs.BattleReply] = loop.create_future()
        self._pending[match_id] = future
        self._modes[match_id] = mode
        try:
            try:
                receivers: int | None = await self.store.publish(
                    self.config.request_channel, gs.encode(request))
            except StoreError as exc:
                _unpublished("%s match %s: %s", mode, match_id, exc)
                if not (isinstance(exc, StoreUnavailable) and exc.maybe_ran):
                    await self.loading.fail(mode, match_id, "allocation_failed", players)
                    return
                # The request may have reached a game server, whose answer is on its way:
                # failing now would requeue players a server is about to host (and drop its
                # battle_assigned as unknown). Wait for it as for any request.
                receivers = None
            if receivers is not None:
                self.health.observe(receivers)
                if receivers == 0:
                    self._recheck_health()
                    await self.loading.fail(mode, match_id, "no_game_server", players)
                    return
            # A timer on the future itself rather than asyncio.timeout_at, which asks for the
            # running loop twice (two getpid() system calls on Python 3.11) every match.
            timer = loop.call_at(until, _expire, future)
            try:
                reply = await future
            except TimeoutError:
                log.warning("%s match %s: no game server answer in time", mode, match_id)
                await self.loading.fail(mode, match_id, "allocation_failed", players)
                return
            finally:
                timer.cancel()
            if isinstance(reply, gs.BattleAssigned):
                await self._assign(mode, match_id, reply, players, until + 1.0)
            else:
                log.info("%s match %s rejected by game server: %s", mode, match_id, reply.reason)
                await self.loading.fail(mode, match_id, "allocation_failed", players)
        finally:
            self._pending.pop(match_id, None)
            self._modes.pop(match_id, None)

    async def _assign(self, mode: str, match_id: str, reply: gs.BattleAssigned,
                      players: list[str], until: float) -> None:
        """A game server took the match: write that, retrying while Redis is unavailable (until
        a little past the handoff's deadline). Given up at the first failure, the match would
        end `allocation_failed` at its deadline and be requeued, while the server holds a
        session for it. Retrying is safe: an assignment that did run answers `final`, and the
        sweep's expiry, if it comes first, is the one outcome (its notices go out as ever)."""
        loop = self._loop
        pause = _ASSIGN_RETRY_S
        while True:
            try:
                await self.loading.assign(mode, match_id, reply.server_address,
                                         reply.server_session_id, players)
                return
            except StoreUnavailable as exc:
                # Refused before sending (the breaker open): no sooner than it says.
                wait = pause if exc.maybe_ran else max(pause, exc.retry_after_ms / 1000)
                if loop.time() + wait > until:
                    raise
                _assign_retry("%s match %s: %s", mode, match_id, exc)
            await asyncio.sleep(wait)
            pause = min(pause * 2, 1.0)

    def answered(self, match_id: str) -> bool:
        """A game server took ``match_id`` and this worker is writing that (or will): its end
        is the assignment's, not a drain's (LoadingEvents.left_loading)."""
        future = self._pending.get(match_id)
        return (future is not None and future.done() and not future.cancelled()
                and future.exception() is None  # its deadline passed (_expire): no answer
                and isinstance(future.result(), gs.BattleAssigned))

    def _recheck_health(self) -> None:
        if self._rechecking is None or self._rechecking.done():
            self._rechecking = self._loop.create_task(self._until_listened(), name="health-recheck")

    async def _until_listened(self) -> None:
        """While the health monitor says no game server listens, look every HEALTH_RECHECK_S
        (one PUBSUB NUMSUB, off the players' path): the gauge and the console then follow the
        fleet, not this worker's last request, which may be hours old on a quiet worker."""
        while self.health.down_since is not None and not self._closing:
            await asyncio.sleep(HEALTH_RECHECK_S)
            try:
                if self.health.down_since is not None and await self.store.listening(
                        self.config.request_channel):
                    self.health.listening()
            except StoreError:
                pass  # Redis is failing: the next look, or the next request, tells

    def on_reply(self, data: bytes) -> None:
        try:
            reply = gs.decode_reply(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("dropping malformed game-server reply %r: %s", data[:200], exc)
            return
        future = self._pending.get(reply.match_id)
        if future is None or future.done():
            log.info("late or unknown game-server reply for match %s", reply.match_id)
            return
        future.set_result(reply)

    async def close(self) -> None:
        """Shutdown: requeue the matches still waiting for a game server (server_shutdown)."""
        self._closing = True
        if self._rechecking is not None:
            self._rechecking.cancel()
            await asyncio.gather(self._rechecking, return_exceptions=True)
        # A handoff with the game server's answer in hand is left to write it: cancelled, it
        # would be requeued below while the server hosts it (and its players would be matched
        # again elsewhere).
        answered = {match_id: task for match_id, task in self._tasks.items()
                    if self.answered(match_id)}
        if answered:
            await asyncio.wait(answered.values(), timeout=_ANSWERED_WAIT_S)
        # Still writing its answer after that: not requeued here either (a server took it);
        # the leader's sweep ends it at its deadline if the write never lands.
        waiting = {m: mode for m, mode in self._modes.items() if m not in answered}
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for match_id, mode in waiting.items():
            try:
                await self.loading.fail(mode, match_id, "server_shutdown")
            except StoreError as exc:
                log.warning("match %s left to the sweeper: %s", match_id, exc)


def _player_info(raw: bytes) -> gs.PlayerInfo:
    """The claims the player's token gave it, back from its ticket (PROTOCOL 7 `players`)."""
    try:
        ticket = tickets.decode(raw)
    except ValueError:
        return gs.PlayerInfo(mmr=0.0)
    return gs.PlayerInfo(mmr=ticket.rating, attrs=ticket.attrs)


def _expire(future: asyncio.Future[gs.BattleReply]) -> None:
    """The handoff's deadline: the wait for the game server's answer ends (TimeoutError)."""
    if not future.done():
        future.set_exception(TimeoutError())
