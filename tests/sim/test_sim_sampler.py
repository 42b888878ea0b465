"""The run's sampler (server CPU, Redis command rate) ends when the run does."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from server.config import DEV_SECRET
from server.sim.playing import SimSettings
from server.sim.runner import RunConfig, RunResult, _sample
from tests.helpers import TIMEOUT, eventually


@contextlib.asynccontextmanager
async def sampling(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, RunResult,
                                                           asyncio.Event, asyncio.Task[None]]]:
    """A run's sampler on ``redis_url`` (no players): Redis, the result it fills, its stop
    event and its task; stopped and cancelled afterwards."""
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    settings = SimSettings(url="ws://127.0.0.1:1/ws", secret=DEV_SECRET)
    result = RunResult(RunConfig(settings=settings, redis_url=redis_url, rate=1, duration_s=1, mix={}))
    stop = asyncio.Event()
    task = asyncio.create_task(_sample(admin, result, time.monotonic(), stop))
    try:
        yield admin, result, stop, task
    finally:
        stop.set()
        task.cancel()
        await admin.aclose()


async def _sampled(result: RunResult, n: int) -> bool:
    return len(result.redis_ops) >= n  # each needs two reads of Redis' counters


async def test_the_sampler_ends_on_stop_without_being_cancelled(redis_url: str) -> None:
    # A cancellation landing inside a redis-py call once came out as an ordinary error, which
    # the sampler ignores: the run then sampled forever instead of reporting. Its loop now
    # ends on the run's stop event, whatever happens to a cancellation.
    async with sampling(redis_url) as (_, result, stop, task):
        await eventually(functools.partial(_sampled, result, 1))
        stop.set()
        await asyncio.wait_for(asyncio.shield(task), 5)  # not cancelled: it returns by itself
        assert not task.cancelled() and task.exception() is None


async def test_a_counter_that_starts_over_gives_no_negative_rate(redis_url: str) -> None:
    """A Redis restart resets total_commands_processed (CONFIG RESETSTAT does the same): the
    interval across it has no rate, and used to count a large negative one into the mean."""
    async with sampling(redis_url) as (admin, result, _, _task):
        for _ in range(200):  # commands enough that the count read after the reset is lower
            await admin.ping()
        await eventually(functools.partial(_sampled, result, 1))
        await admin.config_resetstat()
        # Reads of the counters after the reset: the one across it (left out), then two more
        # (one read in flight as the reset ran may come first, before it).
        await eventually(functools.partial(_sampled, result, len(result.redis_ops) + 2), TIMEOUT * 3)
        assert all(rate >= 0 for _, rate in result.redis_ops), result.redis_ops
