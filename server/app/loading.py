"""Ready-check services: what the front end reports, and the leader's deadline sweeper."""

from __future__ import annotations

import logging

from server import metrics
from server.app.handoff import Allocator
from server.protocol.results import ReadyResult
from server.store.matches import LoadingStore

log = logging.getLogger(__name__)


class LoadingEvents:
    """The app side of ``transport.services.MatchEvents``."""

    def __init__(self, loading: LoadingStore, allocator: Allocator) -> None:
        self.loading = loading
        self.allocator = allocator

    def all_ready(self, mode: str, match_id: str, ready: ReadyResult) -> None:
        self.allocator.start(mode, match_id, ready)

    async def left_loading(self, mode: str, match_id: str, player: str, shutdown: bool) -> None:
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
            result = await self.loading.expire(self.mode, match_id)
            ended += result.outcome == "done"
        # Leavers whose own worker did not get to cancel their match (issue 13).
        for match_id, player, action in await self.loading.left_due(self.mode):
            result = await self.loading.cancel(self.mode, match_id, player, shutdown=action == "abort")
            if result.outcome == "done":
                log.warning("%s match %s: cancelled for %s, who left its ready check, on behalf "
                            "of a worker that could not", self.mode, match_id, player)
                ended += 1
        return ended
