"""A fenced leader lease for one game mode (DESIGN "Leader", invariant 3).

The holder keeps a local validity deadline measured from *before* each acquire or renew call,
shortened by a safety margin for clock drift, so it stops acting before Redis could let another
worker take over. Commits are fenced by the lease token on top of that.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from server.store.matches import MatchStore, lease_token

_SAFETY: Final = 0.8  # act on at most 80% of the TTL


class Lease:
    def __init__(
        self, matches: MatchStore, mode: str, holder: str, ttl_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.matches = matches
        self.mode = mode
        self.holder = holder
        self.ttl_ms = ttl_ms
        self.clock = clock
        self.token: str | None = None
        self.epoch = 0
        self._valid_until = 0.0

    def holds(self, token: str | None = None) -> bool:
        """True while the lease (this exact one, when ``token`` is given) is safely ours."""
        if self.token is None or (token is not None and token != self.token):
            return False
        if self.clock() >= self._valid_until:
            self.token = None
            return False
        return True

    async def acquire(self) -> bool:
        started = self.clock()
        grant = await self.matches.acquire(self.mode, self.holder, self.ttl_ms)
        if not grant.held:
            self.token = None
            return False
        self.epoch = grant.epoch
        self.token = lease_token(self.holder, grant.epoch)
        self._valid_until = started + self.ttl_ms * _SAFETY / 1000
        return True

    async def renew(self) -> bool:
        if self.token is None:
            return False
        started = self.clock()
        if await self.matches.renew(self.mode, self.token, self.ttl_ms):
            self._valid_until = started + self.ttl_ms * _SAFETY / 1000
            return True
        self.lose()
        return False

    def lose(self) -> None:
        self.token = None

    async def release(self) -> None:
        token, self.token = self.token, None
        if token is not None:
            await self.matches.release(self.mode, token)
