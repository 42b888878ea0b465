"""What fastmatch exports: a real scrape of `fastmatch serve` after a match, plus every metric
object declared in server/metrics.py (a labelled series appears in a scrape only once used)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from prometheus_client.metrics import MetricWrapperBase

from server import metrics
from server.store.embedded import EmbeddedRedis
from tests.app.served import Served, http_get, wait_workers
from tests.app.test_matchmaking import start_loading
from tests.helpers import connect_player, request

_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count")}


def declared_names() -> set[str]:
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = value.describe()[0]
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def scraped_names(text: str) -> set[str]:
    return {line.split("{", 1)[0].split(" ", 1)[0]
            for line in text.splitlines() if line and not line.startswith("#")}


async def _scrape(redis_url: str) -> str:
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await admin.flushall()
    served = Served(redis_url, 1).start()
    try:
        await wait_workers(admin, 1)
        pair = [(await connect_player(served.port, f"scrape{i}", 1500))[0] for i in range(2)]
        for ws in pair:
            assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
        for ws in pair:
            await start_loading(ws)
        status, text = await http_get(served.metrics_port, "/metrics")
        assert status == 200
        for ws in pair:
            await ws.close()
        return text
    finally:
        await asyncio.to_thread(served.stop)
        await admin.flushall()
        await admin.aclose()


@pytest.fixture(scope="session")
def exported_names(shared_redis: EmbeddedRedis) -> Iterator[set[str]]:
    text = asyncio.run(_scrape(shared_redis.url))
    scraped = scraped_names(text)
    assert "fastmatch_match_wait_seconds_bucket" in scraped, "the scrape should follow a match"
    yield scraped | declared_names()


def require_tool(name: str) -> str:
    """The tool's path; outside CI a missing tool skips the test, in CI it fails it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed (CI installs it with .ci/run)")
    return path
