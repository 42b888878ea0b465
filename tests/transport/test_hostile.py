"""Hostile clients against a real worker (issue 18): inputs that once cost a traceback, and the
log and file-descriptor bounds that hold under abuse."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import cast

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from websockets.exceptions import InvalidStatus
from websockets.frames import Opcode

from server import metrics
from server.app.worker import Worker
from server.store import keys, players
from server.store.embedded import EmbeddedRedis
from tests.conftest import WorkerFactory, make_config
from tests.helpers import (
    TIMEOUT,
    answer,
    closed_code,
    connect_player,
    half_request,
    open_client,
    recv,
    request,
    send,
    token,
)
from tests.transport.rawws import CLOSE, CONT, PING, TEXT, RawClient, close_payload, frame


def counted(name: str, **labels: str) -> float:
    """A counter of this process's registry, with what workers tallied in memory added."""
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


# The loggers of what a client's bytes go through (the rest log the worker's own lifecycle).
CLIENT_PATH = frozenset({"server.transport.wsproto", "server.transport.connection",
                         "server.transport.frontend", "server.transport.proxyproto"})


def complaints(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records no client may cause: warnings and worse, and any traceback."""
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.WARNING or r.exc_info]


async def serves_quietly(worker: Worker, player: str, caplog: pytest.LogCaptureFixture) -> None:
    """After a hostile request: the next player is welcomed, and nothing was logged that a
    client may not cause."""
    ws, welcome = await connect_player(worker.front.port, player)
    assert welcome["type"] == "welcome"
    await ws.close()
    assert complaints(caplog) == []


# -- deep nesting (the report) --------------------------------------------------------------

def _nested_enqueue(depth: int) -> str:
    return '{"type":"enqueue","game_mode":"1v1","x":' + "[" * depth + "]" * depth + "}"


async def test_deep_nesting_in_an_ignored_field_is_invalid_message(
    start_worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """1,900 levels in a field that would be ignored: `invalid_message` counted against the
    budget (PROTOCOL 5), not 1011 and a traceback; the worker keeps serving."""
    caplog.set_level(logging.INFO)
    budget = 3
    w = await start_worker(cfg=make_config(**{"server.max_message_bytes": 16_384,
                                             "server.bad_message_budget": budget}))
    port = w.front.port
    frame = _nested_enqueue(1_900)
    assert len(frame) < 4096  # under even the default size limit
    invalid_before = counted("fastmatch_messages_received_total", type="invalid")
    ws, _ = await connect_player(port, "nester")
    for _ in range(budget):
        await ws.send(frame)
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "invalid_message"
    # The connection is still open and the player untouched by the bad input.
    assert (await request(ws, {"type": "status"}))["state"] == "idle"
    await ws.send(_nested_enqueue(8_000))  # one past the budget
    assert (await recv(ws))["code"] == "invalid_message"
    assert await closed_code(ws) == 1008
    assert counted("fastmatch_messages_received_total", type="invalid") - invalid_before == budget + 1
    again, welcome = await connect_player(port, "nester")
    assert welcome["type"] == "welcome"
    assert (await request(again, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    await again.close()
    assert complaints(caplog) == []


# -- the HTTP request (PROTOCOL 1) --------------------------------------------------------------------

@pytest.mark.parametrize("target", ["//[x/ws", "//[::1/ws?token=x", "http://[/ws"])
async def test_unparsable_request_target_gets_400_not_a_traceback(
    worker: Worker, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    """urlsplit raises ValueError on an authority like "[x": that is the client's error."""
    caplog.set_level(logging.INFO)
    client = await RawClient.connect(worker.front.port, "target", path=target)
    response = await client.handshake()
    client.close()
    assert response is not None and response.status_code == 400
    await serves_quietly(worker, "after-target", caplog)


async def test_two_authorization_headers_get_400_not_a_traceback(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the upgrade fuzzer: a second Authorization line made websockets' ``get`` raise
    inside the handshake (a 500 and a traceback). Which token to believe is anybody's guess:
    the request is malformed, whether the tokens agree or not."""
    caplog.set_level(logging.INFO)
    for second in (f"Bearer {token('other')}", f"Bearer {token('twice')}", ""):
        client = await RawClient.connect(worker.front.port, "twice", extra=(("authorization", second),))
        response = await client.handshake()
        client.close()
        assert response is not None and response.status_code == 400
        assert response.body == b"more than one Authorization header\n"
    await serves_quietly(worker, "twice", caplog)


async def test_a_stray_crlf_after_the_request_closes_without_a_traceback(
    worker: Worker, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the upgrade fuzzer (make fuzz): bytes after the request are read as WebSocket
    frames, and a CRLF is no frame, so websockets failed the connection while it parsed them;
    answering the request after that (a refusal: 401 here) hit websockets' assertion (a
    traceback). Such a connection is closed without an answer, whatever it would have got,
    and nothing is attached."""
    caplog.set_level(logging.INFO)
    for player in ("crlf", None):  # a welcome to come, a 401 to come
        client = await RawClient.connect(worker.front.port, player, early=b"\r\n")
        assert await client.handshake() is None  # closed, no answer
        assert client.eof
        client.close()
    assert not await admin.exists(keys.player("crlf"))
    await serves_quietly(worker, "crlf", caplog)


def received(kind: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value("fastmatch_messages_received_total", {"type": kind}) or 0.0


async def test_a_request_after_invalid_utf8_in_the_same_read_is_not_acted_on(
    worker: Worker, admin: aioredis.Redis,
) -> None:
    """Invalid UTF-8 closes the connection with 1007 (RFC 6455 8.1). An enqueue in the same
    TCP segment, after the bad frame, must not run: its answer could not be sent, and the
    player would be queued on a connection that is closing."""
    client = await RawClient.connect(worker.front.port, "utf8")
    response = await client.handshake()
    assert response is not None and response.status_code == 101
    assert json.loads(cast(bytes, (await client.next_frame()).data))["type"] == "welcome"
    enqueue = json.dumps({"type": "enqueue", "game_mode": "1v1"}).encode()
    enqueues = received("enqueue")
    await client.write(frame(TEXT, b"\xff\xfe") + frame(TEXT, enqueue))
    ending = await client.ending()
    assert ending.close_code == 1007 and not ending.invalid
    client.close()
    assert received("enqueue") == enqueues  # never handled, so never sent to Redis either
    async with asyncio.timeout(TIMEOUT):
        while await admin.exists(keys.player("utf8")):  # detached; nothing kept it
            await asyncio.sleep(0.01)


async def test_messages_before_the_clients_own_close_and_with_the_request_are_acted_on(
    worker: Worker,
) -> None:
    """Only what comes after a close this side began is dropped. A dequeue followed by the
    client's Close frame in one segment is still handled (RFC 6455: data before the Close is
    valid; whether it or the detach reaches Redis first is the client's race, as with any
    request it does not wait for). A request sent together with the upgrade request waits
    for the welcome and is answered."""
    status = json.dumps({"type": "status", "request_id": "early"}).encode()
    client = await RawClient.connect(worker.front.port, "early", early=frame(TEXT, status))
    response = await client.handshake()
    assert response is not None and response.status_code == 101
    kinds = [json.loads(cast(bytes, (await client.next_frame()).data))["type"] for _ in range(2)]
    assert kinds == ["welcome", "queue_status"]
    await client.write(frame(TEXT, json.dumps({"type": "enqueue", "game_mode": "1v1"}).encode()))
    assert json.loads(cast(bytes, (await client.next_frame()).data))["type"] == "enqueued"
    dequeues = received("dequeue")
    await client.write(frame(TEXT, json.dumps({"type": "dequeue"}).encode())
                       + frame(CLOSE, close_payload(1000)))
    ending = await client.ending()
    assert ending.close_code == 1000 and not ending.invalid
    client.close()
    assert received("dequeue") == dequeues + 1


# -- keepalive (docs/protocol.md section 1) --------------------------------------------------------

async def test_a_silent_peer_is_pinged_then_closed_and_a_talking_one_never_pinged(
    start_worker: WorkerFactory, admin: aioredis.Redis
) -> None:
    """A connection that sends nothing for ping_interval_s gets a ping; with nothing back (not
    even the pong) within ping_timeout_s it is closed 1011 and its player let go. Any frame
    counts as a sign of life: a client that talks is never pinged."""
    from websockets.frames import Close, Opcode

    # A ping interval ten times the talker's pace: a stalled loop (stress runs) cannot make
    # the talker look silent.
    w = await start_worker(cfg=make_config(**{"server.ping_interval_s": 1.0, "server.ping_timeout_s": 0.5}))
    silent = await RawClient.connect(w.front.port, "silent")
    talker = await RawClient.connect(w.front.port, "talker")
    for client in (silent, talker):
        response = await client.handshake()
        assert response is not None and response.status_code == 101
    talked: list[Opcode] = []
    for _ in range(25):  # 2.5 s: two and a half ping intervals
        talker.protocol.send_text(b'{"type":"status"}')
        await talker.write(b"".join(talker.protocol.data_to_send()))
        await asyncio.sleep(0.1)
        talked += [f.opcode for f in talker.frames]
        talker.frames.clear()
    assert Opcode.PING not in talked and Opcode.TEXT in talked
    opcodes = []
    started = time.monotonic()
    while (frame := await silent.next_frame()) is not None:  # the server ends it: no hang
        opcodes.append(frame.opcode)
        if frame.opcode is Opcode.CLOSE:
            close = Close.parse(frame.data)
            assert (close.code, close.reason) == (1011, "keepalive ping timeout")
            break
    assert opcodes == [Opcode.TEXT, Opcode.PING, Opcode.CLOSE]  # welcome, ping, close
    assert time.monotonic() - started < TIMEOUT
    silent.close()
    async with asyncio.timeout(TIMEOUT):  # its player is let go (detached): no record left
        while await admin.exists(keys.player("silent")):
            await asyncio.sleep(0.02)
    assert await admin.hget(keys.player("talker"), "conn")  # the talker is still attached
    talker.close()


# -- logs an attacker cannot flood (issue 18) ---------------------------------------------------------

def lines_of(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(kind)]


async def test_reconnect_loop_is_one_log_line_per_interval(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    """A client with a valid token reconnecting in a loop replaces its connection each time
    (PROTOCOL 1, close 4009): one INFO line per interval, not one per reconnect."""
    caplog.set_level(logging.INFO)
    port = worker.front.port
    previous, _ = await connect_player(port, "looper")
    for _ in range(50):
        current, welcome = await connect_player(port, "looper")
        assert welcome["type"] == "welcome"
        assert await closed_code(previous) == 4009
        previous = current
    await previous.close()
    assert len(lines_of(caplog, "sessions replaced by a newer connection")) <= 1
    assert complaints(caplog) == []


async def test_storage_errors_are_one_line_per_interval_and_no_traceback(
    start_worker: WorkerFactory, private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refusing a command (here an ACL denies ZADD, which every enqueue needs: the queue
    is a sorted set; OOM or MISCONF look the same) fails every enqueue with internal_error: one
    ERROR line per interval with the count and an example, not a traceback per request."""
    caplog.set_level(logging.INFO)
    w = await start_worker(url=private_redis.url)
    clients = [(await connect_player(w.front.port, f"denied{i}"))[0] for i in range(10)]
    admin = aioredis.Redis.from_url(private_redis.url)
    await admin.acl_setuser("default", enabled=True, nopass=True, commands=["-zadd"])
    errors_before = counted("fastmatch_errors_sent_total", code="internal_error")
    try:
        for _ in range(20):
            for ws in clients:
                answer = await request(ws, {"type": "enqueue", "game_mode": "1v1"})
                assert answer["type"] == "error" and answer["code"] == "internal_error", answer
    finally:
        await admin.acl_setuser("default", enabled=True, nopass=True, commands=["+@all"])
        await admin.aclose()
    assert counted("fastmatch_errors_sent_total", code="internal_error") - errors_before == 200
    refused = lines_of(caplog, "requests failed, storage error")
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert "no permissions to run the 'zadd' command" in refused[0].getMessage()
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    assert (await request(clients[0], {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    for ws in clients:
        await ws.close()


async def test_floods_are_counted_not_logged(
    start_worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Message floods (rate_limited, then 4008) and connection floods from one address
    (rate_limited at the welcome, then 4008): metrics count each, the log shows none."""
    caplog.set_level(logging.INFO)
    w = await start_worker(cfg=make_config(**{
        "server.message_rate": 5, "server.message_burst": 5, "server.rate_limit_strikes": 2,
        "server.connect_rate_per_ip": 1, "server.connect_burst_per_ip": 5}))
    port = w.front.port
    messages_before = counted("fastmatch_rate_limited_total", kind="message")
    connections_before = counted("fastmatch_rate_limited_total", kind="connection")
    for i in range(5):  # the connection burst
        ws, _ = await connect_player(port, f"flood{i}")
        for _ in range(20):
            await send(ws, {"type": "status"})
        assert await closed_code(ws) == 4008
    for i in range(20):  # past the connection burst: each refused at its welcome
        ws, first = await connect_player(port, f"again{i}")
        assert first["code"] == "rate_limited"
        assert await closed_code(ws) == 4008
    assert counted("fastmatch_rate_limited_total", kind="message") - messages_before == 5 * 3
    assert counted("fastmatch_rate_limited_total", kind="connection") - connections_before == 20
    assert [r.getMessage() for r in caplog.records if r.name in CLIENT_PATH] == []
    assert complaints(caplog) == []


# -- the connection cap (server.max_connections) -------------------------------------------------------

async def _refused_status(port: int, player: str) -> tuple[int, str | None]:
    """The HTTP status of a handshake the worker should refuse, and its Retry-After."""
    try:
        ws = await open_client(port, player)
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response.headers.get("Retry-After")
    await ws.close()
    return 101, None


async def test_a_ping_flood_is_closed_1008(worker: Worker) -> None:
    """Pings cost the worker a parse and a pong each and no message budget counts them: past a
    burst they close the connection (policy violation); a connection pinging now and then, as
    a keepalive does, is answered."""
    client = await RawClient.connect(worker.front.port, "pinger")
    assert (await client.handshake()) is not None
    assert (await client.next_frame()).opcode is Opcode.TEXT  # the welcome
    await client.write(frame(PING, b"once"))
    pong = await client.next_frame()
    assert pong is not None and pong.opcode is Opcode.PONG and pong.data == b"once"
    await client.write(b"".join(frame(PING, b"%d" % i) for i in range(200)))
    ending = await client.ending()
    assert ending.close_code == 1008 and "ping" in ending.close_reason, ending
    client.close()
    ws, welcome = await connect_player(worker.front.port, "after-pings")
    assert welcome["type"] == "welcome"
    await ws.close()


async def test_a_message_in_endless_empty_fragments_is_closed_1008(worker: Worker) -> None:
    """Empty continuation frames add nothing to a message's size, so the size limit never
    stops them: past a bound on fragments per message the connection is closed."""
    client = await RawClient.connect(worker.front.port, "fragments")
    assert (await client.handshake()) is not None
    assert (await client.next_frame()).opcode is Opcode.TEXT  # the welcome
    await client.write(frame(TEXT, b'{"type":', fin=False)
                       + b"".join(frame(CONT, b"", fin=False) for _ in range(500)))
    ending = await client.ending()
    assert ending.close_code == 1008 and "fragments" in ending.close_reason, ending
    client.close()


async def test_a_bug_during_the_attach_ends_the_handshake_and_releases_the_record(
    worker: Worker, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The open timeout does not run while a connection attaches: a bug after Redis took the
    attach must not leave the client waiting for an answer that never comes, nor the record
    held by a connection that will never be welcomed."""
    async def broken(*args: object) -> None:
        raise RuntimeError("a bug after the attach")

    monkeypatch.setattr(worker.front, "replace_previous", broken)
    client = await RawClient.connect(worker.front.port, "unlucky")
    # Closed without an answer at once, not left to the 10 s open timeout (or for good).
    assert await client.handshake(timeout=5.0) is None
    client.close()
    async with asyncio.timeout(TIMEOUT):  # released: idle, so forgotten
        while await admin.exists(keys.player("unlucky")):
            await asyncio.sleep(0.01)
    assert any("a bug after the attach" in str(r.exc_info) for r in caplog.records if r.exc_info)
    monkeypatch.undo()
    ws, welcome = await connect_player(worker.front.port, "unlucky")
    assert welcome["type"] == "welcome"
    await ws.close()


async def test_a_bug_inside_the_attach_after_redis_ran_it_releases_the_record(
    start_worker: WorkerFactory, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug raised inside the store's attach, after Redis ran the script (its reply being
    read): the attach never returned, but the record names this connection; it is released
    all the same (audit off: nothing else would)."""
    def broken(*args: object) -> None:
        raise RuntimeError("a bug reading the attach's reply")

    w = await start_worker(cfg=make_config(**{"server.audit_interval_s": 0}))
    monkeypatch.setattr(players, "_player_state", broken)
    client = await RawClient.connect(w.front.port, "unread")
    assert await client.handshake(timeout=TIMEOUT) is None  # aborted, not left waiting
    client.close()
    monkeypatch.undo()
    async with asyncio.timeout(TIMEOUT):  # released: idle, so forgotten
        while await admin.exists(keys.player("unread")):
            await asyncio.sleep(0.01)


async def test_an_attach_whose_reply_cannot_be_read_releases_the_record_it_took(
    start_worker: WorkerFactory, admin: aioredis.Redis,
) -> None:
    """Redis ran the attach (the record names this connection), but its reply cannot be read:
    here a player state this server does not know, as a newer server may write during a
    rolling deploy. The client is told `internal_error` and closed 1011, and the record the
    attach took is released at once, not left naming a dead connection until the audit (off
    here) or for good; it is kept, with its state, for the server that understands it (deleted,
    whatever it points to would be left without its player)."""
    w = await start_worker(cfg=make_config(**{"server.audit_interval_s": 0}))
    await admin.hset(keys.player("newer"), mapping={"state": "parked", "mode": ""})
    ws = await open_client(w.front.port, "newer")
    error = await recv(ws)
    assert error["type"] == "error" and error["code"] == "internal_error", error
    assert await closed_code(ws) == 1011
    async with asyncio.timeout(TIMEOUT):
        while await admin.hget(keys.player("newer"), "conn") is not None:
            await asyncio.sleep(0.01)
    assert await admin.hget(keys.player("newer"), "state") == "parked"


async def test_past_max_connections_handshakes_get_503_at_once(start_worker: WorkerFactory) -> None:
    # Loop-lag shedding off: on a machine busy on every core the event loop runs late and the
    # worker may refuse for `loop_lag` first (the same 503), which is not what is tested here
    # (make test-stress saw it).
    w = await start_worker(cfg=make_config(**{"server.max_connections": 5,
                                              "server.max_loop_lag_ms": 0}))
    port = w.front.port
    players = [(await connect_player(port, f"seated{i}"))[0] for i in range(5)]
    refused_before = counted("fastmatch_handshakes_refused_total", reason="max_connections")
    started = time.monotonic()
    answers = await asyncio.gather(*(_refused_status(port, f"late{i}") for i in range(30)))
    assert answers == [(503, "1")] * 30
    assert time.monotonic() - started < TIMEOUT / 2  # at once: not after a queue or a timeout
    assert counted("fastmatch_handshakes_refused_total", reason="max_connections") - refused_before == 30
    for ws in players:  # the players already connected keep their service
        assert (await request(ws, {"type": "enqueue", "game_mode": "5v5"}))["type"] == "enqueued"
    await players.pop().close()
    async with asyncio.timeout(TIMEOUT):  # the worker sees the connection end, then has room
        while len(w.front.connections) >= 5:
            await asyncio.sleep(0.01)
    nextone, welcome = await connect_player(port, "seated-next")
    assert welcome["type"] == "welcome"
    for ws in [*players, nextone]:
        await ws.close()


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_half_sent_requests_cannot_exhaust_descriptors(start_worker: WorkerFactory) -> None:
    """Sockets that never finish their HTTP request count against the worker's ceiling
    (max_connections + max_pending_handshakes): past it they are answered 503 and closed at
    once, instead of each holding a descriptor for the open timeout."""
    w = await start_worker(cfg=make_config(**{"server.max_connections": 5,
                                             "server.max_pending_handshakes": 5}))
    port = w.front.port
    players = [(await connect_player(port, f"kept{i}"))[0] for i in range(5)]
    refused_before = counted("fastmatch_handshakes_refused_total", reason="max_connections")
    descriptors = _descriptors()
    slow = [await half_request(port) for _ in range(100)]
    answers = await asyncio.gather(*(answer(sock, wait=TIMEOUT / 2.5) for sock in slow))
    held = [a for a in answers if a is None]
    assert len(held) == 5  # the ceiling's room for handshakes in progress
    assert all(a.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in a for a in answers if a is not None)
    # This process holds both ends: our 100 sockets, the worker's 5 held ones (and a few
    # refused ones still closing), not 100 more.
    assert _descriptors() - descriptors <= 100 + 5 + 10
    assert counted("fastmatch_handshakes_refused_total", reason="max_connections") - refused_before == 95
    for ws in players:
        assert (await request(ws, {"type": "status"}))["state"] == "idle"
    for sock in slow:
        sock.close()
    await players.pop().close()
    async with asyncio.timeout(TIMEOUT):
        while len(w.front.connections) >= 5:
            await asyncio.sleep(0.01)
    nextone, welcome = await connect_player(port, "kept-next")
    assert welcome["type"] == "welcome"
    for ws in [*players, nextone]:
        await ws.close()
