"""The WebSocket front end over real sockets against a real redis-server (PROTOCOL 1-6)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.app.worker import Worker
from server.store import keys
from server.transport.connection import ClientConnection
from tests.conftest import GameServerFactory, WorkerFactory, make_config, on_cluster
from tests.helpers import (
    TIMEOUT,
    closed_code,
    connect_player,
    on_every_node,
    open_client,
    player_and_queue_keys,
    recv,
    request,
    retry_while_unavailable,
    send,
    token,
)

# Run again against a Redis Cluster by `make test` (tests/conftest.py, --redis-topology).
pytestmark = pytest.mark.conformance


async def _status_of(url: str) -> int:
    try:
        async with connect(url, open_timeout=TIMEOUT):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


# -- handshake (PROTOCOL 1) -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "query",
    [
        "",  # missing
        "?token=" + token("p1", ttl_s=-60),  # expired
        "?token=" + token("p1").rsplit(".", 1)[0] + ".AAAA",  # bad signature
        "?token=not-a-jwt",  # malformed
        "?token=" + token("p1").replace(".", "", 1),  # malformed structure
    ],
    ids=["missing", "expired", "bad-signature", "garbage", "mangled"],
)
async def test_bad_tokens_fail_the_handshake_with_401(worker: Worker, query: str) -> None:
    assert await _status_of(f"ws://127.0.0.1:{worker.front.port}/ws{query}") == 401


async def test_token_in_query_and_header_both_work(worker: Worker) -> None:
    port = worker.front.port
    async with connect(f"ws://127.0.0.1:{port}/ws/?token={token('q1')}") as ws:
        assert (await recv(ws))["player_id"] == "q1"
    ws, welcome = await connect_player(port, "h1")
    assert welcome == {"type": "welcome", "player_id": "h1", "state": "idle", "protocol": 1}
    await ws.close()


async def test_wrong_path_is_404(worker: Worker) -> None:
    assert await _status_of(f"ws://127.0.0.1:{worker.front.port}/nope?token={token('p')}") == 404


# -- requests and answers (PROTOCOL 2, 3) -----------------------------------------------------------

async def test_enqueue_status_dequeue(worker: Worker, admin: aioredis.Redis) -> None:
    ws, _ = await connect_player(worker.front.port, "alice", mmr=1620)
    enq = await request(ws, {"type": "enqueue", "game_mode": "1v1", "request_id": "r1"})
    assert enq["type"] == "enqueued" and enq["game_mode"] == "1v1" and enq["request_id"] == "r1"
    assert await admin.zscore(keys.queue("1v1"), "alice") == enq["queued_at_ms"]
    ticket = await admin.hget(keys.tickets("1v1"), "alice")
    assert ticket is not None and ticket.startswith("1620.0|")

    status = await request(ws, {"type": "status", "request_id": "s"})
    assert status["type"] == "queue_status" and status["state"] == "queued"
    assert status["game_mode"] == "1v1" and status["queue_size"] == 1 and status["request_id"] == "s"
    assert status["waited_ms"] >= 0 and status["search_window"] >= 50

    deq = await request(ws, {"type": "dequeue", "request_id": "r2"})
    assert deq == {"type": "dequeued", "game_mode": "1v1", "reason": "requested", "request_id": "r2"}
    assert await admin.zcard(keys.queue("1v1")) == 0
    assert await admin.hlen(keys.tickets("1v1")) == 0
    idle = await request(ws, {"type": "status"})
    assert idle["state"] == "idle" and idle["queue_size"] == 0
    await ws.close()


async def test_request_errors(worker: Worker) -> None:
    ws, _ = await connect_player(worker.front.port, "bob")
    err = await request(ws, {"type": "enqueue", "game_mode": "chess", "request_id": "x"})
    assert err["type"] == "error" and err["code"] == "unsupported_game_mode" and err["request_id"] == "x"
    assert (await request(ws, {"type": "dequeue"}))["code"] == "not_in_queue"
    assert (await request(ws, {"type": "loading_complete", "loading_session_id": "m1"}))["code"] == (
        "invalid_state"
    )
    assert (await request(ws, {"type": "enqueue", "game_mode": "5v5"}))["type"] == "enqueued"
    again = await request(ws, {"type": "enqueue", "game_mode": "1v1"})
    assert again["code"] == "already_in_queue"
    await ws.close()


async def test_two_enqueues_back_to_back_make_one_entry(worker: Worker, admin: aioredis.Redis) -> None:
    ws, _ = await connect_player(worker.front.port, "carol")
    # The second frame leaves before the server has answered the first.
    await send(ws, {"type": "enqueue", "game_mode": "1v1", "request_id": "0"})
    await send(ws, {"type": "enqueue", "game_mode": "5v5", "request_id": "1"})
    answers = [await recv(ws), await recv(ws)]
    assert [a["type"] for a in answers] == ["enqueued", "error"]
    assert answers[1]["code"] == "already_in_queue"
    assert await admin.zcard(keys.queue("1v1")) == 1
    assert await admin.zcard(keys.queue("5v5")) == 0
    await ws.close()


async def test_cross_connection_exclusivity_is_enforced_by_redis(
    start_worker: WorkerFactory, admin: aioredis.Redis
) -> None:
    """Two workers, one player: only one queue entry whatever the connections believe."""
    w1, w2 = await start_worker(), await start_worker()
    old, _ = await connect_player(w1.front.port, "dave")
    assert (await request(old, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    new, welcome = await connect_player(w2.front.port, "dave")
    assert welcome["state"] == "queued" and welcome["game_mode"] == "1v1"
    assert await closed_code(old) == 4009
    assert (await request(new, {"type": "enqueue", "game_mode": "5v5"}))["code"] == "already_in_queue"
    assert await admin.zcard(keys.queue("5v5")) == 0
    await new.close()


# -- bad input (PROTOCOL 5) -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        b"\x00\x01binary",
        json.dumps({"type": "teleport"}),
        json.dumps({"type": "enqueue", "game_mode": 5}),
        json.dumps({"type": "enqueue"}),
        json.dumps(["enqueue"]),
        json.dumps({"game_mode": "1v1"}),
    ],
    ids=["non-json", "binary", "unknown-type", "wrong-type", "missing-field", "not-object", "no-type"],
)
async def test_bad_frames_get_invalid_message_and_change_nothing(
    worker: Worker, admin: aioredis.Redis, frame: str | bytes
) -> None:
    ws, _ = await connect_player(worker.front.port, "eve")
    await ws.send(frame)
    err = await recv(ws)
    assert err["type"] == "error" and err["code"] == "invalid_message" and err["message"]
    assert (await request(ws, {"type": "status"}))["state"] == "idle"
    assert await player_and_queue_keys(admin) == [keys.player("eve")]  # connected, idle
    assert await admin.hget(keys.player("eve"), "state") == "idle"
    await ws.close()


async def test_bad_message_budget_closes_with_1008_and_others_keep_working(worker: Worker) -> None:
    port = worker.front.port
    other, _ = await connect_player(port, "bystander")
    assert (await request(other, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    ws, _ = await connect_player(port, "spammer")
    for _ in range(4):  # the test budget is 3
        await ws.send("{{{")
    assert await closed_code(ws) == 1008
    assert (await request(other, {"type": "status"}))["state"] == "queued"
    await other.close()


async def test_oversized_frame_is_closed_with_1009(worker: Worker) -> None:
    port = worker.front.port
    ws, _ = await connect_player(port, "big")
    await ws.send(json.dumps({"type": "status", "request_id": "x" * 5000}))
    assert await closed_code(ws) == 1009
    fresh, welcome = await connect_player(port, "big")
    assert welcome["type"] == "welcome"
    await fresh.close()


# -- one connection per player, resume and grace (PROTOCOL 1, 4) ----------------------------------

async def test_second_connection_same_worker_replaces_the_first(worker: Worker) -> None:
    port = worker.front.port
    old, _ = await connect_player(port, "frank")
    enq = await request(old, {"type": "enqueue", "game_mode": "5v5"})
    new, welcome = await connect_player(port, "frank")
    assert await closed_code(old) == 4009
    assert old.close_reason == "session_replaced"
    assert welcome["state"] == "queued" and welcome["queued_at_ms"] == enq["queued_at_ms"]
    assert (await request(new, {"type": "dequeue"}))["type"] == "dequeued"
    await new.close()


async def test_resume_within_grace_keeps_queued_at(worker: Worker, admin: aioredis.Redis) -> None:
    port = worker.front.port
    ws, _ = await connect_player(port, "gina")
    enq = await request(ws, {"type": "enqueue", "game_mode": "1v1"})
    await ws.close()
    # The ticket stays, out of matching, until the grace ends.
    await _until(lambda: admin.zscore(keys.grace("1v1"), "gina"), present=True)
    back, welcome = await connect_player(port, "gina")
    assert welcome["state"] == "queued" and welcome["queued_at_ms"] == enq["queued_at_ms"]
    assert await admin.zscore(keys.grace("1v1"), "gina") is None
    assert await admin.zscore(keys.queue("1v1"), "gina") == enq["queued_at_ms"]
    await back.close()


async def test_grace_expiry_removes_the_ticket(worker: Worker, admin: aioredis.Redis) -> None:
    ws, _ = await connect_player(worker.front.port, "hank")
    await request(ws, {"type": "enqueue", "game_mode": "1v1"})
    await ws.close()
    await _until(lambda: admin.exists(keys.player("hank")), present=False)
    assert await admin.zscore(keys.queue("1v1"), "hank") is None
    assert await admin.hget(keys.tickets("1v1"), "hank") is None
    assert await admin.zscore(keys.grace("1v1"), "hank") is None


async def test_idle_disconnect_leaves_no_keys(worker: Worker, admin: aioredis.Redis) -> None:
    ws, _ = await connect_player(worker.front.port, "ivy")
    await request(ws, {"type": "enqueue", "game_mode": "5v5"})
    await request(ws, {"type": "dequeue"})
    await ws.close()
    await _until(lambda: admin.exists(keys.player("ivy")), present=False)
    assert await player_and_queue_keys(admin) == []


# -- delivery subscriber (DESIGN requirement 2) -------------------------------------------------------

async def test_subscriber_recovers_from_client_kill(
    start_worker: WorkerFactory, admin: aioredis.Redis
) -> None:
    w1, w2 = await start_worker(), await start_worker()
    old, _ = await connect_player(w1.front.port, "jack")
    generation = w1.subscriber.generation
    killed = await on_every_node(admin, "CLIENT", "KILL", "TYPE", "pubsub")
    assert sum(killed) >= 2  # both workers' subscribers
    async with asyncio.timeout(TIMEOUT):
        await w1.subscriber.wait_subscribed(generation)
    new, _ = await connect_player(w2.front.port, "jack")
    assert await closed_code(old) == 4009
    await new.close()


async def test_replacement_missed_while_deaf_is_caught_by_resync(
    start_worker: WorkerFactory, admin: aioredis.Redis
) -> None:
    """The Replace message is published while w1 has no subscriber: resync closes it anyway."""
    w1, w2 = await start_worker(), await start_worker()
    old, _ = await connect_player(w1.front.port, "kate")
    await w1.subscriber.close()
    new, _ = await connect_player(w2.front.port, "kate")
    w1.subscriber.start()
    assert await closed_code(old) == 4009
    await new.close()


async def _state_is(admin: aioredis.Redis, player: str, state: str) -> None:
    async with asyncio.timeout(TIMEOUT * 2):
        while await admin.hget(keys.player(player), "state") != state:
            await asyncio.sleep(0.01)


async def test_a_ready_check_formed_while_deaf_is_told_after_resync(
    start_worker: WorkerFactory, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    """The match is committed and its start_loading published while the worker has no
    subscriber (e.g. right after a Redis restart): resync reads the players back and sends
    the start_loading they missed; the match then completes normally."""
    await start_game_server()
    w = await start_worker()
    await asyncio.wait_for(w.matchmakers["1v1"].wait_leading(), TIMEOUT)
    a, _ = await connect_player(w.front.port, "nia", 1500)
    b, _ = await connect_player(w.front.port, "oto", 1500)
    await w.subscriber.close()
    for ws in (a, b):
        assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    for player in ("nia", "oto"):
        await _state_is(admin, player, "loading")  # formed, and nobody heard of it
    match = await admin.hget(keys.player("nia"), "match")
    w.subscriber.start()
    for ws in (a, b):
        told = await recv(ws, TIMEOUT * 2)
        assert told["type"] == "start_loading" and told["loading_session_id"] == match, told
        assert sorted(p for team in told["teams"] for p in team) == ["nia", "oto"] and told["deadline_ms"] > 0
        await send(ws, {"type": "loading_complete", "loading_session_id": match})
    for ws in (a, b):
        found = await recv(ws, TIMEOUT * 2)
        assert found["type"] == "match_found" and found["loading_session_id"] == match, found
        await ws.close()


async def test_a_match_found_while_deaf_is_told_after_resync_and_only_once(
    start_worker: WorkerFactory, start_game_server: GameServerFactory, admin: aioredis.Redis,
    pytestconfig: pytest.Config,
) -> None:
    """The game server's answer lands while the worker has no subscriber: nobody heard the
    match_found, so the records keep it (as for a player with no connection). The resync
    tells it, and that forgets it: a later connection of the player is not told it again.
    On a cluster a PUBLISH counts one node's subscribers, so nothing is kept there (the
    resync tells it all the same)."""
    kept = not on_cluster(pytestconfig)
    await start_game_server()
    w = await start_worker()
    await asyncio.wait_for(w.matchmakers["1v1"].wait_leading(), TIMEOUT)
    clients = {}
    for player in ("ria", "sol"):
        clients[player], _ = await connect_player(w.front.port, player, 1500)
        assert (await request(clients[player], {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    loads = {p: await recv(ws, TIMEOUT * 2) for p, ws in clients.items()}
    sid = loads["ria"]["loading_session_id"]
    conns = {c.player_id: c.conn_id for c in w.front.connections.values()}
    # Ready through the store, so that no handoff starts: the test answers for the fleet.
    for player in ("ria", "sol"):
        await w.loading.ready("1v1", sid, player, conns[player], 60_000, w.worker_id)
    await w.subscriber.close()
    async with asyncio.timeout(TIMEOUT):
        while (await admin.pubsub_numsub(keys.worker_channel(w.worker_id)))[0][1]:
            await asyncio.sleep(0.01)
    assert (await w.loading.assign("1v1", sid, "10.0.0.8:7777", "gs-8")).status == "assigned"
    for player in clients:  # nobody heard it
        assert await admin.hget(keys.player(player), "found") == (sid if kept else None)
    w.subscriber.start()
    for player, ws in clients.items():
        assert await recv(ws, TIMEOUT * 2) == {
            "type": "match_found", "loading_session_id": sid, "game_mode": "1v1",
            "server_address": "10.0.0.8:7777", "server_session_id": "gs-8",
            "teams": loads[player]["teams"]}
    async with asyncio.timeout(TIMEOUT):  # told: forgotten
        while await admin.hexists(keys.player("ria"), "found") or await admin.hexists(
                keys.player("sol"), "found"):
            await asyncio.sleep(0.01)
    await clients["ria"].close()
    await _until(lambda: admin.exists(keys.player("ria")), present=False)  # idle: not kept
    again, welcome = await connect_player(w.front.port, "ria", 1500)
    assert welcome["state"] == "idle"
    assert (await request(again, {"type": "status"}))["type"] == "queue_status"  # nothing else
    for ws in (again, clients["sol"]):
        await ws.close()


async def test_a_delivery_that_fails_for_one_connection_still_reaches_the_others(
    worker: Worker, start_game_server: GameServerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One envelope carries the notices of every player of a worker that a script touched:
    a bug while delivering to one connection must not cost the others theirs."""
    await start_game_server()
    await asyncio.wait_for(worker.matchmakers["1v1"].wait_leading(), TIMEOUT)
    failed: list[str] = []
    deliver = ClientConnection.deliver

    def first_fails(self: ClientConnection, message: object) -> None:
        if not failed:
            failed.append(self.player_id)
            raise RuntimeError("a bug in one connection's delivery")
        deliver(self, message)  # type: ignore[arg-type]

    monkeypatch.setattr(ClientConnection, "deliver", first_fails)
    clients = {}
    for player in ("uma", "vic"):
        clients[player], _ = await connect_player(worker.front.port, player, 1500)
    for ws in clients.values():  # one commit: both start_loading in one envelope
        await send(ws, {"type": "enqueue", "game_mode": "1v1"})
    for ws in clients.values():
        assert (await recv(ws, TIMEOUT * 2))["type"] == "enqueued"
    async with asyncio.timeout(TIMEOUT * 2):  # the match is committed and its notices fail
        while not failed:
            await asyncio.sleep(0.01)
    other = next(p for p in clients if p not in failed)
    assert (await recv(clients[other], TIMEOUT * 2))["type"] == "start_loading"
    # The one that missed its notice is closed (it resumes, and its welcome says where it is).
    assert await closed_code(clients[failed[0]]) == 1011
    await clients[other].close()


async def test_a_ready_check_that_ended_while_deaf_is_told_after_resync(
    start_worker: WorkerFactory, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    """The ready check times out while the worker has no subscriber: after resync the player
    who loaded is told `requeued{loading_timeout}` (same queue place), the one who did not
    `error{loading_timeout}`, as the notices they missed would have said."""
    await start_game_server()
    w = await start_worker(cfg=make_config(**{"matching.ready_timeout_ms": 800}))
    await asyncio.wait_for(w.matchmakers["1v1"].wait_leading(), TIMEOUT)
    a, _ = await connect_player(w.front.port, "pia", 1500)
    b, _ = await connect_player(w.front.port, "quo", 1500)
    queued_at = {}
    for ws, player in ((a, "pia"), (b, "quo")):
        queued_at[player] = (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["queued_at_ms"]
    sid = (await recv(a, TIMEOUT * 2))["loading_session_id"]
    assert (await recv(b, TIMEOUT * 2))["loading_session_id"] == sid
    await w.subscriber.close()
    await send(a, {"type": "loading_complete", "loading_session_id": sid})
    await _state_is(admin, "pia", "queued")
    await _state_is(admin, "quo", "idle")
    w.subscriber.start()
    assert await recv(a, TIMEOUT * 2) == {"type": "requeued", "game_mode": "1v1",
                                          "reason": "loading_timeout",
                                          "queued_at_ms": queued_at["pia"]}
    told = await recv(b, TIMEOUT * 2)
    assert told["type"] == "error" and told["code"] == "loading_timeout", told
    assert (await request(b, {"type": "status"}))["state"] == "idle"
    for ws in (a, b):
        await ws.close()


# -- storage unavailable ------------------------------------------------------------------------------

async def test_redis_down_gives_unavailable_and_worker_stays_up(
    start_worker: WorkerFactory, private_redis
) -> None:  # type: ignore[no-untyped-def]
    w = await start_worker(url=private_redis.url)
    ws, _ = await connect_player(w.front.port, "liam")
    private_redis.process.send_signal(19)  # SIGSTOP: Redis hangs, connections stay open
    err = await request(ws, {"type": "enqueue", "game_mode": "1v1", "request_id": "u"}, )
    assert err["type"] == "error" and err["code"] == "unavailable" and err["retry_after_ms"] > 0
    assert err["request_id"] == "u"
    late, refused = await connect_player(w.front.port, "mia")
    assert refused["type"] == "error" and refused["code"] == "unavailable"
    assert await closed_code(late) == 1011
    private_redis.process.send_signal(18)  # SIGCONT
    ok = await retry_while_unavailable(ws, {"type": "enqueue", "game_mode": "1v1"})
    assert ok["type"] == "enqueued"
    await ws.close()


async def _until(read, present: bool) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(TIMEOUT):
        while bool(await read()) != present:
            await asyncio.sleep(0.01)


# -- operator endpoints (PROTOCOL 8) ------------------------------------------------------------------

async def _http_get(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def test_health_and_ready_follow_storage(start_worker: WorkerFactory, private_redis) -> None:  # type: ignore[no-untyped-def]
    w = await start_worker(url=private_redis.url)
    port = w.front.port
    assert await _http_get(port, "/health") == 200
    assert await _http_get(port, "/ready") == 200
    private_redis.process.send_signal(19)  # SIGSTOP
    try:
        async with asyncio.timeout(TIMEOUT):
            while await _http_get(port, "/ready") != 503:
                await asyncio.sleep(0.02)
        assert await _http_get(port, "/health") == 200  # the worker itself is fine
    finally:
        private_redis.process.send_signal(18)  # SIGCONT
    async with asyncio.timeout(TIMEOUT):
        while await _http_get(port, "/ready") != 200:
            await asyncio.sleep(0.02)


# -- rate limits (PROTOCOL 5) -----------------------------------------------------------------------

async def test_message_flood_gets_rate_limited_then_4008(start_worker: WorkerFactory) -> None:
    w = await start_worker(cfg=make_config(**{"server.message_rate": 5, "server.message_burst": 5,
                                             "server.rate_limit_strikes": 2}))
    ws, _ = await connect_player(w.front.port, "flood")
    for _ in range(20):
        await send(ws, {"type": "status"})
    answers = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            answers.append(await recv(ws))
    assert [a["type"] for a in answers[:5]] == ["queue_status"] * 5
    limited = [a for a in answers if a.get("code") == "rate_limited"]
    assert len(limited) == 3 and all(a["retry_after_ms"] > 0 for a in limited)
    assert ws.close_code == 4008


async def test_connection_flood_from_one_address(start_worker: WorkerFactory) -> None:
    w = await start_worker(cfg=make_config(**{"server.connect_rate_per_ip": 1,
                                             "server.connect_burst_per_ip": 3}))
    accepted, refused = [], []
    for i in range(6):
        ws = await open_client(w.front.port, f"c{i}")
        first = await recv(ws)
        (accepted if first["type"] == "welcome" else refused).append((ws, first))
    assert len(accepted) == 3 and len(refused) == 3
    for ws, first in refused:
        assert first["code"] == "rate_limited" and first["retry_after_ms"] > 0
        assert await closed_code(ws) == 4008
    for ws, _ in accepted:
        await ws.close()
