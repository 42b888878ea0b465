"""The breaker's recovery probe, against a Redis of the test's own that is stopped for real."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis

from server.config import RedisConfig
from server.store.breaker import BreakerState
from server.store.client import RedisClient
from server.store.embedded import EmbeddedRedis
from server.store.errors import StoreUnavailable
from tests.helpers import TIMEOUT


async def _open_breaker(client: RedisClient) -> None:
    """Redis is gone: calls fail (connection refused) until the breaker opens."""
    async with asyncio.timeout(TIMEOUT):
        while client.breaker.state is BreakerState.CLOSED:
            with contextlib.suppress(StoreUnavailable):
                await client.command("PING")


def _kill(redis: EmbeddedRedis) -> None:
    assert redis.process is not None
    redis.process.kill()
    redis.process.wait()


async def test_a_breaker_opened_again_is_probed_at_its_new_time_not_the_old_backoff(
    private_redis: EmbeddedRedis,
) -> None:
    """A long outage backs the probe off towards breaker_cooldown_s. A recheck (the subscriber
    reached Redis) closes the breaker while the prober sleeps towards its far probe; when
    Redis fails again at once, the breaker opens with a near probe time, and that is when it
    is probed: not when the old sleep ends, seconds later, refusing every call meanwhile."""
    config = RedisConfig(operation_timeout_s=0.5, breaker_threshold=1, breaker_probe_s=0.05,
                         breaker_cooldown_s=30.0)
    client = RedisClient(private_redis.url, config)
    loop = asyncio.get_running_loop()
    try:
        assert await client.command("PING") == b"PONG"
        _kill(private_redis)
        await _open_breaker(client)
        async with asyncio.timeout(TIMEOUT * 4):  # failed probes: 0.1, 0.2, 0.4 ... 6.4 s apart
            while client.breaker.next_probe_at - loop.time() < 6.0:
                await asyncio.sleep(0.01)
        far_probe = client.breaker.next_probe_at
        private_redis.start()
        await client.recheck()
        assert client.breaker.closed
        _kill(private_redis)
        await _open_breaker(client)
        private_redis.start()
        async with asyncio.timeout(TIMEOUT):
            while not client.breaker.closed:
                await asyncio.sleep(0.01)
        assert loop.time() < far_probe - 3.0, "closed only when the old backoff's sleep ended"
        assert await client.command("PING") == b"PONG"
    finally:
        await client.close()


class _Moves:
    """The breaker's moves, as the metrics see them."""

    def __init__(self) -> None:
        self.states: list[BreakerState] = []

    def call_done(self, op: str, seconds: float, outcome: str) -> None:
        pass

    def breaker_changed(self, state: BreakerState) -> None:
        self.states.append(state)


async def test_a_redis_that_answers_but_refuses_writes_keeps_the_breaker_open(
    private_redis: EmbeddedRedis,
) -> None:
    """A primary under min-replicas-to-write that lost its replicas answers PING but refuses
    every write (NOREPLICAS): fastmatch can do nothing there, so the breaker stays open and
    its probe backs off, instead of closing at every probe to let a burst of calls fail. It
    closes once writes are taken again."""
    moves = _Moves()
    config = RedisConfig(operation_timeout_s=0.5, breaker_threshold=1, breaker_probe_s=0.02,
                         breaker_cooldown_s=0.2)
    client = RedisClient(private_redis.url, config, observer=moves)
    try:
        await client.command("CONFIG", "SET", "min-replicas-to-write", "1")
        assert await client.command("PING") == b"PONG"
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.5  # several probes at their longest interval
        while loop.time() < until:
            with contextlib.suppress(StoreUnavailable):
                await client.command("SET", "fm:player:{w}", "1")  # refused, or NOREPLICAS
            await asyncio.sleep(0.01)
        assert BreakerState.OPEN in moves.states
        assert BreakerState.CLOSED not in moves.states, moves.states
        reached = redis.Redis(unix_socket_path=str(private_redis.socket_path))
        reached.config_set("min-replicas-to-write", 0)
        reached.close()
        async with asyncio.timeout(TIMEOUT):
            while not client.breaker.closed:
                await asyncio.sleep(0.01)
        assert await client.command("SET", "fm:player:{w}", "1") == b"OK"
    finally:
        await client.close()


async def _opened(client: RedisClient) -> None:
    """The breaker opened by failures (as calls that timed out would), its prober started."""
    loop = asyncio.get_running_loop()
    for _ in range(client.breaker.threshold):
        client._failed(loop.time())
    assert client.breaker.state is BreakerState.OPEN


async def test_writes_held_by_a_pause_do_not_keep_the_breaker_open(
    private_redis: EmbeddedRedis,
) -> None:
    """CLIENT PAUSE WRITE (a failover's handover) holds writes, it does not refuse them: the
    probe closes the breaker while they are held, and calls wait for the pause to end as they
    would have, instead of being refused until a probe after it."""
    config = RedisConfig(operation_timeout_s=0.5, breaker_threshold=1, breaker_probe_s=0.02,
                         breaker_cooldown_s=0.2)
    client = RedisClient(private_redis.url, config)
    loop = asyncio.get_running_loop()
    try:
        assert await client.command("CLIENT", "PAUSE", "5000", "WRITE") == b"OK"
        until = loop.time() + 5.0
        await _opened(client)
        async with asyncio.timeout(TIMEOUT):
            while not client.breaker.closed:
                await asyncio.sleep(0.01)
        assert loop.time() < until - 2.0, "closed only once the pause was over"
    finally:
        await client.command("CLIENT", "UNPAUSE")
        await client.close()


async def test_a_probe_key_the_acl_does_not_grant_does_not_keep_the_breaker_open(
    private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL that grants fastmatch's keys but not the probe's: the probe's write is refused
    with NOPERM, which says nothing about Redis taking writes. It counts as an answer (and
    says so in the log) rather than keeping the breaker open for good."""
    with redis.Redis(unix_socket_path=str(private_redis.socket_path)) as admin:
        admin.execute_command("ACL", "SETUSER", "players", "on", ">pw", "~fm:player:*", "+@all")
    config = RedisConfig(operation_timeout_s=0.5, breaker_threshold=1, breaker_probe_s=0.02,
                         breaker_cooldown_s=0.2)
    client = RedisClient(f"unix://players:pw@{private_redis.socket_path}", config)
    try:
        assert await client.command("SET", "fm:player:{acl}", "1") == b"OK"
        await _opened(client)
        async with asyncio.timeout(TIMEOUT):
            while not client.breaker.closed:
                await asyncio.sleep(0.01)
        assert any("fm:probe" in r.getMessage() for r in caplog.records), caplog.records
    finally:
        await client.close()
