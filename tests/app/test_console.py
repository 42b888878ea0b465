"""The live console's data (/console/state), its token, the worker-restart counter, and the
console's promise to cost one Redis round trip (issue 14)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Histogram

from server.app.console import Console, Observed, quantile
from server.app.metrics_http import MetricsServer
from server.errors import ConfigError
from server.store import keys
from server.store.embedded import EmbeddedRedis
from tests.app.served import Served, http_get, sample, wait_workers
from tests.app.test_matchmaking import start_loading
from tests.helpers import TIMEOUT, connect_player, request

TOKEN = "console-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ServeFactory = Callable[..., Served]


@pytest.fixture
async def serve(redis_url: str) -> AsyncIterator[ServeFactory]:
    started: list[Served] = []

    def start(workers: int = 2, **env: str) -> Served:
        served = Served(redis_url, workers, **env).start()
        started.append(served)
        return served

    yield start
    for served in started:
        await asyncio.to_thread(served.stop)


async def state(served: Served) -> dict[str, Any]:
    status, body = await http_get(served.metrics_port, "/console/state", AUTH)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


async def state_until(served: Served, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The console refreshes from Redis and the metrics files; poll it with a deadline."""
    async with asyncio.timeout(TIMEOUT * 2):
        while not check(current := await state(served)):
            await asyncio.sleep(0.1)
    return current


def mode(current: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in current["modes"] if m["name"] == name)
    return found


async def test_state_shows_queues_workers_leaders_and_then_the_match(
    serve: ServeFactory, admin: aioredis.Redis
) -> None:
    served = serve(workers=2, FASTMATCH_METRICS__TOKEN=TOKEN)
    pids = await wait_workers(admin, 2)
    waiting = []
    for i in range(3):  # far apart in rating: they stay queued
        ws, _ = await connect_player(served.port, f"c{i}", 1000 + 1000 * i)
        assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
        waiting.append(ws)

    current = await state_until(served, lambda s: mode(s, "1v1")["queued"] == 3 and all(
        w["players"] is not None for w in s["workers"]) and sum(w["players"] for w in s["workers"]) == 3)
    one = mode(current, "1v1")
    assert [p["player"] for p in one["longest_waiting"]] == ["c0", "c1", "c2"]
    assert one["longest_waiting"][0]["waited_ms"] >= one["longest_waiting"][2]["waited_ms"] >= 0
    for name in ("1v1", "5v5"):
        lease = await admin.get(keys.leader(name))
        assert lease is not None
        assert mode(current, name)["leader"] == lease.split("|")[0]
        assert mode(current, name)["epoch"] == int(await admin.get(keys.epoch(name)))
    assert {w["id"]: w["pid"] for w in current["workers"]} == pids
    assert {w["process"] for w in current["workers"]} == {"worker-0", "worker-1"}
    assert sum(w["connections"] for w in current["workers"]) == current["connections"] == 3
    assert all(w["breaker"] == "closed" and w["heartbeat_in_ms"] > 0 for w in current["workers"])
    assert current["redis_error"] is None and current["breaker"] == "closed"
    # The embedded reference game server listens; the health monitor has seen no request yet.
    assert current["game_servers"] == {
        "channel": "battle:request", "listening": 1, "available": True, "misses_total": 0}

    pair = [(await connect_player(served.port, f"m{i}", 99_000))[0] for i in range(2)]
    for ws in pair:
        assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    match_id = (await start_loading(pair[0]))["loading_session_id"]
    await start_loading(pair[1])
    current = await state_until(served, lambda s: mode(s, "1v1")["ready_checks"] == 1)
    one = mode(current, "1v1")
    assert [c["match"] for c in one["ready_check_list"]] == [match_id]
    assert 0 < one["ready_check_list"][0]["deadline_in_ms"] <= 15_000
    assert one["queued"] == 3  # the pair left the queue inside the commit
    assert one["local"]["matches_total"] == one["local"]["matches_window"] == 1
    p50, p95, p99 = one["local"]["wait_s"]
    assert 0 < p50 <= p95 <= p99 <= 0.25  # both waited less than the first bucket
    for ws in [*waiting, *pair]:
        await ws.close()


async def test_token_guards_console_and_state(serve: ServeFactory, admin: aioredis.Redis) -> None:
    served = serve(workers=1, FASTMATCH_METRICS__TOKEN=TOKEN)
    await wait_workers(admin, 1)
    port = served.metrics_port
    # The page holds no data: it is served to anyone (so that a reload works), and its data
    # needs the header, which the page sends once it has the token from its address.
    status, page = await http_get(port, "/console")
    assert status == 200 and "<title>fastmatch console</title>" in page
    assert (await http_get(port, "/console?token=wrong"))[0] == 200
    assert (await http_get(port, "/console/state"))[0] == 401
    assert (await http_get(port, f"/console/state?token={TOKEN}"))[0] == 401
    assert (await http_get(port, f"/metrics?token={TOKEN}"))[0] == 401
    assert (await http_get(port, "/metrics"))[0] == 401
    assert (await http_get(port, "/console", AUTH))[0] == 200
    assert (await http_get(port, "/console/state", AUTH))[0] == 200
    assert (await http_get(port, "/nothing", AUTH))[0] == 404


async def test_the_token_never_reaches_the_log(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    observed = Observed(redis_url, ("1v1",), "battle:request", 1.0, str(tmp_path), dict)
    server = MetricsServer("127.0.0.1", 0, observed, TOKEN)
    server.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="server.app.metrics_http"):
            assert (await http_get(server.port, f"/console?token={TOKEN}&x=1"))[0] == 200
            assert (await http_get(server.port, "/console/state?token=guess"))[0] == 401
    finally:
        await asyncio.to_thread(server.close)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "/console?token=<redacted>&x=1" in logged and "token=<redacted> " in logged
    assert TOKEN not in logged and "guess" not in logged


async def test_an_idle_connection_is_let_go_and_a_taken_port_names_the_key(
    redis_url: str, tmp_path: Path,
) -> None:
    """Each connection holds a supervisor thread: one that sends nothing is closed after the
    idle timeout instead of holding it forever. A port already taken (node_exporter's 9100)
    stops start-up with the key named, not a traceback."""
    observed = Observed(redis_url, ("1v1",), "battle:request", 1.0, str(tmp_path), dict)
    server = MetricsServer("127.0.0.1", 0, observed, request_deadline_s=0.3)
    server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""  # closed by the server, nothing sent either way
        writer.close()
        assert (await http_get(server.port, "/console"))[0] == 200  # still serving
        with pytest.raises(ConfigError, match=r"metrics\.port: cannot listen on 127\.0\.0\.1:"):
            MetricsServer("127.0.0.1", server.port, observed)
    finally:
        await asyncio.to_thread(server.close)


async def test_console_without_token_and_restarts_counted(
    serve: ServeFactory, admin: aioredis.Redis
) -> None:
    served = serve(workers=2)
    pids = await wait_workers(admin, 2)
    _, text = await http_get(served.metrics_port, "/metrics")
    assert sample(text, "fastmatch_worker_restarts_total") == 0
    assert sample(text, "fastmatch_game_server_available") == 1
    assert sample(text, "fastmatch_matching_held", mode="1v1", reason="game_server") == 0
    alive = sample(text, "fastmatch_event_loop_alive_timestamp_seconds")
    assert alive is not None and time.time() - 10 < alive <= time.time() + 1
    for role in ("supervisor", "worker-0", "worker-1"):
        assert (sample(text, "fastmatch_process_cpu_seconds_total", process=role) or 0) > 0
        assert (sample(text, "fastmatch_process_resident_memory_bytes", process=role) or 0) > 1e6
    victim = next(iter(pids.values()))
    os.kill(victim, signal.SIGKILL)
    await wait_workers(admin, 2, exclude={victim})
    _, text = await http_get(served.metrics_port, "/metrics")
    assert sample(text, "fastmatch_worker_restarts_total") == 1
    status, body = await http_get(served.metrics_port, "/console/state")
    assert status == 200 and json.loads(body)["worker_restarts_total"] == 1


async def test_hosts_that_never_lead_still_report_no_leader(
    serve: ServeFactory, admin: aioredis.Redis
) -> None:
    """FastmatchNoLeader sums fastmatch_leader per mode: with no series at all (nobody ever
    took the lease, here because matching is off) the sum would be empty and never below 1.
    Every worker exports a zero for every mode from the start."""
    served = serve(workers=1, FASTMATCH_MATCHING__ENABLED="false")
    await wait_workers(admin, 1)
    _, text = await http_get(served.metrics_port, "/metrics")
    assert sample(text, "fastmatch_leader", mode="1v1") == 0
    assert sample(text, "fastmatch_leader", mode="5v5") == 0


def test_quantile_interpolates_like_prometheus() -> None:
    cumulative = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (float("inf"), 20.0)]
    assert quantile(0.5, cumulative) == pytest.approx(0.5)
    assert quantile(0.25, cumulative) == pytest.approx(0.3)
    assert quantile(0.75, cumulative) == pytest.approx(0.75)
    assert quantile(0.99, [(1.0, 1.0), (float("inf"), 2.0)]) == 1.0  # past the last bound
    assert quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


async def test_one_redis_round_trip_per_refresh_and_redis_down_is_shown(
    private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    admin = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    await admin.zadd(keys.workers(), {"elsewhere-41-abcdef": 2**40, "elsewhere-42-fedcba": 2**40})
    await admin.sadd(keys.worker_players("elsewhere-41-abcdef"), "a", "b")
    console = Console(Observed(private_redis.url, ("1v1", "5v5"), "battle:request", 1.0,
                               str(tmp_path), dict), CollectorRegistry())
    try:
        await asyncio.to_thread(console.state)  # connects, learns the registry's workers
        before = int((await admin.info("stats"))["total_reads_processed"])
        current = await asyncio.to_thread(console.state)
        after = int((await admin.info("stats"))["total_reads_processed"])
        # One read of the console's pipelined request, plus the second INFO's own read.
        assert after - before == 2
        assert {w["id"]: w["players"] for w in _plain(current)["workers"]} == {
            "elsewhere-41-abcdef": 2, "elsewhere-42-fedcba": 0}
        await admin.aclose()
        private_redis.stop()
        down = _plain(await asyncio.to_thread(console.state))
        assert down["redis_error"] and [m["name"] for m in down["modes"]] == ["1v1", "5v5"]
        assert mode(down, "1v1")["queued"] is None
    finally:
        console.close()


def _plain(value: object) -> dict[str, Any]:
    import msgspec

    result: dict[str, Any] = msgspec.to_builtins(value)
    return result


async def test_matches_and_waits_cover_the_last_minute_of_reads(redis_url: str, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    created = Counter("fastmatch_matches_created", "", ["mode"], registry=registry)
    waits = Histogram("fastmatch_match_wait_seconds", "", ["mode"], registry=registry,
                      buckets=(1, 10, 100))
    now = [1000.0]
    console = Console(Observed(redis_url, ("1v1",), "battle:request", 1.0, str(tmp_path), dict),
                      registry, max_age_s=0, clock=lambda: now[0])

    async def read() -> dict[str, Any]:
        current = _plain(await asyncio.to_thread(console.state))
        return {"window_s": current["window_s"], **mode(current, "1v1")["local"]}

    try:
        created.labels("1v1").inc(5)  # before the console looked: in the total only
        assert await read() == {"window_s": 0, "matches_total": 5, "matches_window": 0,
                                "wait_s": [None, None, None], "ticks_skipped_total": 0}
        now[0] += 30
        created.labels("1v1").inc(2)
        for seconds in (5, 5):
            waits.labels("1v1").observe(seconds)
        first = await read()
        assert first["window_s"] == 30 and first["matches_window"] == 2
        assert first["wait_s"] == [pytest.approx(5.5), pytest.approx(9.55), pytest.approx(9.91)]
        now[0] += 40  # the first read leaves the window; the second is the baseline now
        created.labels("1v1").inc(1)
        assert (await read())["window_s"] == 40 and (await read())["matches_window"] == 1
        now[0] += 600  # nobody looked for ten minutes: the window starts again
        created.labels("1v1").inc(3)
        assert await read() == {"window_s": 0, "matches_total": 11, "matches_window": 0,
                                "wait_s": [None, None, None], "ticks_skipped_total": 0}
    finally:
        console.close()


class _SlowReads(Console):
    """A Console whose Redis read takes a second of its clock (a slow Redis, told by the clock
    it was given rather than by sleeping)."""

    def __init__(self, source: Observed, now: list[float]) -> None:
        super().__init__(source, CollectorRegistry(), max_age_s=0.5, clock=lambda: now[0])
        self.now = now
        self.reads = 0

    def read_redis(self) -> list[Any]:
        self.reads += 1
        self.now[0] += 1.0
        return super().read_redis()


async def test_a_slow_read_is_still_shared_for_max_age_after_it_ends(redis_url: str, tmp_path: Path) -> None:
    """The shared state's age counts from the end of its read: stamped at the start, a read
    slower than max_age_s would be stale on arrival and every request would read again."""
    console = _SlowReads(Observed(redis_url, ("1v1",), "battle:request", 1.0, str(tmp_path), dict),
                         [1000.0])
    try:
        first = await asyncio.to_thread(console.state_json)
        assert await asyncio.to_thread(console.state_json) == first and console.reads == 1
        console.now[0] += 0.5  # max_age_s after the read ended: the next request reads again
        await asyncio.to_thread(console.state_json)
        assert console.reads == 2
    finally:
        console.close()
