"""Ready-check services: what the front end reports, and the leader's deadline sweeper."""

from __future__ import annotations

import logging

from server import metrics
from server.app.handoff import Allocator
from server.logthrottle import Throttled
from server.protocol.results import ReadyResult
from server.store.errors import StoreUnavailable
from server.store.matches import LoadingStore

log = logging.getLogger(__name__)
# Every tick meets the same bad record again: one line per interval, with the count.
_sweep_failed = Throttled(log, "sweeping a match failed", level=logging.ERROR)


class LoadingEvents:
    """The app side of ``transport.services.MatchEvents``."""

    def __init__(self, loading: LoadingStore, allocator: Allocator) -> None:
        self.loading = loading
        self.allocator = allocator

    def all_ready(self, mode: str, match_id: str, ready: ReadyResult) -> None:
        self.allocator.start(mode, match_id, ready)

    async def left_loading(self, mode: str, match_id: str, player: str, shutdown: bool) -> None:
        if shutdown and self.allocator.answered(match_id):
            # The drain closes the players of a match a game server has just taken, whose
            # assignment this worker is writing: that is its end (the players hear
            # match_found when they reconnect), not a requeue while the server hosts it.
            return
        await self.loading.cancel(mode, match_id, player, shutdown=shutdown)

    def enqueue_blocked(self, mode: str) -> None:
        metrics.inc(metrics.PLAYERS_BLOCKED, mode)


class Sweeper:
    """Ends matches past their deadline (a ready check nobody finished, or a handoff whose
    worker died): run by the mode's leader every tick. Safe anywhere: the script re-checks."""

    def __init__(self, mode: str, loading: LoadingStore) -> None:
        self.mode = mode
        self.loading = loading

    async def run(self) -> int:
        ended = 0
        for match_id in await self.loading.due(self.mode):
            try:
                result = await self.loading.expire(self.mode, match_id)
            except StoreUnavailable:
                raise  # Redis is down: the next tick sweeps again
            except Exception as exc:  # one bad record (DESIGN P1): the others still end
                _sweep_failed("%s match %s: expiring it failed: %s", self.mode, match_id, exc)
                continue
            ended += result.outcome == "done"
        # Leavers whose own worker did not get to cancel their match (issue 13).
        for match_id, player, action in await self.loading.left_due(self.mode):
            try:
                result = await self.loading.cancel(self.mode, match_id, player,
                                                   shutdown=action == "abort")
            except StoreUnavailable:
                raise
            except Exception as exc:
                _sweep_failed("%s match %s: cancelling it for %s failed: %s", self.mode, match_id,
                              player, exc)
                continue
            if result.outcome == "done":
                log.warning("%s match %s: cancelled for %s, who left its ready check, on behalf "
                            "of a worker that could not", self.mode, match_id, player)
                ended += 1
        return ended
