"""End a match through finish_match.lua (which tells every player) and record the outcome."""

from __future__ import annotations

import logging

from server import metrics
from server.store.matches import FinishAction, FinishResult, LoadingStore

log = logging.getLogger(__name__)


class Outcomes:
    def __init__(self, loading: LoadingStore) -> None:
        self.loading = loading

    async def finish(
        self, mode: str, match_id: str, action: FinishAction, arg: str = "", arg2: str = ""
    ) -> FinishResult:
        """Apply ``action`` if the match's status still allows it; exactly one ending wins."""
        result = await self.loading.finish(mode, match_id, action, arg, arg2)
        if result.outcome != "done":
            log.debug("%s match %s: %s not applied (%s %s)", mode, match_id, action,
                      result.outcome, result.status)
            return result
        reason = result.reason or "none"
        metrics.MATCHES_ENDED.labels(mode, result.status, reason).inc()
        if result.status == "assigned":
            metrics.MATCHES_ASSIGNED.labels(mode).inc()
        log.info("%s match %s %s (%s)", mode, match_id, result.status, reason)
        for p in result.players:
            if p.what == "requeued":
                metrics.PLAYERS_REQUEUED.labels(mode, result.reason).inc()
            elif p.what in ("removed", "timed_out"):
                metrics.PLAYERS_REMOVED.labels(mode, result.reason).inc()
        return result
