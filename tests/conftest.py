"""Fixtures: real redis-server processes on private sockets, real workers on free ports.

No fakes: every test talks to a real Redis over a real socket. The session-wide server is
flushed before each test (it is ours alone); tests that stop or restart Redis get their own.

``--redis-topology cluster`` points the same fixtures (``redis_url``, ``admin``, workers and
game servers) at a Redis Cluster started once for the run (3 primaries with a replica each,
``tests/store/cluster_topology.py``). ``make test`` runs the tests marked ``conformance``
(front end, matching, loading races) that way too; a test that needs a Redis of its own to
stop or freeze is skipped there.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from server.app.gameserver import Behaviour, ReferenceGameServer
from server.app.worker import Worker
from server.config import Config, load_config
from server.store import keys, sentinel
from server.store.embedded import EmbeddedRedis
from tests.helpers import TIMEOUT
from tests.store.cluster_topology import ClusterTopology

# Test-speed settings: short grace and fast housekeeping so expiry paths run in well under 1 s.
FAST: dict[str, Any] = {
    "server.port": 0,
    "server.host": "127.0.0.1",
    "server.resume_grace_ms": 400,
    "server.housekeeping_interval_s": 0.05,
    "server.heartbeat_interval_s": 0.1,
    "server.heartbeat_ttl_s": 0.8,  # > 2 x interval + redis.operation_timeout_s
    "server.bad_message_budget": 3,
    # Within any machine's descriptor limit (`ulimit -n` 1024 and up): the default 50,000 is
    # shrunk to fit, with a warning, where the limit is lower (server/transport/fdlimit.py).
    "server.max_connections": 500,
    "redis.operation_timeout_s": 0.5,
    "redis.breaker_cooldown_s": 0.3,
    "redis.reconnect_base_s": 0.02,
    "redis.reconnect_max_s": 0.2,
    "matching.tick_ms": 20,
    "matching.lease_ttl_ms": 600,
    "matching.tick_budget_ms": 300,
    "matching.ready_timeout_ms": 2000,
    "matching.finished_match_ttl_ms": 300,
    "gameserver.allocation_timeout_ms": 1000,
}


def make_config(**overrides: Any) -> Config:
    """The fast test config with dotted-key overrides: make_config(**{"matching.enabled": False})."""
    return load_config(overrides={**FAST, **overrides}, environ={})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--redis-topology", choices=("embedded", "cluster"), default="embedded",
                     help="the Redis the shared fixtures use: a private redis-server (default), "
                          "or a Redis Cluster started for the run (with -m conformance)")


def on_cluster(config: pytest.Config) -> bool:
    return bool(config.getoption("--redis-topology") == "cluster")


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[ClusterTopology]:
    deployment = ClusterTopology().start()
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def private_redis(request: pytest.FixtureRequest) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, for tests that stop, freeze or restart it."""
    if on_cluster(request.config):
        pytest.skip("stops or freezes a Redis of its own: standalone only")
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.process.send_signal(18)  # SIGCONT, in case the test froze it
        server.stop()


@pytest.fixture
async def redis_url(request: pytest.FixtureRequest) -> str:
    if on_cluster(request.config):
        url = request.getfixturevalue("shared_cluster").locator
    else:
        url = request.getfixturevalue("shared_redis").url
    admin = sentinel.async_client(url)
    await admin.flushall()  # on a cluster: every primary
    await admin.aclose()
    keys.configure(url)  # the layout of this Redis, whatever an earlier test used
    return str(url)


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = sentinel.async_client(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def config() -> Config:
    return make_config()


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(config: Config, redis_url: str) -> AsyncIterator[WorkerFactory]:
    workers: list[Worker] = []

    async def start(url: str | None = None, cfg: Config | None = None) -> Worker:
        worker = Worker(cfg or config, url or redis_url)
        await worker.start(port=0)
        workers.append(worker)
        async with asyncio.timeout(TIMEOUT):
            await worker.subscriber.wait_subscribed()
        return worker

    yield start
    for worker in workers:
        try:
            async with asyncio.timeout(TIMEOUT * 2):
                await worker.close()
        except TimeoutError:
            # A hang at shutdown is a bug: show where every task is stuck, then fail.
            for task in asyncio.all_tasks():
                task.print_stack(limit=8)
            raise


@pytest.fixture
async def worker(start_worker: WorkerFactory) -> Worker:
    return await start_worker()


GameServerFactory = Callable[..., Awaitable[ReferenceGameServer]]


@pytest.fixture
async def start_game_server(redis_url: str) -> AsyncIterator[GameServerFactory]:
    servers: list[ReferenceGameServer] = []

    async def start(**behaviour: Any) -> ReferenceGameServer:
        server = ReferenceGameServer(redis_url, behaviour=Behaviour(**behaviour), seed=1)
        async with asyncio.timeout(TIMEOUT):
            await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def pytest_report_header(config: pytest.Config) -> str:
    return f"fastmatch test timeout unit: {TIMEOUT}s (FASTMATCH_TEST_TIMEOUT)" + (
        "; CI" if os.environ.get("CI") else ""
    ) + ("; Redis: a cluster started for this run" if on_cluster(config) else "")
