"""Issue 16: without a game server a mode holds its queue instead of cycling players through
ready checks, and a failing fleet is backed off. Real worker, real Redis, the reference game
server started and stopped by the tests."""

from __future__ import annotations

import asyncio
import itertools
import time

import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection

from server import metrics
from server.app.worker import Worker
from server.store import keys
from tests.app.test_loading import leave_and_check_clean
from tests.app.test_matchmaking import queued, start_loading
from tests.conftest import GameServerFactory, WorkerFactory, make_config
from tests.helpers import TIMEOUT, recv, request, send


def calls(op: str) -> float:
    metrics.flush()  # the worker counts in memory until its next flush
    return REGISTRY.get_sample_value("fastmatch_redis_call_seconds_count", {"op": op}) or 0.0


def held(mode: str) -> dict[str, float | None]:
    return {reason: REGISTRY.get_sample_value("fastmatch_matching_held", {"mode": mode, "reason": reason})
            for reason in metrics.HOLD_REASONS}


async def nothing_pending(ws: ClientConnection) -> bool:
    try:
        async with asyncio.timeout(0.05):
            await ws.recv()
    except TimeoutError:
        return True
    return False


async def test_no_game_server_holds_the_queue_then_serves_everyone_in_wait_order(
    worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    players = [(f"w{i}", 1500.0) for i in range(6)]
    clients = await queued(worker.front.port, "1v1", *players)  # in this order: wait order
    commits, probes = calls("commit_matches"), calls("hold")
    # The leader sees three matches it could form and probes for a game server every tick;
    # ten probes are ten ticks in which it formed none.
    async with asyncio.timeout(TIMEOUT):
        while calls("hold") < probes + 10:
            await asyncio.sleep(0.02)
    assert calls("commit_matches") == commits
    assert await admin.get(keys.hold("1v1")) == "game_server"
    assert held("1v1") == {"game_server": 1.0, "allocation_failed": 0.0}  # what the alert reads
    assert held("5v5") == {"game_server": 0.0, "allocation_failed": 0.0}  # nobody waits there
    for ws in clients.values():
        assert await nothing_pending(ws)  # no ready check, no requeue
        status = await request(ws, {"type": "status"})
        assert status["state"] == "queued" and status["waiting_for"] == "game_server"

    appeared = time.monotonic()
    await start_game_server()
    loads = {p: await start_loading(ws) for p, ws in clients.items()}
    assert time.monotonic() - appeared < TIMEOUT  # a tick or two after it subscribed
    teams = {tuple(sorted(p for team in m["teams"] for p in team)) for m in loads.values()}
    assert teams == {("w0", "w1"), ("w2", "w3"), ("w4", "w5")}  # longest waiting first
    for player, ws in clients.items():
        await send(ws, {"type": "loading_complete",
                        "loading_session_id": loads[player]["loading_session_id"]})
    for ws in clients.values():
        assert (await recv(ws))["type"] == "match_found"
    assert await admin.get(keys.hold("1v1")) is None
    assert held("1v1") == {"game_server": 0.0, "allocation_failed": 0.0}
    await leave_and_check_clean(clients, admin)


async def test_a_rejecting_fleet_is_backed_off_not_hammered(
    start_worker: WorkerFactory, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    """Every failed handoff holds the mode for a while, doubling while failures go on: the
    players are not put through ready checks faster than that. Measured on the Redis clock
    (each match's `ended` and the next one's `created`), so a slow machine cannot fake it."""
    hold_ms, hold_max_ms = 300, 1200
    w = await start_worker(cfg=make_config(**{
        "gameserver.hold_initial_ms": hold_ms, "gameserver.hold_max_ms": hold_max_ms,
        "matching.finished_match_ttl_ms": 60_000}))
    await start_game_server(reject_rate=1.0)
    clients = await queued(w.front.port, "1v1", ("r0", 1500), ("r1", 1500))
    matches = []
    for _ in range(4):
        loads = {p: await start_loading(ws, TIMEOUT * 2) for p, ws in clients.items()}
        matches.append(loads["r0"]["loading_session_id"])
        for player, ws in clients.items():
            await send(ws, {"type": "loading_complete",
                            "loading_session_id": loads[player]["loading_session_id"]})
        for ws in clients.values():
            back = await recv(ws)
            assert back["type"] == "requeued" and back["reason"] == "allocation_failed", back
        status = await request(clients["r0"], {"type": "status"})
        assert status["waiting_for"] == "game_server"
    records = [await admin.hmget(keys.match("1v1", m), "created", "ended") for m in matches]
    expected = hold_ms
    for (_, ended), (created, _) in itertools.pairwise(records):
        assert int(created) - int(ended) >= expected, (records, expected)
        expected = min(expected * 2, hold_max_ms)
    assert int(await admin.get(keys.hold_failures("1v1"))) == 4
    await admin.delete(*(keys.match("1v1", m) for m in matches))  # kept 60 s for this test
    await leave_and_check_clean(clients, admin)
