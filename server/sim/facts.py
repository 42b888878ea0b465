"""What a simulated player may look up beyond its own connection, to tell a legitimate surprise
from a lost ticket: the faults applied so far, and a few reads of the server's Redis."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from server.store import keys, sentinel

_READ_TIMEOUT_S = 5.0  # a frozen Redis answers when it thaws; a fault lasts less than this


@dataclass
class Facts:
    redis_url: str = ""
    mode: str = "1v1"
    data_lost_at: list[float] = field(default_factory=list)  # run times of restarts that lost data
    _redis: aioredis.Redis | None = None

    def data_lost_between(self, start: float, end: float) -> bool:
        return any(start <= t <= end for t in self.data_lost_at)

    async def penalised(self, player: str) -> bool | None:
        """Has this player a dodge on record (it walked out of a ready check)? None: unknown."""
        with contextlib.suppress(aioredis.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(_READ_TIMEOUT_S):
                return bool(await self._client().zcard(keys.penalty(player)))
        return None

    async def match_status(self, session: str) -> str:
        """How a loading session ended, from its record (kept ``finished_match_ttl_ms``)."""
        with contextlib.suppress(aioredis.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(_READ_TIMEOUT_S):
                status = await self._client().hget(keys.match(self.mode, session), "status")
                return str(status or "gone")
        return "unknown"

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            if not self.redis_url:
                raise aioredis.RedisError("no redis url")
            self._redis = sentinel.async_client(self.redis_url, decode_responses=True)
        return self._redis

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
