"""Redis frozen (SIGSTOP) and restarted (data and scripts lost): workers stay responsive,
clients get `unavailable`, and everything resumes by itself (DESIGN "Failure handling")."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from server.app.gameserver import ReferenceGameServer
from server.app.worker import Worker
from server.protocol import gameserver as gs
from server.protocol.results import ReadyResult
from server.store import keys
from server.store.breaker import BreakerState
from server.store.embedded import EmbeddedRedis
from tests.app.served import http_get
from tests.app.test_matchmaking import queued, start_loading
from tests.conftest import GameServerFactory, WorkerFactory, make_config
from tests.helpers import (
    TIMEOUT,
    closed_code,
    connect_player,
    recv,
    request,
    retry_while_unavailable,
    send,
)

FAULTY = {"redis.operation_timeout_s": 0.5, "redis.breaker_threshold": 3,
          "redis.breaker_cooldown_s": 0.5}
# The audit would also give a record naming an ended connection back to the live one: off
# where a test checks that some other path does.
NO_AUDIT = {"server.audit_interval_s": 0}


async def wait_for(check, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def matched_pair(port: int, prefix: str, redis_url: str) -> None:
    """Two fresh players with equal ratings reach start_loading: matching works end to end
    (with a game server listening: without one a mode forms no matches, issue 16)."""
    game = ReferenceGameServer(redis_url)
    async with asyncio.timeout(TIMEOUT * 2):
        await game.start()
    clients = [(await connect_player(port, f"{prefix}{i}", 7777))[0] for i in range(2)]
    for ws in clients:
        answer = await retry_while_unavailable(ws, {"type": "enqueue", "game_mode": "1v1"})
        assert answer["type"] == "enqueued", answer
    for ws in clients:
        await start_loading(ws, TIMEOUT * 2)
    for ws in clients:
        await ws.close()
    await game.close()


async def test_frozen_redis_opens_the_breaker_and_the_worker_stays_responsive(
    start_worker: WorkerFactory, private_redis: EmbeddedRedis
) -> None:
    w = await start_worker(url=private_redis.url, cfg=make_config(**FAULTY))
    ws, _ = await connect_player(w.front.port, "alice")
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        err = await request(ws, {"type": "enqueue", "game_mode": "1v1"})
        assert err["code"] == "unavailable" and err["retry_after_ms"] > 0
        assert time.monotonic() - started < 0.5 + 0.4  # the operation timeout, not more
        # The event loop is free: /health answers well inside the Redis timeout.
        for _ in range(5):
            started = time.monotonic()
            assert (await http_get(w.front.port, "/health"))[0] == 200
            assert time.monotonic() - started < 0.1
        await wait_for(lambda: _async(w.client.breaker.state is BreakerState.OPEN))
        started = time.monotonic()
        fast = await request(ws, {"type": "status"})
        assert fast["code"] == "unavailable" and time.monotonic() - started < 0.1  # no waiting
        assert (await http_get(w.front.port, "/ready"))[0] == 503
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    await wait_for(lambda: _ready(w.front.port))
    assert (await retry_while_unavailable(ws, {"type": "enqueue", "game_mode": "5v5"}))["type"] == "enqueued"
    await matched_pair(w.front.port, "after-freeze", private_redis.url)
    await ws.close()


async def test_redis_restart_loses_everything_and_service_resumes(
    start_worker: WorkerFactory, private_redis: EmbeddedRedis
) -> None:
    w = await start_worker(url=private_redis.url, cfg=make_config(**FAULTY))
    ws, _ = await connect_player(w.front.port, "bob", 1500)
    assert (await request(ws, {"type": "enqueue", "game_mode": "5v5"}))["type"] == "enqueued"
    generation = w.subscriber.generation
    private_redis.restart()  # no persistence: players, queues, leases and scripts are gone
    # The client is told its ticket is gone (DESIGN invariant 5) and can queue again.
    told = await recv(ws, TIMEOUT * 2)
    assert told == {"type": "dequeued", "game_mode": "5v5", "reason": "removed"}
    assert w.subscriber.generation > generation
    assert (await retry_while_unavailable(ws, {"type": "status"}))["state"] == "idle"
    await wait_for(lambda: _ready(w.front.port))
    # Scripts reloaded, lease re-acquired: matching works again.
    await matched_pair(w.front.port, "after-restart", private_redis.url)
    await ws.close()


async def _async(value: bool) -> bool:
    return value


async def _ready(port: int) -> bool:
    return (await http_get(port, "/ready"))[0] == 200


async def test_handshakes_that_time_out_in_attach_leave_no_record(
    start_worker: WorkerFactory, private_redis: EmbeddedRedis
) -> None:
    """Issue 13: players connecting while Redis is frozen are refused, but Redis may run their
    attach once it thaws; those records must not outlive the connections."""
    w = await start_worker(url=private_redis.url, cfg=make_config(**{
        **FAULTY, "redis.breaker_threshold": 1000}))  # every attach reaches the frozen Redis
    admin = aioredis.Redis.from_url(private_redis.url)
    warm, _ = await connect_player(w.front.port, "warm")  # Redis knows the attach script now
    await warm.close()
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        refused = await asyncio.gather(*(connect_player(w.front.port, f"thawed{i}") for i in range(8)))
        for ws, first in refused:
            assert first["type"] == "error" and first["code"] == "unavailable", first
            assert await closed_code(ws) == 1011
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    # Redis ran the attaches it had received when it thawed; housekeeping settles them.
    async with asyncio.timeout(TIMEOUT * 2):
        while await admin.keys("fm:player:*"):
            await asyncio.sleep(0.02)
    assert not await admin.smembers(keys.worker_players(w.worker_id))
    await admin.aclose()


async def test_a_request_that_timed_out_but_ran_is_reconciled_once_redis_answers(
    start_worker: WorkerFactory, private_redis: EmbeddedRedis
) -> None:
    """The enqueue reaches a frozen Redis and times out: the client hears `unavailable`; Redis
    runs it when it thaws, and the worker reads that back and sends the late `enqueued`."""
    w = await start_worker(url=private_redis.url, cfg=make_config(**{
        **FAULTY, "redis.breaker_threshold": 1000}))
    ws, _ = await connect_player(w.front.port, "late")
    # Redis knows the scripts (a script it never loaded would fail NOSCRIPT, not run).
    assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    assert (await request(ws, {"type": "dequeue"}))["type"] == "dequeued"
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        refused = await request(ws, {"type": "enqueue", "game_mode": "1v1", "request_id": "e1"})
        assert refused["code"] == "unavailable" and refused["request_id"] == "e1"
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    late = await recv(ws, TIMEOUT * 2)
    assert late["type"] == "enqueued" and late["game_mode"] == "1v1" and "request_id" not in late
    assert (await request(ws, {"type": "status"}))["state"] == "queued"
    await ws.close()


async def test_a_record_no_connection_holds_is_released_by_the_workers_audit(
    start_worker: WorkerFactory, redis_url: str
) -> None:
    """Issue 13: whatever left it (an outcome never settled, a bug), a record Redis says this
    worker holds on a connection it does not have is released; live players are untouched."""
    w = await start_worker(cfg=make_config(**{"server.audit_interval_s": 0.1}))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    live, _ = await connect_player(w.front.port, "live")
    await admin.hset(keys.player("ghost"), mapping={"state": "idle", "worker": w.worker_id,
                                                     "conn": f"{w.worker_id}.999999"})
    await admin.sadd(keys.worker_players(w.worker_id), "ghost")
    async with asyncio.timeout(TIMEOUT):
        while await admin.exists(keys.player("ghost")):
            await asyncio.sleep(0.02)
    assert await admin.smembers(keys.worker_players(w.worker_id)) == {"live"}
    assert (await request(live, {"type": "status"}))["state"] == "idle"  # still served
    await live.close()
    await admin.aclose()


async def test_the_audit_gives_a_record_naming_an_ended_connection_back_to_the_live_one(
    start_worker: WorkerFactory, redis_url: str
) -> None:
    """A failover lost a reconnect's attach: Redis names the player's previous connection,
    which this worker closed. The audit must not put the player in resume grace (its live
    connection would then be refused as replaced, 4009): the live connection takes the record
    back and stays queued. (make test-stress found this racing the resync after a failover.)"""
    w = await start_worker(cfg=make_config(**{"server.audit_interval_s": 0.05}))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    ws, _ = await connect_player(w.front.port, "dora", 1500)
    assert (await request(ws, {"type": "enqueue", "game_mode": "5v5"}))["type"] == "enqueued"
    live = await admin.hget(keys.player("dora"), "conn")
    await admin.hset(keys.player("dora"), "conn", f"{w.worker_id}.999999")  # the lost write's
    async with asyncio.timeout(TIMEOUT):
        while await admin.hget(keys.player("dora"), "conn") != live:
            await asyncio.sleep(0.02)
    assert await admin.hget(keys.player("dora"), "state") == "queued"
    assert await admin.zscore(keys.grace("5v5"), "dora") is None
    assert (await request(ws, {"type": "status"}))["state"] == "queued"
    assert ws.close_code is None
    await ws.close()
    await admin.aclose()


async def test_a_deferred_detach_of_a_replaced_connection_leaves_the_live_one_attached(
    start_worker: WorkerFactory, redis_url: str
) -> None:
    """A reconnect replaced the player's connection; the old one's detach failed (the primary
    died) and waits for housekeeping, and the failover lost the new one's attach, so Redis names
    the old connection. Retried as a detach, it would put the player in resume grace and the
    live connection would be refused as replaced (4009, found by make test-stress on the
    Sentinel topology): the live connection takes the record back instead."""
    w = await start_worker(cfg=make_config(**{"server.housekeeping_interval_s": 0.05}))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    ws, _ = await connect_player(w.front.port, "erin", 1500)
    assert (await request(ws, {"type": "enqueue", "game_mode": "5v5"}))["type"] == "enqueued"
    live = await admin.hget(keys.player("erin"), "conn")
    ended = f"{w.worker_id}.999999"
    await admin.hset(keys.player("erin"), "conn", ended)  # what the new primary holds
    w.front.pending_detach.add(("erin", ended))  # the detach that failed with the old primary
    async with asyncio.timeout(TIMEOUT):
        while w.front.pending_detach:
            await asyncio.sleep(0.02)
    assert await admin.hget(keys.player("erin"), "conn") == live
    assert await admin.hget(keys.player("erin"), "state") == "queued"
    assert await admin.zscore(keys.grace("5v5"), "erin") is None
    assert (await request(ws, {"type": "status"}))["state"] == "queued"
    # The usual case: the record already names the live connection (only the old one's detach
    # was deferred). Nothing changes and the player hears nothing: the next message it gets
    # is the answer to its own request.
    w.front.pending_detach.add(("erin", ended))
    async with asyncio.timeout(TIMEOUT):
        while w.front.pending_detach:
            await asyncio.sleep(0.02)
    assert await admin.hget(keys.player("erin"), "conn") == live
    assert (await request(ws, {"type": "status"}))["state"] == "queued"
    assert ws.close_code is None
    await ws.close()
    await admin.aclose()


async def test_a_record_an_ended_connection_released_is_taken_back_by_the_live_one(
    start_worker: WorkerFactory, redis_url: str
) -> None:
    """The failover window the deferred detach does not cover: the replaced connection's first
    detach reaches a new primary that lost the live connection's attach, so the record names
    the old connection and the detach releases it into resume grace. The live connection is
    not refused as replaced (4009): its next request is answered `unavailable` and it takes
    the record back, matchable again; a resync after the failover does the same. A record
    released by another worker's connection (a newer one, since ended) still means replaced."""
    w = await start_worker(cfg=make_config(**NO_AUDIT))  # the audit would take it back first
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    record = keys.player("frank")
    ws, _ = await connect_player(w.front.port, "frank", 1500)
    assert (await request(ws, {"type": "enqueue", "game_mode": "5v5"}))["type"] == "enqueued"
    live = await admin.hget(record, "conn")
    ended = f"{w.worker_id}.999999"

    async def taken_back() -> bool:
        return bool(await admin.hget(record, "conn") == live)

    async def released_by(conn: str, worker: str) -> None:
        await admin.hset(record, mapping={"conn": conn, "worker": worker})  # the new primary's
        outcome = await w.front.store.detach("frank", conn, worker_id=worker, mode_guess="5v5")
        assert outcome.outcome == "grace"
        assert await admin.hget(record, "conn") is None
        assert await admin.zscore(keys.grace("5v5"), "frank") is not None

    # A request meets the released record.
    await released_by(ended, w.worker_id)
    answer = await request(ws, {"type": "dequeue"})
    assert answer["type"] == "error" and answer["code"] == "unavailable", answer
    await wait_for(taken_back)
    assert await admin.hget(record, "state") == "queued"
    assert await admin.zscore(keys.grace("5v5"), "frank") is None  # matchable again
    assert (await request(ws, {"type": "status"}))["state"] == "queued"  # nothing else was said
    # The resync after a failover meets it.
    await released_by(ended, w.worker_id)
    await w.front.resync()
    assert await taken_back()
    assert await admin.zscore(keys.grace("5v5"), "frank") is None
    assert (await request(ws, {"type": "status"}))["state"] == "queued"
    assert ws.close_code is None
    # Released by a connection of another worker: that one replaced this connection.
    await released_by("vm-1-abcdef.7", "vm-1-abcdef")
    await ws.send('{"type": "dequeue"}')
    assert await closed_code(ws) == 4009
    await admin.aclose()


async def _end_older_connection(w: Worker, admin: aioredis.Redis, player: str, mode: str) -> str:
    """A failover lost the attach of ``player``'s live connection, so Redis still names its
    older connection on this worker; that one ends now (its handle_lost). Returns the live
    connection's id, once the release has run."""
    record = keys.player(player)
    live = str(await admin.hget(record, "conn"))
    ended = f"{w.worker_id}.999999"
    await admin.hset(record, "conn", ended)  # what the new primary holds
    w.front.release(player, ended, mode)
    async with asyncio.timeout(TIMEOUT):
        while (player, ended) in w.front.detaching:
            await asyncio.sleep(0.01)
    return live


async def test_a_ready_check_outlives_the_end_of_an_older_connection_redis_still_names(
    start_worker: WorkerFactory, start_game_server: GameServerFactory, redis_url: str
) -> None:
    """A player in a ready check reconnected on the same worker and a failover lost the new
    connection's attach; the old connection then ends. Its release must not take the player
    out of the ready check (the match cancelled for everyone, a dodge penalty) while it is
    still connected: the live connection takes the record back and can answer ready."""
    await start_game_server()
    w = await start_worker(cfg=make_config(**NO_AUDIT))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    clients = await queued(w.front.port, "1v1", ("gil", 1500), ("hal", 1500))
    session = {(await start_loading(ws))["loading_session_id"] for ws in clients.values()}.pop()
    live = await _end_older_connection(w, admin, "gil", "1v1")
    assert await admin.hget(keys.player("gil"), "conn") == live
    assert await admin.hget(keys.player("gil"), "state") == "loading"
    assert await admin.hget(keys.match("1v1", session), "status") == "loading"
    assert await admin.exists(keys.penalty("gil")) == 0
    assert await admin.zcard(keys.left("1v1")) == 0
    for ws in clients.values():
        await send(ws, {"type": "loading_complete", "loading_session_id": session})
    for ws in clients.values():
        found = await recv(ws)  # nothing else was said first (no requeued, no error)
        assert found["type"] == "match_found" and found["loading_session_id"] == session, found
    for ws in clients.values():
        await ws.close()
    await admin.aclose()


async def test_an_idle_player_can_enqueue_after_an_older_connection_redis_still_names_ends(
    start_worker: WorkerFactory, redis_url: str
) -> None:
    """The same for an idle player: a detach would delete the record under the live
    connection, whose next enqueue would be refused `unavailable` while it re-attaches. The
    live connection takes the record back at once and its enqueue simply succeeds."""
    w = await start_worker(cfg=make_config(**NO_AUDIT))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    ws, _ = await connect_player(w.front.port, "ivy", 1500)
    live = await _end_older_connection(w, admin, "ivy", "")
    assert await admin.hget(keys.player("ivy"), "conn") == live
    answer = await request(ws, {"type": "enqueue", "game_mode": "5v5"})
    assert answer["type"] == "enqueued", answer
    assert await admin.hget(keys.player("ivy"), "state") == "queued"
    assert ws.close_code is None
    await ws.close()
    await admin.aclose()


async def test_an_attach_clears_an_earlier_release_so_a_replaced_connection_cannot_take_it(
    start_worker: WorkerFactory, redis_url: str
) -> None:
    """A record released by an ended connection of worker A keeps its id (`released`); the
    player then reconnects on worker B, over a record that names no connection, so A's live
    connection is told nothing: B's replaced it. B's attach clears `released`: when an older
    detach.lua (a rolling deploy) later releases B's record without writing one, A's
    connection is refused as replaced (4009) instead of taking the record back."""
    a = await start_worker(cfg=make_config(**NO_AUDIT))
    b = await start_worker(cfg=make_config(**NO_AUDIT))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    record = keys.player("jo")
    ws, _ = await connect_player(a.front.port, "jo", 1500)
    assert (await request(ws, {"type": "enqueue", "game_mode": "5v5"}))["type"] == "enqueued"
    ended = f"{a.worker_id}.999999"
    await admin.hset(record, "conn", ended)
    assert (await a.front.store.detach("jo", ended, mode_guess="5v5")).outcome == "grace"
    assert await admin.hget(record, "released") == ended
    newer, welcome = await connect_player(b.front.port, "jo", 1500)
    assert welcome["state"] == "queued"
    assert await admin.hget(record, "released") is None
    await admin.hdel(record, "conn", "worker")  # the older detach.lua's release
    with pytest.raises(ConnectionClosed):
        answer = await request(ws, {"type": "dequeue"})
        pytest.fail(f"answered {answer}, not refused as replaced")
    assert ws.close_code == 4009
    assert await admin.hget(record, "conn") is None
    await newer.close()
    await admin.aclose()


async def test_a_request_that_finds_its_record_gone_is_refused_and_the_player_told(
    start_worker: WorkerFactory, redis_url: str
) -> None:
    """Redis lost a queued player's record (a restart without its data, reached before the
    worker noticed): the next request is not taken for a newer connection's (no 4009). It is
    refused `unavailable`, the worker re-attaches the connection, the player is told its
    ticket is gone, and it can queue again. The worker's audit runs all along: a record missing
    while its live connection attaches again is not the audit's to release."""
    w = await start_worker(cfg=make_config(**{"server.audit_interval_s": 0.005,
                                              "server.housekeeping_interval_s": 0.005}))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    ws, _ = await connect_player(w.front.port, "carol", 1500)
    assert (await request(ws, {"type": "enqueue", "game_mode": "5v5"}))["type"] == "enqueued"
    await admin.delete(keys.player("carol"))  # what the lost data held for carol
    await admin.zrem(keys.queue("5v5"), "carol")
    await admin.hdel(keys.tickets("5v5"), "carol")
    answer = await request(ws, {"type": "dequeue"})
    assert answer["type"] == "error" and answer["code"] == "unavailable", answer
    assert answer["retry_after_ms"] > 0
    told = await recv(ws)
    assert told == {"type": "dequeued", "game_mode": "5v5", "reason": "removed"}, told
    assert await admin.hget(keys.player("carol"), "state") == "idle"  # re-attached
    again = await request(ws, {"type": "enqueue", "game_mode": "5v5"})
    assert again["type"] == "enqueued", again
    assert ws.close_code is None
    await ws.close()
    await admin.aclose()


async def test_a_handoff_that_cannot_reach_redis_ends_quietly(
    start_worker: WorkerFactory, private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis freezes as the last player of a match loads: neither the battle_request nor the
    match's ending can be written. The handoff task logs one aggregated line, no traceback and
    no 'exception never retrieved'; the match's allocation deadline (in Redis) ends it later."""
    w = await start_worker(url=private_redis.url, cfg=make_config(**FAULTY))
    ready = ReadyResult("allocating", deadline_ms=1, teams=[["ann"], ["bob"]],
                        tickets={"ann": b"1500|1|{}", "bob": b"1500|1|{}"})
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING):
            for i in range(5):
                w.allocator.start("1v1", f"m{i}", ready)
            async with asyncio.timeout(TIMEOUT * 2):
                while w.allocator._tasks:  # the handoffs in flight
                    await asyncio.sleep(0.02)
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    lines = [r.getMessage() for r in caplog.records]
    assert any("handoffs not ended" in line for line in lines), lines
    assert not any(r.exc_info or "never retrieved" in r.getMessage() for r in caplog.records), lines
    assert sum("handoffs not ended" in line for line in lines) <= 2, lines  # one per interval


async def test_a_redis_that_evicts_keys_is_named_in_a_warning(
    start_worker: WorkerFactory, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """At its memory limit an evicting Redis may drop a record in the middle of a lifecycle,
    which no script repairs: every worker says so at start (and after each reconnection)."""
    with caplog.at_level(logging.WARNING, "server.app.housekeeping"):
        quiet = await start_worker()  # Redis' default, noeviction: nothing to say
        async with asyncio.timeout(TIMEOUT):
            while not quiet.housekeeper._policy_checked:
                await asyncio.sleep(0.02)
        assert "maxmemory-policy" not in caplog.text
        await admin.config_set("maxmemory-policy", "volatile-lru")
        try:
            await start_worker()
            async with asyncio.timeout(TIMEOUT):
                while "redis maxmemory-policy is volatile-lru" not in caplog.text:
                    await asyncio.sleep(0.02)
        finally:
            await admin.config_set("maxmemory-policy", "noeviction")


@pytest.mark.parametrize("draining", [False, True], ids=["serving", "draining"])
async def test_an_assignment_redis_could_not_take_at_once_is_written_when_it_can(
    start_worker: WorkerFactory, admin: aioredis.Redis, draining: bool
) -> None:
    """A game server took the match, and the write of that assignment times out (Redis
    paused for writes a moment). Given up at once, the match would end `allocation_failed` at
    its deadline and be requeued while the server holds a session for it; it is retried. A
    drain that begins meanwhile lets it finish (it requeued such a match `server_shutdown`,
    and its players' closes aborted it)."""
    worker = await start_worker(cfg=make_config(**{"gameserver.allocation_timeout_ms": 4000}))
    fleet = admin.pubsub()  # this test is the game server, to answer at the right moment
    await fleet.subscribe(worker.config.gameserver.request_channel)
    try:
        clients = await queued(worker.front.port, "1v1", ("ga", 1500), ("gb", 1500))
        session = ""
        for ws in clients.values():
            session = (await start_loading(ws))["loading_session_id"]
        for ws in clients.values():
            await send(ws, {"type": "loading_complete", "loading_session_id": session})
        async with asyncio.timeout(TIMEOUT):
            while (message := await fleet.get_message(ignore_subscribe_messages=True, timeout=1)) is None:
                pass
        request = gs.decode_request(message["data"].encode())
        answer = gs.BattleAssigned(match_id=request.match_id, server_address="gs-7:7777",
                                   server_session_id="s-7")
        # The answer and the pause in one transaction: the assignment's script comes after.
        async with admin.pipeline(transaction=True) as both:
            both.publish(request.reply_to, gs.encode(answer))
            both.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # three call timeouts
            await both.execute()
        if draining:
            async with asyncio.timeout(TIMEOUT):  # the answer is in hand, its write paused
                while not ((f := worker.allocator._pending.get(session)) and f.done()):
                    await asyncio.sleep(0.005)
            # The drain closes its players first: no abort of the match for them (it would
            # wait for Redis and end a match a game server took), then the allocator's close.
            await asyncio.wait_for(worker.events.left_loading("1v1", session, "ga", True), 0.2)
            await worker.allocator.close()
        for ws in clients.values():
            found = await recv(ws, TIMEOUT * 2)
            assert found["type"] == "match_found" and found["server_address"] == "gs-7:7777"
        assert await admin.hget(keys.match("1v1", session), "status") == "assigned"
    finally:
        await fleet.aclose()
