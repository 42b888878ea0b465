"""What every connection of a worker shares, built once by the worker (server/app/worker.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from server.config import ModeConfig, ServerConfig
from server.protocol.auth import TokenVerifier
from server.protocol.results import ReadyResult
from server.protocol.session import Limits
from server.store.matches import LoadingStore
from server.store.players import PlayerStore


class MatchEvents(Protocol):
    """What the transport reports to the matchmaking services (implemented in server/app)."""

    def all_ready(self, mode: str, match_id: str, ready: ReadyResult) -> None:
        """Every player of the match is ready: start the game-server handoff (non-blocking)."""

    async def left_loading(self, mode: str, match_id: str, player: str, shutdown: bool) -> None:
        """A player's connection ended during its ready check: cancel the match. With
        ``shutdown`` the server closed it (draining): nobody is at fault, everyone requeued."""

    def enqueue_blocked(self, mode: str) -> None:
        """An enqueue was refused with player_blocked (for metrics)."""


@dataclass(frozen=True, slots=True)
class Services:
    config: ServerConfig
    modes: Mapping[str, ModeConfig]
    store: PlayerStore
    loading: LoadingStore
    events: MatchEvents
    verifier: TokenVerifier
    worker_id: str
    allocation_timeout_ms: int  # the handoff's deadline, written by the last ready check

    @property
    def limits(self) -> Limits:
        """PROTOCOL 5 budgets of each connection."""
        c = self.config
        return Limits(c.bad_message_budget, c.message_rate, c.message_burst, c.rate_limit_strikes)
