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


async def test_the_backoff_starts_over_once_subscribed_again(
    private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Failed reconnects during one outage must not slow the reconnect after the next loss (a
    later failover): once subscribed again, the backoff starts over at its first step."""
    caplog.set_level(logging.WARNING, logger="server.transport.subscriber")
    config = RedisConfig(reconnect_base_s=0.01, reconnect_max_s=0.05, operation_timeout_s=0.5)

    async def subscribed() -> None:
        pass

    sub = Subscriber(private_redis.url, {"fm:deliver:backoff": lambda _: None}, subscribed, config)
    sub.start()
    try:
        async with asyncio.timeout(TIMEOUT):
            generation = await sub.wait_subscribed(0)
        assert private_redis.process is not None
        private_redis.process.kill()  # Redis gone: every reconnect fails (connection refused)
        private_redis.process.wait()
        assert (await _logged(caplog, 4))[:4] == [1, 2, 3, 4]
        private_redis.start()
        async with asyncio.timeout(TIMEOUT * 2):
            generation = await sub.wait_subscribed(generation)
        seen = len(_attempts(caplog))
        with redis.Redis(unix_socket_path=str(private_redis.socket_path)) as admin:
            assert admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
        after = await _logged(caplog, seen + 1)
        assert after[seen] == 1, after  # the first step again, not the outage's count + 1
        async with asyncio.timeout(TIMEOUT):
            await sub.wait_subscribed(generation)
    finally:
        await sub.close()
