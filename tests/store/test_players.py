"""Player and queue scripts against a real redis-server: invariants, timeouts, restarts."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time

import pytest
import redis.asyncio as aioredis

from server.config import RedisConfig
from server.store import keys
from server.store.breaker import BreakerState
from server.store.client import RedisClient
from server.store.embedded import EmbeddedRedis
from server.store.errors import StoreUnavailable
from server.store.players import PlayerStore
from tests.helpers import TIMEOUT


@pytest.fixture
async def store(redis_url: str) -> PlayerStore:
    client = RedisClient(redis_url, RedisConfig(operation_timeout_s=0.5))
    yield PlayerStore(client, "w1", resume_grace_ms=60_000)  # type: ignore[misc]
    await client.close()


async def test_one_queue_per_player_across_modes_and_connections(
    store: PlayerStore, admin: aioredis.Redis
) -> None:
    await store.attach("p", "c1")
    assert (await store.enqueue("p", "c1", "1v1", 1500, {})).outcome == "ok"
    already = await store.enqueue("p", "c1", "5v5", 1500, {})
    assert already.outcome == "already" and already.current is not None
    assert already.current.mode == "1v1"
    attached = await store.attach("p", "c2")  # a new connection takes over
    assert attached.previous_conn == "c1" and attached.player.state == "queued"
    assert (await store.enqueue("p", "c1", "5v5", 1500, {})).outcome == "replaced"
    assert (await store.dequeue("p", "c1")).outcome == "replaced"
    assert await admin.zcard(keys.queue("5v5")) == 0
    assert (await store.dequeue("p", "c2")).outcome == "ok"
    assert (await store.dequeue("p", "c2")).outcome == "not_in_queue"


async def test_stale_detach_changes_nothing(store: PlayerStore, admin: aioredis.Redis) -> None:
    await store.attach("p", "c1")
    await store.enqueue("p", "c1", "1v1", 1500, {})
    await store.attach("p", "c2")
    assert (await store.detach("p", "c1")).outcome == "stale"
    assert await admin.zscore(keys.grace("1v1"), "p") is None
    grace = await store.detach("p", "c2")
    assert grace.outcome == "grace" and grace.grace_deadline_ms > time.time() * 1000
    assert await admin.zscore(keys.grace("1v1"), "p") == grace.grace_deadline_ms


async def test_grace_expiry_is_checked_on_the_redis_clock(redis_url: str, admin: aioredis.Redis) -> None:
    client = RedisClient(redis_url)
    short = PlayerStore(client, "w1", resume_grace_ms=0)
    await short.attach("p", "c1")
    await short.enqueue("p", "c1", "1v1", 1500, {})
    await short.detach("p", "c1")
    assert await short.due(keys.grace("1v1")) == ["p"]
    assert await short.expire_grace("p", "1v1") is True
    assert await short.expire_grace("p", "1v1") is False  # idempotent
    assert [k for k in await admin.keys("*") if not keys.outlives_players(k)] == []
    await client.close()


async def test_reaping_a_dead_worker_gives_its_players_the_grace(
    redis_url: str, admin: aioredis.Redis
) -> None:
    client = RedisClient(redis_url)
    dead = PlayerStore(client, "dead", resume_grace_ms=60_000)
    alive = PlayerStore(client, "alive", resume_grace_ms=60_000)
    await dead.heartbeat(1)
    for player in ("a", "b"):
        await dead.attach(player, f"{player}-conn")
    await dead.enqueue("a", "a-conn", "1v1", 1500, {})
    async with asyncio.timeout(TIMEOUT):
        while "dead" not in await alive.due(keys.workers()):
            await asyncio.sleep(0.005)
    for player in await alive.worker_members("dead"):
        await alive.detach(player, "", "dead")
    assert await alive.forget_worker("dead")
    assert await admin.zscore(keys.grace("1v1"), "a") is not None
    assert await admin.exists(keys.player("b")) == 0
    assert await admin.zscore(keys.workers(), "dead") is None
    await client.close()


async def test_a_reaper_stops_once_the_silent_worker_heartbeats_again(
    redis_url: str, admin: aioredis.Redis
) -> None:
    """A worker only stalled (a pause, a long GC) past its heartbeat deadline: the reaper's
    detach of its next player is refused as soon as it heartbeats again, and it is not
    forgotten. Its heartbeat says it had lapsed, so it reads its players back."""
    client = RedisClient(redis_url)
    stalled = PlayerStore(client, "stalled", resume_grace_ms=60_000)
    reaper = PlayerStore(client, "reaper", resume_grace_ms=60_000)
    assert (await stalled.heartbeat(1)).lapsed  # not registered before: nothing to trust
    for player in ("a", "b"):
        await stalled.attach(player, f"{player}-conn")
        await stalled.enqueue(player, f"{player}-conn", "1v1", 1500, {})
    async with asyncio.timeout(TIMEOUT):
        while "stalled" not in await reaper.due(keys.workers()):
            await asyncio.sleep(0.005)
    released = await reaper.detach("a", "", "stalled", shutdown=True, reaping=True)
    assert released.outcome == "grace"
    beat = await stalled.heartbeat(60_000)
    assert beat.lapsed  # it had been past its deadline: some of its players may be gone
    assert not (await stalled.heartbeat(60_000)).lapsed  # on time now
    refused = await reaper.detach("b", "", "stalled", shutdown=True, reaping=True)
    assert refused.outcome == "alive"
    assert await admin.hget(keys.player("b"), "conn") == "b-conn"  # still its own, still queued
    assert await admin.zscore(keys.grace("1v1"), "b") is None
    assert not await reaper.forget_worker("stalled", reaping=True)  # holds players, and alive
    await stalled.detach("b", "b-conn")
    assert await admin.scard(keys.worker_players("stalled")) == 0
    assert not await reaper.forget_worker("stalled", reaping=True)  # no player, but alive
    assert await admin.zscore(keys.workers(), "stalled") is not None
    assert await stalled.forget_worker("stalled")  # its own clean exit
    await client.close()


async def test_scripts_reload_after_redis_restart(private_redis: EmbeddedRedis) -> None:
    client = RedisClient(private_redis.url, RedisConfig(operation_timeout_s=1.0))
    store = PlayerStore(client, "w1", resume_grace_ms=1000)
    await store.attach("p", "c1")
    private_redis.restart()  # all data and every loaded script are gone
    with pytest.raises(StoreUnavailable):
        await store.attach("p", "c1")  # the pooled connection died with the old server
    attached = await store.attach("p", "c1")  # NOSCRIPT -> SCRIPT LOAD -> retried
    assert attached.player.state == "idle"
    assert (await store.enqueue("p", "c1", "1v1", 1500, {})).outcome == "ok"
    await client.close()


async def test_every_call_is_bounded_by_the_operation_timeout(private_redis: EmbeddedRedis) -> None:
    client = RedisClient(private_redis.url, RedisConfig(operation_timeout_s=0.3))
    store = PlayerStore(client, "w1", resume_grace_ms=1000)
    await store.attach("p", "c1")
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            await store.enqueue("p", "c1", "1v1", 1500, {})
        assert time.monotonic() - started < 0.3 + TIMEOUT / 5
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    await client.close()


async def test_the_breaker_closes_as_soon_as_redis_answers_without_user_traffic(
    private_redis: EmbeddedRedis,
) -> None:
    """Issue 17: a breaker opened by an outage closes by its own probe once Redis is back,
    not after the whole cooldown, and not only when a user call happens to come by."""
    client = RedisClient(private_redis.url, RedisConfig(
        operation_timeout_s=0.3, breaker_threshold=1, breaker_cooldown_s=60, breaker_probe_s=0.05))
    assert await client.command("PING") == b"PONG"
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="timed out"):
            await client.command("PING")
        assert client.breaker.state is not BreakerState.CLOSED
        with pytest.raises(StoreUnavailable, match="circuit open"):
            await client.command("PING")  # refused at once while Redis is frozen
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    # No call is made meanwhile: the probe alone closes it, well inside the 60 s cooldown
    # (probes back off from 0.05 s, doubling, while Redis stays frozen).
    async with asyncio.timeout(TIMEOUT):
        while client.breaker.state is not BreakerState.CLOSED:
            await asyncio.sleep(0.01)
    assert await client.command("PING") == b"PONG"
    await client.close()


async def test_a_connection_attempt_that_never_completes_is_given_up() -> None:
    """Every caller shares one connection attempt and bounds only its own wait. The attempt
    itself must end too: one that waits forever for the AUTH answer of a host that accepted
    the TCP connection and went silent (a black hole) would make every later call wait on it
    and fail, long after Redis is reachable again."""
    accepted: list[asyncio.StreamReader] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(reader)  # never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RedisClient(f"redis://:secret@127.0.0.1:{port}/0", RedisConfig(operation_timeout_s=0.3))
    try:
        with pytest.raises(StoreUnavailable):
            await client.command("PING")
        async with asyncio.timeout(TIMEOUT):
            while not accepted:
                await asyncio.sleep(0.01)
            # The attempt gave up and closed its socket: the silent host reads its end.
            while not accepted[0].at_eof():
                await accepted[0].read(1024)
    finally:
        await client.close()
        server.close()


async def test_a_redis_at_maxmemory_is_unavailable_not_an_error(private_redis: EmbeddedRedis) -> None:
    """OOM refuses every write: Redis' condition, not the request's. The caller gets
    StoreUnavailable (clients: `unavailable` with a retry hint) and the breaker counts it,
    instead of an internal_error and a breaker that sees a healthy Redis."""
    client = RedisClient(private_redis.url, RedisConfig(operation_timeout_s=1.0, breaker_threshold=2))
    store = PlayerStore(client, "w1", resume_grace_ms=60_000)
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        await admin.config_set("maxmemory", 1)
        for _ in range(2):
            with pytest.raises(StoreUnavailable, match="OOM") as refused:
                await store.attach("oom", "c1")
            assert refused.value.maybe_ran  # a script may have written before its refused write
        assert client.breaker.state is BreakerState.OPEN
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.aclose()
        await client.close()


async def test_calls_in_flight_when_the_breaker_opens_move_it_once(
    private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 17: fifty calls waiting on a frozen Redis all fail, and the breaker's move is
    logged (and counted) once, not once per call that began while it was closed."""
    moves: list[BreakerState] = []

    class Observer:
        def call_done(self, op: str, seconds: float, outcome: str) -> None:
            pass

        def breaker_changed(self, state: BreakerState) -> None:
            moves.append(state)

    client = RedisClient(private_redis.url, RedisConfig(
        operation_timeout_s=0.3, breaker_threshold=1, breaker_cooldown_s=60, breaker_probe_s=0.05),
        Observer())
    assert await client.command("PING") == b"PONG"
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, "server.store.client"):
            results = await asyncio.gather(*(client.command("PING") for _ in range(50)),
                                           return_exceptions=True)
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    async with asyncio.timeout(TIMEOUT):
        while client.breaker.state is not BreakerState.CLOSED:
            await asyncio.sleep(0.01)
    opened = [r for r in caplog.records if "CLOSED -> OPEN" in r.getMessage()]
    assert len(opened) == 1, [r.getMessage() for r in caplog.records]
    # Each move is reported once: open, then half-open for each probe (open again for each that
    # failed while Redis was still frozen), then closed; never the same state twice in a row.
    assert moves[0] is BreakerState.OPEN and moves[-1] is BreakerState.CLOSED, moves
    assert moves.count(BreakerState.CLOSED) == 1, moves
    assert all(a is not b for a, b in itertools.pairwise(moves)), moves
    assert BreakerState.HALF_OPEN in moves, moves  # the gauge can show a probe in flight
    await client.close()


async def test_a_lost_record_is_told_apart_from_a_replacement(
    store: PlayerStore, admin: aioredis.Redis
) -> None:
    """Scripts answer `gone` only when Redis has no record at all; a record another connection
    holds, or one detached into its resume grace, is `replaced`. A re-attach after a lost
    record takes it only while there is none (or it is its own): it never overwrites a
    record a newer connection wrote meanwhile."""
    await store.attach("r", "c1")
    assert (await store.enqueue("r", "c1", "5v5", 1500, {})).outcome == "ok"
    await admin.delete(keys.player("r"), keys.queue("5v5"), keys.tickets("5v5"))
    assert (await store.dequeue("r", "c1", "5v5")).outcome == "gone"
    assert (await store.enqueue("r", "c1", "5v5", 1500, {})).outcome == "gone"
    again = await store.reattach("r", "c1")
    assert again is not None and again.player.state == "idle"
    assert await store.reattach("r", "c1") is not None  # its own record: nothing changes
    await store.attach("r", "c2")  # a newer connection
    assert await store.reattach("r", "c1") is None
    assert await admin.hget(keys.player("r"), "conn") == "c2"
    assert (await store.enqueue("r", "c2", "5v5", 1500, {})).outcome == "ok"
    assert (await store.detach("r", "c2")).outcome == "grace"  # queued, no connection now
    assert (await store.dequeue("r", "c1", "5v5")).outcome == "replaced"
    assert await store.reattach("r", "c1") is None
    await store.attach("r", "c3")
    assert (await store.dequeue("r", "c3", "5v5")).outcome == "ok"
    await store.detach("r", "c3")


async def test_a_recheck_closes_the_breaker_without_waiting_for_the_next_probe(
    private_redis: EmbeddedRedis,
) -> None:
    """README "Deployment: Sentinel": once the subscriber is back, the worker rechecks Redis
    at once rather than at the breaker's next probe (here a minute away)."""
    client = RedisClient(private_redis.url, RedisConfig(
        operation_timeout_s=0.3, breaker_threshold=1, breaker_cooldown_s=60, breaker_probe_s=60))
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="timed out"):
            await client.command("PING")
        assert client.breaker.state is BreakerState.OPEN
        await client.recheck()  # Redis is still frozen: the breaker stays open
        assert client.breaker.state is BreakerState.OPEN
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    await client.recheck()
    assert client.breaker.state is BreakerState.CLOSED
    assert await client.command("PING") == b"PONG"
    await client.close()
