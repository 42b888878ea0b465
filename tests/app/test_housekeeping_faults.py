"""A worker's liveness under faults that are not outages: a player record no script can read
in a dead worker's set, a dead worker's keys of the wrong type, a worker busy with calls, a
worker still starting. Real Redis throughout."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from server.app.housekeeping import REAP_RETRY_S
from server.app.worker import Worker
from server.config import RedisConfig
from server.store import keys
from server.store.client import RedisClient
from server.store.errors import StoreError, StoreUnavailable
from server.store.players import PlayerStore
from tests.conftest import make_config
from tests.helpers import TIMEOUT

# Its heartbeat TTL above 2 x interval + operation timeout (server/config.py), whatever the
# fast test settings say.
REAPER = {"server.heartbeat_ttl_s": 2.0, "matching.enabled": False}


@pytest.fixture
async def reaper(redis_url: str) -> AsyncIterator[Worker]:
    """A worker that is not started: its housekeeping steps run when the test calls them."""
    worker = Worker(make_config(**REAPER), redis_url, worker_id="reaper")
    yield worker
    await worker.client.close()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[RedisClient]:
    redis_client = RedisClient(redis_url, RedisConfig(operation_timeout_s=TIMEOUT))
    yield redis_client
    await redis_client.close()


async def dead_workers(admin: aioredis.Redis, *workers: str) -> None:
    """Registered with deadlines long past, in this order (the reapers' order)."""
    await admin.zadd(keys.workers(), {worker: i + 1 for i, worker in enumerate(workers)})


async def test_a_poison_record_does_not_stop_the_reaping_of_dead_workers(
    reaper: Worker, client: RedisClient, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The first dead worker's set names a player whose key is not a hash (written by hand):
    its detach fails with WRONGTYPE. Its other player is released all the same, the poison
    one leaves the set (its key is left as it is), and the worker is forgotten; the next dead
    worker is reaped in the same tick."""
    first = PlayerStore(client, "dead-1", resume_grace_ms=60_000)
    second = PlayerStore(client, "dead-2", resume_grace_ms=60_000)
    await first.attach("queued-1", "c1")
    assert (await first.enqueue("queued-1", "c1", "1v1", 1500, {})).outcome == "ok"
    await admin.set(keys.player("poison"), "not a hash")
    await admin.sadd(keys.worker_players("dead-1"), "poison")
    await second.attach("idle-2", "c2")
    await dead_workers(admin, "dead-1", "dead-2")
    with caplog.at_level(logging.WARNING, "server.app.housekeeping"):
        await reaper.housekeeper.tick()
    assert await admin.zscore(keys.grace("1v1"), "queued-1") is not None  # its resume grace
    assert await admin.hget(keys.player("queued-1"), "worker") is None
    assert await admin.exists(keys.player("idle-2")) == 0
    assert await admin.zrange(keys.workers(), 0, -1) == []  # both forgotten
    assert await admin.scard(keys.worker_players("dead-1")) == 0
    assert await admin.get(keys.player("poison")) == "not a hash"  # not ours to delete
    assert "player poison of dead worker dead-1" in caplog.text
    await reaper.housekeeper.tick()  # nothing left to do, nothing raised


async def test_a_dead_worker_that_cannot_be_reaped_waits_and_the_others_do_not(
    reaper: Worker, client: RedisClient, admin: aioredis.Redis
) -> None:
    """A dead worker whose player set is not a set: reaping it fails at once. The next dead
    worker is reaped anyway, and the broken one is not tried again at the next tick (a
    backoff), nor held against Redis (no outage: still ready, no reap hold)."""
    later = PlayerStore(client, "dead-later", resume_grace_ms=60_000)
    await later.attach("idle", "c1")
    await admin.set(keys.worker_players("dead-broken"), "not a set")
    await dead_workers(admin, "dead-broken", "dead-later")
    housekeeper = reaper.housekeeper
    await housekeeper.tick()
    assert await admin.exists(keys.player("idle")) == 0
    assert await admin.zrange(keys.workers(), 0, -1) == ["dead-broken"]
    _, backoff, _ = housekeeper._reap_retry["dead-broken"]
    assert backoff == REAP_RETRY_S  # the first step of the backoff


async def test_an_error_redis_answers_is_no_outage(reaper: Worker, admin: aioredis.Redis) -> None:
    """A housekeeping step failing on an error Redis answered with (here a mode's grace ZSET
    that is not one) is logged: the worker stays ready, and reaping is not held back as it
    is after Redis could not be reached."""
    housekeeper = reaper.housekeeper
    reaper.front.ready = True
    await admin.set(keys.grace("1v1"), "not a zset")

    async def once() -> None:
        housekeeper._closing = True  # _every ends after this step
        await housekeeper.tick()

    with pytest.raises(StoreError) as failed:
        await housekeeper.tick()
    assert not isinstance(failed.value, StoreUnavailable)
    async with asyncio.timeout(TIMEOUT):
        await housekeeper._every(0, once)
    assert reaper.front.ready
    assert housekeeper._reap_from == 0.0


async def test_a_call_refused_while_redis_answers_is_no_outage(
    reaper: Worker, admin: aioredis.Redis
) -> None:
    """A housekeeping call that fails while the breaker stays closed (here the worker's own
    back-pressure, redis.max_inflight; a timeout under load looks the same) is one failed call,
    not an outage: the worker stays ready and reaping is not held for a minute, just when a
    dead worker's players need their grace."""
    housekeeper, client = reaper.housekeeper, reaper.client
    reaper.front.ready = True
    await client.command("PING")  # connected
    client.max_inflight = 1
    block = keys.player("blocker")
    blocked = asyncio.create_task(client.command("BLPOP", block, 0))  # until the test pushes

    async def once() -> None:
        housekeeper._closing = True  # _every ends after this step
        await housekeeper.tick()

    try:
        async with asyncio.timeout(TIMEOUT):
            while client._conn is None or client._conn.in_flight < 1:
                await asyncio.sleep(0.001)
        with pytest.raises(StoreUnavailable):
            await housekeeper.tick()  # refused: the cap
        async with asyncio.timeout(TIMEOUT):
            await housekeeper._every(0, once)
        assert client.breaker.closed
        assert reaper.front.ready
        assert housekeeper._reap_from == 0.0
    finally:
        await admin.rpush(block, "x")
        await asyncio.gather(blocked, return_exceptions=True)


async def test_a_busy_workers_heartbeat_is_not_refused_locally(
    redis_url: str, admin: aioredis.Redis
) -> None:
    """Past redis.max_inflight calls awaiting replies, a worker's calls fail at once (its own
    back-pressure), but not its heartbeat: refused, the worker would be reaped by the others
    under its live players."""
    busy = RedisClient(redis_url, RedisConfig(operation_timeout_s=TIMEOUT, max_inflight=1))
    store = PlayerStore(busy, "busy", resume_grace_ms=1000)
    await busy.command("PING")  # connected
    block = keys.player("blocker")
    blocked = asyncio.create_task(busy.command("BLPOP", block, 0))  # until the test pushes
    beat = None
    try:
        async with asyncio.timeout(TIMEOUT):
            while busy._conn is None or busy._conn.in_flight < 1:
                await asyncio.sleep(0.001)
        with pytest.raises(StoreUnavailable, match="in flight"):
            await busy.command("PING")  # the cap itself still holds
        beat = asyncio.create_task(store.heartbeat(60_000))
        async with asyncio.timeout(TIMEOUT):
            while busy._conn.in_flight < 2 and not beat.done():
                await asyncio.sleep(0.001)
        assert not beat.done()  # sent, waiting behind the BLPOP (replies come in order)
        await admin.rpush(block, "x")
        async with asyncio.timeout(TIMEOUT):
            await blocked
            assert (await beat).deadline_ms > 0
        assert await admin.zscore(keys.workers(), "busy") is not None
    finally:
        await busy.close()
        await asyncio.gather(blocked, *([beat] if beat else []), return_exceptions=True)


def test_a_starting_worker_reports_a_live_loop_from_its_first_import(tmp_path: Path) -> None:
    """fastmatch_event_loop_alive_timestamp_seconds is the host's oldest worker stamp: a
    worker process reads 0 (1970) there until its loop stamps it, unless the stamp comes with
    the declaration. A process that has only imported the worker's module (what a spawned
    worker does first) already stamps a recent time, read as the supervisor's /metrics
    reads it."""
    before = time.time()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", "import server.app.worker"], env=env, check=True,
                   timeout=TIMEOUT * 6)
    after = time.time()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    value = registry.get_sample_value("fastmatch_event_loop_alive_timestamp_seconds")
    assert value is not None and before <= value <= after
