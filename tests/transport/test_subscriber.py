"""The delivery subscriber's reconnects, against a Redis of the test's own."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
import redis

from server.config import RedisConfig
from server.store.embedded import EmbeddedRedis
from server.transport.subscriber import Subscriber
from tests.helpers import TIMEOUT

_ATTEMPT = re.compile(r"reconnect attempt (\d+) in")


def _attempts(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [int(m.group(1)) for r in caplog.records
            if r.name == "server.transport.subscriber" and (m := _ATTEMPT.search(r.getMessage()))]


async def _logged(caplog: pytest.LogCaptureFixture, count: int) -> list[int]:
    async with asyncio.timeout(TIMEOUT * 2):
        while len(_attempts(caplog)) < count:
            await asyncio.sleep(0.01)
    return _attempts(caplog)


async def _through_an_outage(sub: Subscriber, redis_server: EmbeddedRedis,
                             caplog: pytest.LogCaptureFixture) -> int:
    """Subscribed, then Redis gone for four failed reconnects, then back: the generation of
    the subscription made after it."""
    async with asyncio.timeout(TIMEOUT):
        generation = await sub.wait_subscribed(0)
    assert redis_server.process is not None
    redis_server.process.kill()  # every reconnect fails (connection refused)
    redis_server.process.wait()
    assert (await _logged(caplog, 4))[:4] == [1, 2, 3, 4]
    redis_server.start()
    async with asyncio.timeout(TIMEOUT * 2):
        return await sub.wait_subscribed(generation)


def _drop_subscriber(redis_server: EmbeddedRedis) -> None:
    with redis.Redis(unix_socket_path=str(redis_server.socket_path)) as admin:
        assert admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1


async def _nothing() -> None:
    pass


@pytest.mark.parametrize("held", [True, False], ids=["held", "flapping"])
async def test_the_backoff_starts_over_only_after_a_subscription_that_held(
    private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture, held: bool
) -> None:
    """Failed reconnects during one outage must not slow the reconnect after the next loss (a
    later failover): once a subscription has held for redis.reconnect_max_s, the backoff
    starts over at its first step. A subscription dropped as soon as it is made (a flapping
    connection, e.g. Redis killing an overloaded subscriber) keeps backing off."""
    caplog.set_level(logging.WARNING, logger="server.transport.subscriber")
    # Held: past a short reconnect_max_s. Flapping: dropped well within a long one.
    config = RedisConfig(reconnect_base_s=0.01, reconnect_max_s=0.05 if held else 30.0,
                         operation_timeout_s=0.5)
    sub = Subscriber(private_redis.url, {"fm:deliver:backoff": lambda _: None}, _nothing, config)
    sub.start()
    try:
        generation = await _through_an_outage(sub, private_redis, caplog)
        if held:
            await asyncio.sleep(config.reconnect_max_s * 2)
        seen = _attempts(caplog)
        _drop_subscriber(private_redis)
        after = await _logged(caplog, len(seen) + 1)
        assert after[len(seen)] == (1 if held else seen[-1] + 1), after
        async with asyncio.timeout(TIMEOUT * 2):
            await sub.wait_subscribed(generation)
    finally:
        await sub.close()
