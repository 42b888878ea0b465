"""Ready check and game-server handoff end to end (PROTOCOL 3, 4, 7): real sockets, real
Redis, the reference game server. After every scenario no match or player key is left."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection

from server import metrics
from server.app.gameserver import Behaviour, ReferenceGameServer
from server.app.handoff import HEALTH_RECHECK_S
from server.app.worker import Worker
from server.store import keys
from server.store.embedded import EmbeddedRedis
from tests.app.test_matchmaking import QUEUED_AT, queued, start_loading
from tests.conftest import GameServerFactory, WorkerFactory, make_config
from tests.helpers import TIMEOUT, connect_player, player_and_queue_keys, recv, request, send

# Run again against a Redis Cluster by `make test` (tests/conftest.py, --redis-topology).
pytestmark = pytest.mark.conformance


async def ready_all(clients: dict[str, ClientConnection], session: str) -> None:
    for ws in clients.values():
        await send(ws, {"type": "loading_complete", "loading_session_id": session})


async def matched(clients: dict[str, ClientConnection]) -> dict[str, dict[str, Any]]:
    """Every client's start_loading, checked to be one and the same match."""
    loads = {p: await start_loading(ws) for p, ws in clients.items()}
    assert len({m["loading_session_id"] for m in loads.values()}) == 1
    return loads


async def leave_and_check_clean(clients: dict[str, ClientConnection], admin: aioredis.Redis) -> None:
    """DESIGN invariant 6: once everyone has left and the timeouts pass, no key is left."""
    for ws in clients.values():
        await ws.close()
    async with asyncio.timeout(TIMEOUT):
        while await player_and_queue_keys(admin):
            await asyncio.sleep(0.02)


async def test_happy_path_1v1(
    worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    game = await start_game_server()
    clients = await queued(worker.front.port, "1v1", ("ann", 1500), ("ben", 1510))
    loads = await matched(clients)
    session = loads["ann"]["loading_session_id"]
    await ready_all(clients, session)
    for player, ws in clients.items():
        found = await recv(ws)
        assert found["type"] == "match_found" and found["loading_session_id"] == session
        assert found["server_address"].endswith(":7777") and found["server_session_id"]
        assert found["teams"] == loads[player]["teams"]
        assert (await request(ws, {"type": "status"}))["state"] == "idle"
    req = game.last_request
    assert game.received == 1 and req is not None
    assert req.match_id == session and set(req.players) == {"ann", "ben"}
    assert req.players["ann"].mmr == 1500 and req.reply_to.startswith("fm:battle:")
    assert await admin.hget(keys.match("1v1", session), "status") == "assigned"
    await leave_and_check_clean(clients, admin)


async def test_happy_path_5v5(
    worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    await start_game_server(delay_ms=50)
    clients = await queued(worker.front.port, "5v5", *((f"p{i}", 1500 + i) for i in range(10)))
    loads = await matched(clients)
    await ready_all(clients, loads["p0"]["loading_session_id"])
    found = [await recv(ws) for ws in clients.values()]
    assert all(f["type"] == "match_found" for f in found)
    assert len({(f["server_address"], f["server_session_id"]) for f in found}) == 1
    assert sorted(len(t) for t in found[0]["teams"]) == [5, 5]
    # Matched players can queue again straight away.
    ws = clients["p3"]
    assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    await leave_and_check_clean(clients, admin)


async def test_player_leaves_during_loading(
    worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    await start_game_server()
    clients = await queued(worker.front.port, "1v1", ("stay", 1500), ("quit", 1500))
    original = QUEUED_AT["stay"]
    await matched(clients)
    await clients.pop("quit").close()
    back = await recv(clients["stay"])
    assert back == {"type": "requeued", "game_mode": "1v1", "reason": "player_left",
                    "queued_at_ms": original}
    assert (await request(clients["stay"], {"type": "status"}))["state"] == "queued"
    assert 0 < await admin.pttl(keys.penalty("quit")) <= 3_600_000
    await leave_and_check_clean(clients, admin)


async def test_a_player_never_loads(
    start_worker: WorkerFactory, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    await start_game_server()
    w = await start_worker(cfg=make_config(**{"matching.ready_timeout_ms": 300}))
    clients = await queued(w.front.port, "1v1", ("loader", 1500), ("afk", 1500))
    original = QUEUED_AT["loader"]
    loads = await matched(clients)
    await send(clients["loader"], {"type": "loading_complete",
                                   "loading_session_id": loads["loader"]["loading_session_id"]})
    assert await recv(clients["loader"]) == {"type": "requeued", "game_mode": "1v1",
                                             "reason": "loading_timeout", "queued_at_ms": original}
    err = await recv(clients["afk"])
    assert err["type"] == "error" and err["code"] == "loading_timeout"
    assert (await request(clients["afk"], {"type": "status"}))["state"] == "idle"
    await leave_and_check_clean(clients, admin)


async def _all_ready_then(w: Worker, admin: aioredis.Redis) -> dict[str, dict[str, Any]]:
    clients = await queued(w.front.port, "1v1", ("one", 1500), ("two", 1500))
    originals = {p: QUEUED_AT[p] for p in clients}
    loads = await matched(clients)
    await ready_all(clients, loads["one"]["loading_session_id"])
    answers = {p: await recv(ws) for p, ws in clients.items()}
    for p, answer in answers.items():
        assert answer["type"] == "requeued" and answer["queued_at_ms"] == originals[p]
    await leave_and_check_clean(clients, admin)
    return answers


async def test_no_game_server_between_the_match_and_its_handoff(
    worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    """The fleet is gone when the ready check completes: no_game_server, everyone requeued,
    the health monitor counts the miss, and the mode holds (issue 16) instead of cycling."""
    game = await start_game_server()
    clients = await queued(worker.front.port, "1v1", ("one", 1500), ("two", 1500))
    loads = await matched(clients)
    await game.close()  # nobody listens any more
    metrics.flush()  # the worker counts in memory until its next flush
    misses = REGISTRY.get_sample_value("fastmatch_game_server_misses_total") or 0
    await ready_all(clients, loads["one"]["loading_session_id"])
    for player, ws in clients.items():
        assert await recv(ws) == {"type": "requeued", "game_mode": "1v1",
                                  "reason": "no_game_server", "queued_at_ms": QUEUED_AT[player]}
    metrics.flush()
    assert (REGISTRY.get_sample_value("fastmatch_game_server_misses_total") or 0) == misses + 1
    assert REGISTRY.get_sample_value("fastmatch_game_server_available") == 0
    status = await request(clients["one"], {"type": "status"})
    assert status["state"] == "queued" and status["waiting_for"] == "game_server"
    await leave_and_check_clean(clients, admin)
    # A game server listens again; this worker sends no request, yet its health monitor sees
    # it (it looks every HEALTH_RECHECK_S while down), instead of reporting the fleet down
    # until its next request, hours later on a quiet worker.
    await start_game_server()
    async with asyncio.timeout(HEALTH_RECHECK_S + TIMEOUT):
        while REGISTRY.get_sample_value("fastmatch_game_server_available") != 1:
            await asyncio.sleep(0.02)


async def test_game_server_rejects(
    worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    await start_game_server(reject_rate=1.0)
    answers = await _all_ready_then(worker, admin)
    assert {a["reason"] for a in answers.values()} == {"allocation_failed"}


async def test_game_server_silent(
    start_worker: WorkerFactory, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    game = await start_game_server(silent=True)
    w = await start_worker(cfg=make_config(**{"gameserver.allocation_timeout_ms": 300}))
    answers = await _all_ready_then(w, admin)
    assert {a["reason"] for a in answers.values()} == {"allocation_failed"}
    assert game.received == 1
    assert REGISTRY.get_sample_value("fastmatch_game_server_available") == 1


async def test_ghost_player_with_concurrent_clients(
    worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    """One player disconnects at the moment the other sends loading_complete (the earlier
    server's ghost player): the other is requeued every time, never left waiting."""
    await start_game_server()
    for round_ in range(5):
        clients = await queued(worker.front.port, "1v1", (f"ghost{round_}", 1500), (f"real{round_}", 1500))
        loads = await matched(clients)
        session = loads[f"real{round_}"]["loading_session_id"]
        ghost, real = clients[f"ghost{round_}"], clients[f"real{round_}"]
        await asyncio.gather(
            ghost.close(),
            send(real, {"type": "loading_complete", "loading_session_id": session}),
        )
        answer = await recv(real)
        assert answer["type"] == "requeued" and answer["reason"] == "player_left"
        await real.close()
    async with asyncio.timeout(TIMEOUT):
        while await player_and_queue_keys(admin):
            await asyncio.sleep(0.02)


async def test_wrong_session_id(worker: Worker, start_game_server: GameServerFactory) -> None:
    await start_game_server()
    clients = await queued(worker.front.port, "1v1", ("w1", 1500), ("w2", 1500))
    await matched(clients)
    err = await request(clients["w1"], {"type": "loading_complete", "loading_session_id": "0.0.0"})
    assert err["type"] == "error" and err["code"] == "wrong_session_id"
    for ws in clients.values():
        await ws.close()


async def test_dodging_ready_checks_blocks_enqueue(
    start_worker: WorkerFactory, start_game_server: GameServerFactory,
    admin: aioredis.Redis
) -> None:
    await start_game_server()
    w = await start_worker(cfg=make_config(**{"matching.ready_timeout_ms": 100, "penalty.threshold": 2,
                                             "penalty.block_s": 60}))
    dodger, _ = await queued_one(w, "dodger")
    for i in range(2):
        partner, _ = await queued_one(w, f"partner{i}")
        await start_loading(dodger)
        await start_loading(partner)
        assert (await recv(dodger))["code"] == "loading_timeout"
        assert (await recv(partner))["code"] == "loading_timeout"
        await partner.close()
        if i == 0:
            assert (await request(dodger, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    blocked = await request(dodger, {"type": "enqueue", "game_mode": "1v1", "request_id": "b"})
    assert blocked["type"] == "error" and blocked["code"] == "player_blocked"
    assert 0 < blocked["retry_after_ms"] <= 60_000 and blocked["request_id"] == "b"
    assert await admin.zscore(keys.queue("1v1"), "dodger") is None
    await dodger.close()


async def queued_one(w: Worker, player: str) -> tuple[ClientConnection, Any]:
    clients = await queued(w.front.port, "1v1", (player, 1500))
    return clients[player], None


async def test_draining_worker_requeues_its_loading_matches_without_blame(
    start_worker: WorkerFactory, start_game_server: GameServerFactory,
    admin: aioredis.Redis
) -> None:
    """SIGTERM path: a player's connection is closed by the server, not by the player."""
    await start_game_server()
    draining = await start_worker(cfg=make_config(**{"matching.enabled": False}))
    staying = await start_worker()
    on_draining = await queued(draining.front.port, "1v1", ("d", 1500))
    on_staying = await queued(staying.front.port, "1v1", ("s", 1500))
    original = {p: QUEUED_AT[p] for p in ("d", "s")}
    await start_loading(on_draining["d"])
    await start_loading(on_staying["s"])
    await draining.close()
    async with asyncio.timeout(TIMEOUT):
        await on_draining["d"].wait_closed()
    assert on_draining["d"].close_code == 1001
    back = await recv(on_staying["s"])
    assert back == {"type": "requeued", "game_mode": "1v1", "reason": "server_shutdown",
                    "queued_at_ms": original["s"]}
    assert await admin.exists(keys.penalty("d")) == 0
    # The drained player resumes on the other worker within the grace, place kept.
    ws, welcome = await connect_player(staying.front.port, "d", 1500)
    assert welcome["state"] == "queued" and welcome["queued_at_ms"] == original["d"]
    await ws.close()
    await on_staying["s"].close()


async def test_a_leaver_whose_worker_never_cancelled_is_cancelled_by_the_leader(
    worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    """Issue 13: the detach of a player in a ready check succeeded but the cancel that must
    follow never ran (its worker died between the two, or Redis refused the second): the
    detach recorded the leaver, so the mode's leader cancels the match on its behalf."""
    await start_game_server()
    clients = await queued(worker.front.port, "1v1", ("stays", 1500), ("vanished", 1500))
    await matched(clients)
    conn = next(c.conn_id for c in worker.front.connections.values() if c.player_id == "vanished")
    # Exactly what the dying worker got done: the detach, and not the cancel.
    detached = await worker.store.detach("vanished", conn, mode_guess="1v1")
    assert detached.outcome == "loading"
    back = await recv(clients["stays"], TIMEOUT * 2)
    assert back == {"type": "requeued", "game_mode": "1v1", "reason": "player_left",
                    "queued_at_ms": QUEUED_AT["stays"]}
    assert await admin.zcard(keys.penalty("vanished")) == 1  # the leaver's dodge counts
    assert await admin.zcard(keys.left("1v1")) == 0  # settled
    await leave_and_check_clean(clients, admin)


async def test_a_handoff_that_would_start_during_the_drain_is_requeued_at_once(
    worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    """Issue 13: a ready check that completes while the worker drains must not start a
    handoff nobody owns; its players are requeued (server_shutdown, nobody at fault)."""
    await start_game_server()
    clients = await queued(worker.front.port, "1v1", ("xa", 1500), ("xb", 1500))
    session = (await matched(clients))["xa"]["loading_session_id"]
    conns = {c.player_id: c.conn_id for c in worker.front.connections.values()}
    # Both ready straight through the store, as the last request in flight would be.
    await worker.loading.ready("1v1", session, "xa", conns["xa"], 60_000, worker.worker_id)
    last = await worker.loading.ready("1v1", session, "xb", conns["xb"], 60_000, worker.worker_id)
    assert last.outcome == "allocating"
    await worker.allocator.close()  # the drain has begun
    worker.allocator.start("1v1", session, last)
    for player, ws in clients.items():
        assert await recv(ws) == {"type": "requeued", "game_mode": "1v1",
                                  "reason": "server_shutdown", "queued_at_ms": QUEUED_AT[player]}
    assert await admin.hget(keys.match("1v1", session), "status") == "failed"
    await leave_and_check_clean(clients, admin)


async def test_a_drain_while_a_timed_out_handoff_writes_its_failure_ends_cleanly(
    start_worker: WorkerFactory, private_redis: EmbeddedRedis
) -> None:
    """The game server never answers; the handoff's deadline passes and it writes the failure
    (allocation_failed), which Redis, frozen, does not take yet. A drain that begins then asks
    every handoff whether a server took its match: this one's wait ended in a timeout, which
    must read as "no", not raise out of the drain (the worker would skip the rest of its
    shutdown: its subscriber, its client, its record in Redis)."""
    game = ReferenceGameServer(private_redis.url, behaviour=Behaviour(silent=True), seed=1)
    async with asyncio.timeout(TIMEOUT):
        await game.start()
    # Calls wait for a frozen Redis up to 3 s: the failure's write is still in flight when
    # the drain begins.
    w = await start_worker(url=private_redis.url, cfg=make_config(**{
        "gameserver.allocation_timeout_ms": 300, "redis.operation_timeout_s": 3.0,
        "server.heartbeat_ttl_s": 8.0}))
    try:
        clients = await queued(w.front.port, "1v1", ("ta", 1500), ("tb", 1500))
        await ready_all(clients, (await matched(clients))["ta"]["loading_session_id"])
        async with asyncio.timeout(TIMEOUT):
            while game.received < 1:
                await asyncio.sleep(0.01)
        assert private_redis.process is not None
        private_redis.process.send_signal(signal.SIGSTOP)  # the failure's write waits
        try:
            await asyncio.sleep(0.6)  # past the handoff's 300 ms deadline
            async with asyncio.timeout(TIMEOUT * 2):
                await w.allocator.close()
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
        for ws in clients.values():
            await ws.close()
    finally:
        await game.close()


async def test_a_player_matched_while_disconnected_hears_match_found_when_it_reconnects(
    start_worker: WorkerFactory, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    """A connection drops as the game server answers: the assignment lands between the
    detach and the cancel that would follow, and finds no connection to tell. The player
    reconnecting within the grace is told its match (DESIGN "Routing and delivery": a message
    lost must be recoverable); the record was deleted before, and the welcome said idle."""
    worker = await start_worker(cfg=make_config(**{"server.resume_grace_ms": 10_000}))
    await start_game_server()
    clients = await queued(worker.front.port, "1v1", ("fa", 1500), ("fb", 1500))
    loads = await matched(clients)
    session = loads["fa"]["loading_session_id"]
    conns = {c.player_id: c.conn_id for c in worker.front.connections.values()}
    # Both ready through the store, so that no handoff starts: the test answers for the fleet.
    await worker.loading.ready("1v1", session, "fb", conns["fb"], 60_000, worker.worker_id)
    last = await worker.loading.ready("1v1", session, "fa", conns["fa"], 60_000, worker.worker_id)
    assert last.outcome == "allocating"
    # fa's connection ends: its detach has run, its cancel not yet, when the answer lands.
    assert (await worker.store.detach("fa", conns["fa"], mode_guess="1v1")).outcome == "loading"
    assert (await worker.loading.assign("1v1", session, "10.0.0.9:7777", "gs-9")).status == "assigned"
    expected = {"type": "match_found", "loading_session_id": session, "game_mode": "1v1",
                "server_address": "10.0.0.9:7777", "server_session_id": "gs-9",
                "teams": loads["fb"]["teams"]}
    assert await recv(clients["fb"]) == expected
    await clients.pop("fa").close()  # the socket itself goes too (its detach finds nothing)
    record = keys.player("fa")
    assert await admin.hget(record, "found") == session and await admin.pttl(record) > 0
    ws, welcome = await connect_player(worker.front.port, "fa", 1500)
    assert welcome["state"] == "idle"
    assert await recv(ws) == expected
    assert await admin.pttl(record) == -1  # connected: it no longer expires
    async with asyncio.timeout(TIMEOUT):  # told: forgotten, so no later connection hears it
        while await admin.hexists(record, "found"):
            await asyncio.sleep(0.01)
    assert (await request(ws, {"type": "status"}))["state"] == "idle"
    assert await admin.exists(keys.penalty("fa")) == 0
    clients["fa"] = ws
    await leave_and_check_clean(clients, admin)
