"""End a match through finish_match.lua and tell every player what happened to it."""

from __future__ import annotations

import logging

from server import metrics
from server.protocol.messages import Dequeued, Error, MatchFound, Requeued, ServerMessage
from server.store.matches import FinishAction, FinishResult, LoadingStore, PlayerOutcome
from server.transport.delivery import Outgoing, Publisher

log = logging.getLogger(__name__)


class Outcomes:
    def __init__(self, loading: LoadingStore, publisher: Publisher) -> None:
        self.loading = loading
        self.publisher = publisher

    async def finish(
        self, mode: str, match_id: str, action: FinishAction, arg: str = "", arg2: str = "",
        teams: list[list[str]] | None = None,
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
        await self.publisher.send(
            Outgoing(p.worker, p.player, p.conn,
                     self._message(mode, match_id, result.reason, p, arg, arg2, teams or []))
            for p in result.players
        )
        return result

    def _message(
        self, mode: str, match_id: str, reason: str, p: PlayerOutcome, arg: str, arg2: str,
        teams: list[list[str]],
    ) -> ServerMessage:
        if p.what == "requeued":
            metrics.PLAYERS_REQUEUED.labels(mode, reason).inc()
            return Requeued(game_mode=mode, reason=reason,  # type: ignore[arg-type]
                            queued_at_ms=p.queued_at_ms)
        if p.what == "matched":
            return MatchFound(loading_session_id=match_id, game_mode=mode, server_address=arg,
                              server_session_id=arg2, teams=teams)
        metrics.PLAYERS_REMOVED.labels(mode, reason).inc()
        if p.what == "timed_out":
            return Error(code="loading_timeout",
                         message="the ready check ended before this client loaded; removed from matchmaking")
        return Dequeued(game_mode=mode, reason="removed")
