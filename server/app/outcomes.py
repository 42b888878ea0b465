"""What every match ending records: metrics and one log line (LoadingStore's EndingObserver;
INFO except for the routine `assigned`, at DEBUG)."""

from __future__ import annotations

import logging

from server import metrics
from server.store.matches import FinishAction, FinishResult

log = logging.getLogger(__name__)


class EndingMetrics:
    def ended(self, mode: str, match_id: str, action: FinishAction, result: FinishResult) -> None:
        if result.outcome != "done":
            log.debug("%s match %s: %s not applied (%s %s)", mode, match_id, action,
                      result.outcome, result.status)
            return
        reason = result.reason or "none"
        metrics.inc(metrics.MATCHES_ENDED, mode, result.status, reason)
        if result.status == "assigned":
            metrics.inc(metrics.MATCHES_ASSIGNED, mode)
        # The routine ending at DEBUG: a line per match would be hundreds a second at capacity
        # (and 5% of a worker's CPU); the metrics count them. The others are worth a line each.
        log.log(logging.DEBUG if result.status == "assigned" else logging.INFO,
                "%s match %s %s (%s)", mode, match_id, result.status, reason)
        for p in result.players:
            if p.what == "requeued":
                metrics.inc(metrics.PLAYERS_REQUEUED, mode, result.reason)
            elif p.what in ("removed", "timed_out"):
                metrics.inc(metrics.PLAYERS_REMOVED, mode, result.reason)
