"""End a match through finish_match.lua (which tells every player) and record the outcome."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from server import metrics
from server.store.matches import FinishAction, FinishResult, LoadingStore

log = logging.getLogger(__name__)


class Outcomes:
    def __init__(self, loading: LoadingStore) -> None:
        self.loading = loading

    async def finish(
        self, mode: str, match_id: str, action: FinishAction, arg: str = "", arg2: str = "",
        players: Sequence[str] | None = None,
    ) -> FinishResult:
        """Apply ``action`` if the match's status still allows it; exactly one ending wins."""
        result = await self.loading.finish(mode, match_id, action, arg, arg2, players)
        if result.outcome != "done":
            log.debug("%s match %s: %s not applied (%s %s)", mode, match_id, action,
                      result.outcome, result.status)
            return result
        reason = result.reason or "none"
        metrics.inc(metrics.MATCHES_ENDED, mode, result.status, reason)
        if result.status == "assigned":
            metrics.inc(metrics.MATCHES_ASSIGNED, mode)
        log.info("%s match %s %s (%s)", mode, match_id, result.status, reason)
        for p in result.players:
            if p.what == "requeued":
                metrics.inc(metrics.PLAYERS_REQUEUED, mode, result.reason)
            elif p.what in ("removed", "timed_out"):
                metrics.inc(metrics.PLAYERS_REMOVED, mode, result.reason)
        return result
