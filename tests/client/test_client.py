"""The Python client (server/client) against real workers, a real Redis and the reference game
server: the lifecycle, resumes, close codes, and every error code as its own exception."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, serve

from server.app.worker import Worker
from server.client import (
    AlreadyInQueue,
    Client,
    CloseCode,
    ConnectionClosed,
    Dequeued,
    Enqueued,
    Error,
    InternalError,
    InvalidMessage,
    InvalidState,
    LoadingTimeout,
    MatchFound,
    NotFound,
    NotInQueue,
    PlayerBlocked,
    RateLimited,
    Requeued,
    ServerError,
    ServiceUnavailable,
    SessionReplaced,
    StartLoading,
    TokenUnavailable,
    Unauthorized,
    Unavailable,
    UnsupportedGameMode,
    Welcome,
    WrongSessionId,
    connect,
    error_for,
)
from server.store import keys
from tests import helpers
from tests.conftest import GameServerFactory, WorkerFactory, make_config
from tests.helpers import TIMEOUT, next_of, token


def url(worker: Worker, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{worker.front.port}{path}"


async def next_error(client: Client) -> ServerError:
    """The next error that answers no request of ours (those were raised by the request)."""
    while True:
        message = await next_of(client, Error)
        if message.request_id is None:
            return error_for(message)


@contextlib.asynccontextmanager
async def player(worker: Worker, name: str, mmr: float = 1500, **options: bool) -> AsyncIterator[Client]:
    client = await helpers.player(worker.front.port, name, mmr, **options)
    async with client:
        yield client


# -- the lifecycle ---------------------------------------------------------------------------------

async def test_two_players_matched_through_match_found(
    worker: Worker, start_game_server: GameServerFactory
) -> None:
    await start_game_server()
    async with player(worker, "ann", auto_ready=True) as ann, player(worker, "ben", auto_ready=True) as ben:
        assert ann.welcome is not None and ann.welcome.state == "idle" and ann.player_id == "ann"
        queued = await ann.enqueue("1v1")
        assert isinstance(queued, Enqueued) and queued.request_id and ann.state == "queued"
        await ben.enqueue("1v1")
        seen: dict[str, list[str]] = {}
        found: dict[str, MatchFound] = {}
        for client in (ann, ben):
            kinds = seen.setdefault(client.player_id, [])
            async with asyncio.timeout(TIMEOUT):
                async for message in client:
                    kinds.append(type(message).__name__)
                    if isinstance(message, MatchFound):
                        found[client.player_id] = message
                        break
        # The stream holds every message in order, answers to requests included.
        assert seen["ann"] == ["Welcome", "Enqueued", "StartLoading", "MatchFound"]
        assert found["ann"].loading_session_id == found["ben"].loading_session_id
        assert found["ann"].server_address.endswith(":7777")
        assert sorted(p for team in found["ann"].teams for p in team) == ["ann", "ben"]
        assert ann.state == "idle" and ann.messages_sent == 2  # enqueue + automatic loading_complete
    assert ann.close_code == CloseCode.NORMAL


async def test_ready_when_the_caller_says_so(worker: Worker, start_game_server: GameServerFactory) -> None:
    await start_game_server()
    async with player(worker, "cat") as cat, player(worker, "dan", auto_ready=True) as dan:
        await cat.enqueue("1v1")
        await dan.enqueue("1v1")
        start = await next_of(cat, StartLoading)
        assert isinstance(start, StartLoading) and cat.loading_session_id == start.loading_session_id
        cat.auto_ready = True  # answers the ready check running now
        found = await next_of(cat, MatchFound)
        assert isinstance(found, MatchFound) and found.loading_session_id == start.loading_session_id
        assert isinstance(await next_of(dan, MatchFound), MatchFound)


async def test_token_in_the_query_string(worker: Worker) -> None:
    async with connect(url(worker), token("q1"), token_in_query=True) as client:
        assert client.player_id == "q1"
        assert (await client.status()).state == "idle"


async def test_iteration_ends_after_close(worker: Worker) -> None:
    client = await connect(url(worker), token("closer"))
    await client.close()
    await client.close()  # safe twice
    assert [m async for m in client] == [client.welcome]  # what arrived is still read, then the end
    with pytest.raises(ConnectionClosed):
        await client.status()


# -- resume and close codes --------------------------------------------------------------------------

async def test_resume_after_a_dropped_connection(worker: Worker, admin: aioredis.Redis) -> None:
    async with player(worker, "gina") as client:
        queued = await client.enqueue("1v1")
        await next_of(client, Enqueued)
        client.drop()  # no closing handshake: the server sees the socket die
        welcome = await next_of(client, Welcome)
        assert isinstance(welcome, Welcome) and welcome.state == "queued"
        assert welcome.queued_at_ms == queued.queued_at_ms  # the same place in the queue
        assert await admin.zscore(keys.queue("1v1"), "gina") == queued.queued_at_ms
        assert (await client.status()).state == "queued"


async def test_close_during_a_resume_lets_the_callers_cancellation_through(worker: Worker) -> None:
    """close() waits for the resume it stops; a cancellation aimed at the task calling close()
    (its timeout, a TaskGroup ending) must not be swallowed with the resume's own."""
    async with player(worker, "hana") as client:
        client.drop()
        async with asyncio.timeout(TIMEOUT):
            while client._reconnecting is None:  # the resume has begun
                await asyncio.sleep(0.001)
        closing = asyncio.create_task(client.close())
        await asyncio.sleep(0)  # close() now waits for the resume to end
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
        assert closing.cancelled()


async def test_a_token_function_that_fails_while_resuming_is_retried_then_ends_the_stream(
    start_worker: WorkerFactory,
) -> None:
    """A token function that raises (a token service down during the outage) is retried like
    a network failure; once it works the player resumes. One that keeps failing ends the
    stream within the grace with TokenUnavailable (its exception the cause): nothing hangs."""
    # Three attempts with full-jitter backoff take up to 0.7 s before the third one connects:
    # the server's resume grace must outlast them (the fast test config's is 0.4 s).
    worker = await start_worker(cfg=make_config(**{"server.resume_grace_ms": 10_000}))
    calls = {"flaky": 0, "doomed": 0}

    async def flaky() -> str:  # works, fails twice (the outage), works again
        calls["flaky"] += 1
        if calls["flaky"] in (2, 3):
            raise RuntimeError("token service down")
        return token("flaky")

    async with connect(url(worker), flaky) as client:
        await client.enqueue("1v1")
        await next_of(client, Enqueued)
        client.drop()
        welcome = await next_of(client, Welcome)
        assert welcome.state == "queued" and calls["flaky"] == 4

    def doomed_token() -> str:  # works once, then never again
        calls["doomed"] += 1
        if calls["doomed"] > 1:
            raise RuntimeError("token service down")
        return token("doomed")

    doomed = await connect(url(worker), doomed_token, resume_grace_s=1.0)
    doomed.drop()
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(TokenUnavailable) as raised:
            while True:
                await doomed.recv()
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert not doomed.connected


async def test_a_token_function_that_hangs_while_resuming_ends_the_stream_within_the_grace(
    worker: Worker,
) -> None:
    """A token service that never answers during the outage: each attempt gives it up after
    the open timeout, and the stream ends with TokenUnavailable once the grace has passed
    instead of waiting for it forever."""
    first = asyncio.Event()

    async def hanging() -> str:
        if first.is_set():
            await asyncio.Event().wait()  # never answers again
        first.set()
        return token("hanging")

    client = await connect(url(worker), hanging, resume_grace_s=1.0, open_timeout_s=0.3)
    client.drop()
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(TokenUnavailable, match=r"took longer than 0\.3s"):
            while True:
                await client.recv()
    assert not client.connected


async def test_a_bug_while_resuming_ends_the_stream_instead_of_hanging_it(
    worker: Worker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resume runs in a task nobody awaits: an exception that is not a network or protocol
    failure (a bug in the client or a library, a broken ssl context) must still end the stream,
    with the exception as the cause, not leave recv() waiting for a client that is gone."""
    client = await connect(url(worker), token("buggy"), resume_grace_s=5.0)

    def broken(uri: object) -> dict[str, object]:
        raise RuntimeError("a bug in the connect path")

    monkeypatch.setattr(client, "_tls", broken)  # the next attempt fails outside the library
    client.drop()
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(ConnectionClosed) as raised:
            while True:
                await client.recv()
    assert raised.value.code == CloseCode.ABNORMAL and "a bug in the connect path" in raised.value.reason
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert not client.connected


async def test_requests_the_server_would_refuse_unanswered_are_refused_before_sending(
    worker: Worker,
) -> None:
    """The server answers a malformed request with an invalid_message that names no request:
    sent, the request would wait for an answer that never comes. The client checks each
    request against the server's own schema first, and refuses a request_id still waiting."""
    async with player(worker, "strict") as client:
        sent = client.messages_sent
        for bad in ("", "m" * 65):
            with pytest.raises(ValueError, match="Enqueue"):
                await client.enqueue(bad)
        with pytest.raises(ValueError, match="Status"):
            await client.status(request_id="r" * 129)
        with pytest.raises(ValueError, match="LoadingComplete"):
            client.loading_complete("s" * 65)
        assert client.messages_sent == sent  # nothing left the client
        assert (await client.status(request_id="")).state == "idle"  # "" means "pick one"
        first = asyncio.ensure_future(client.status(request_id="same"))
        await asyncio.sleep(0)  # the first is sent and waits
        with pytest.raises(ValueError, match="already waiting"):
            await client.status(request_id="same")
        assert (await first).state == "idle"


async def test_two_readers_of_the_stream_each_get_a_message(worker: Worker) -> None:
    """recv() from two tasks at once: each gets one message, and one reader cancelled does not
    take the other's wake-up with it."""
    async with player(worker, "readers") as client:
        assert isinstance(await client.recv(), Welcome)
        cancelled = asyncio.ensure_future(client.recv())
        readers = [asyncio.ensure_future(client.recv()) for _ in range(2)]
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await client.enqueue("1v1")  # enqueued, then dequeued: two messages for two readers
        await client.dequeue()
        async with asyncio.timeout(TIMEOUT):
            got = await asyncio.gather(*readers)
        assert sorted(type(m).__name__ for m in got) == ["Dequeued", "Enqueued"]


async def test_a_second_connection_replaces_the_first_with_4009(worker: Worker) -> None:
    async with player(worker, "hal") as old:
        await old.enqueue("5v5")
        async with player(worker, "hal") as new:
            assert new.welcome is not None and new.welcome.state == "queued"
            with pytest.raises(SessionReplaced) as replaced:
                await next_of(old, MatchFound)  # never: the stream ends with the close
            assert replaced.value.code == CloseCode.SESSION_REPLACED == old.close_code
            assert not old.connected  # 4009 is not resumed: the other connection has the state


async def test_bad_message_budget_closes_with_1008(worker: Worker) -> None:
    async with player(worker, "spam") as client:
        for _ in range(4):  # the test budget is 3
            client.send("{{{")
        with pytest.raises(ConnectionClosed) as closed:
            await next_of(client, MatchFound)
        assert closed.value.code == CloseCode.POLICY


# -- the handshake's HTTP refusals ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "not-a-jwt"])
async def test_bad_token_is_unauthorized(worker: Worker, bad: str) -> None:
    with pytest.raises(Unauthorized) as refused:
        await connect(url(worker), bad)
    assert refused.value.status == 401


async def test_wrong_path_is_not_found(worker: Worker) -> None:
    with pytest.raises(NotFound):
        await connect(url(worker, "/nope"), token("p"))


async def test_503_carries_retry_after() -> None:
    """A load shedder's refusal (docs/protocol.md "Handshake"), from a small real HTTP server."""
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 5\r\n"
                     b"Connection: close\r\n\r\nbusy\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ServiceUnavailable) as refused:
            await connect(f"ws://127.0.0.1:{port}/ws", token("p"), open_timeout_s=TIMEOUT)
        assert refused.value.status == 503 and refused.value.retry_after_s == 2.0
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def newer_server(
    handler: Callable[[ServerConnection], Awaitable[None]], *, auto_ready: bool,
) -> AsyncIterator[Client]:
    """A client of a small real WebSocket server that plays a newer fastmatch (``handler``)."""
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = await connect(f"ws://127.0.0.1:{port}/ws", token("p"), auto_ready=auto_ready,
                               open_timeout_s=TIMEOUT)
        async with client:
            yield client


async def test_a_newer_servers_fields_types_and_values_do_not_cost_a_message() -> None:
    """docs/protocol.md 2: a newer server may add fields, message types and values of a
    reason or an error code. The client skips only the message type it does not know; a
    `requeued` or `dequeued` with a reason it does not know still moves its state, and an
    unknown code is a plain ServerError (from a small real WebSocket server)."""
    frames = [
        {"type": "welcome", "player_id": "p", "state": "queued", "protocol": 1,
         "game_mode": "1v1", "queued_at_ms": 5, "region": "eu-west"},
        {"type": "party_invite", "from": "q"},
        {"type": "start_loading", "loading_session_id": "m1", "game_mode": "1v1",
         "teams": [["p"], ["q"]], "deadline_ms": 9, "map": "dust"},
        {"type": "requeued", "game_mode": "1v1", "reason": "match_cancelled", "queued_at_ms": 5},
        {"type": "dequeued", "game_mode": "1v1", "reason": "season_ended"},
        {"type": "error", "code": "quota_exceeded", "message": "too many games today"},
    ]

    async def newer(ws: ServerConnection) -> None:
        for frame in frames:
            await ws.send(json.dumps(frame))
        await ws.wait_closed()

    async with newer_server(newer, auto_ready=False) as client:
        got = [await asyncio.wait_for(client.recv(), TIMEOUT) for _ in range(5)]
        assert [type(m).__name__ for m in got] == [
            "Welcome", "StartLoading", "Requeued", "Dequeued", "Error"]
        welcome, _, requeued, dequeued, error = got
        assert isinstance(welcome, Welcome) and welcome.state == "queued"
        assert isinstance(requeued, Requeued) and requeued.reason == "match_cancelled"
        assert isinstance(dequeued, Dequeued) and dequeued.reason == "season_ended"
        assert client.state == "idle" and client.game_mode is None
        assert isinstance(error, Error)
        raised = error_for(error)
        assert type(raised) is ServerError and raised.code == "quota_exceeded"


async def test_a_ready_answer_refused_with_an_unknown_code_is_sent_again() -> None:
    """docs/protocol.md: an unknown error code counts as internal_error, so auto_ready sends a
    loading_complete the server refused with one again, after its retry_after_ms."""
    answers: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    async def newer(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "welcome", "player_id": "p", "state": "idle", "protocol": 1}))
        await ws.send(json.dumps({"type": "start_loading", "loading_session_id": "m1",
                                  "game_mode": "1v1", "teams": [["p"], ["q"]], "deadline_ms": 9}))
        await answers.put(json.loads(await ws.recv()))
        await ws.send(json.dumps({"type": "error", "code": "shard_moving", "message": "soon",
                                  "retry_after_ms": 20}))
        await answers.put(json.loads(await ws.recv()))
        await ws.wait_closed()

    async with newer_server(newer, auto_ready=True):
        for _ in range(2):
            answer = await asyncio.wait_for(answers.get(), TIMEOUT)
            assert answer["type"] == "loading_complete" and answer["loading_session_id"] == "m1"


# -- every error code, as its own exception ---------------------------------------------------------------

async def test_request_errors_raise_their_exception(worker: Worker) -> None:
    async with player(worker, "eve") as client:
        with pytest.raises(UnsupportedGameMode) as unsupported:
            await client.enqueue("chess", request_id="x")
        assert unsupported.value.request_id == "x" and unsupported.value.code == "unsupported_game_mode"
        with pytest.raises(NotInQueue):
            await client.dequeue()
        client.loading_complete("m1")  # no ready check running: the error arrives as a message
        assert isinstance(await next_error(client), InvalidState)
        client.send('{"type": "teleport"}')
        assert isinstance(await next_error(client), InvalidMessage)
        await client.enqueue("1v1")
        with pytest.raises(AlreadyInQueue):
            await client.enqueue("5v5")


async def _ticket_lost(admin: aioredis.Redis, name: str) -> None:
    """Redis loses the player's ticket (as a restart without persistence can): idle there."""
    await admin.zrem(keys.queue("1v1"), name)
    await admin.hdel(keys.tickets("1v1"), name)
    await admin.hset(keys.player(name), "state", "idle")
    await admin.hdel(keys.player(name), "mode", "queued_at")


@pytest.mark.parametrize("ask", ["dequeue", "status"])
async def test_the_servers_answer_corrects_a_state_redis_lost(
    worker: Worker, admin: aioredis.Redis, ask: str
) -> None:
    """The client believes it is queued; Redis lost the ticket. `not_in_queue` (the answer to
    `dequeue`) and `queue_status` say where the player stands, and `client.state` follows:
    an app that offers "Play" only while idle must not be stuck."""
    async with player(worker, f"lost-{ask}", 100_000) as client:
        await client.enqueue("1v1")
        assert client.state == "queued"
        await _ticket_lost(admin, f"lost-{ask}")
        if ask == "dequeue":
            with pytest.raises(NotInQueue):
                await client.dequeue()
        else:
            assert (await client.status()).state == "idle"
        assert client.state == "idle" and client.game_mode is None


async def test_a_generated_request_id_is_never_one_the_caller_has_waiting(worker: Worker) -> None:
    """The caller named its own request "c1", the id the client would generate next: the
    generated one skips it instead of failing for an id the caller never gave."""
    async with player(worker, "ids") as client:
        named, generated = await asyncio.gather(client.status(request_id="c1"), client.status())
        assert named.request_id == "c1" and generated.request_id not in (None, "c1")


async def test_loading_errors_timeout_and_block(
    start_worker: WorkerFactory, start_game_server: GameServerFactory
) -> None:
    await start_game_server()
    w = await start_worker(cfg=make_config(**{"matching.ready_timeout_ms": 400, "penalty.threshold": 1}))
    async with player(w, "afk") as afk, player(w, "ok", auto_ready=True) as ok:
        await afk.enqueue("1v1")
        await ok.enqueue("1v1")
        await next_of(afk, StartLoading)
        with pytest.raises(InvalidState):
            await afk.dequeue()  # a match is loading: it cannot be left
        afk.loading_complete("not-this-one")
        assert isinstance(await next_error(afk), WrongSessionId)
        assert isinstance(await next_error(afk), LoadingTimeout)  # never answered in time
        assert afk.state == "idle"
        with pytest.raises(PlayerBlocked) as blocked:
            await afk.enqueue("1v1")
        assert blocked.value.retry_after_ms is not None and blocked.value.retry_after_ms > 0


async def test_a_ready_answer_the_server_could_not_take_is_sent_again(
    start_worker: WorkerFactory, start_game_server: GameServerFactory, admin: aioredis.Redis
) -> None:
    """Redis is paused for writes as the automatic `loading_complete` arrives: the server
    answers `unavailable` (the call was dropped with its connection, so it never ran). The
    client sends it again after the retry hint, instead of counting it as sent, which let
    the player time out of the ready check, with a dodge, for the server's failure."""
    await start_game_server()
    w = await start_worker(cfg=make_config(**{"matching.ready_timeout_ms": 10_000}))
    async with player(w, "slow") as slow, player(w, "fast", auto_ready=True) as fast:
        await slow.enqueue("1v1")
        await fast.enqueue("1v1")
        start = await next_of(slow, StartLoading)
        await admin.execute_command("CLIENT", "PAUSE", 1200, "WRITE")  # past the call timeout
        slow.auto_ready = True  # answers now, into the pause
        assert isinstance(await next_error(slow), Unavailable)
        found = await next_of(slow, MatchFound)
        assert isinstance(found, MatchFound) and found.loading_session_id == start.loading_session_id
        assert isinstance(await next_of(fast, MatchFound), MatchFound)
        assert slow.messages_sent >= 3  # enqueue, the answer refused, the answer again (and again)


async def test_flood_is_rate_limited_then_closed_4008(start_worker: WorkerFactory) -> None:
    w = await start_worker(cfg=make_config(**{"server.message_rate": 2, "server.message_burst": 2,
                                             "server.rate_limit_strikes": 1}))
    async with player(w, "flood") as client:
        answers = await asyncio.gather(*(client.status() for _ in range(6)), return_exceptions=True)
        limited = [a for a in answers if isinstance(a, RateLimited)]
        assert limited and all(e.retry_after_ms for e in limited)
        with pytest.raises(ConnectionClosed) as closed:
            await next_of(client, MatchFound)
        assert closed.value.code == CloseCode.RATE_LIMITED


async def test_unavailable_storage(start_worker: WorkerFactory, private_redis) -> None:  # type: ignore[no-untyped-def]
    w = await start_worker(url=private_redis.url)
    async with player(w, "liam") as client:
        private_redis.process.send_signal(19)  # SIGSTOP: Redis hangs
        try:
            with pytest.raises(Unavailable) as unavailable:
                await client.enqueue("1v1")
            assert unavailable.value.retry_after_ms and unavailable.value.retry_after_ms > 0
            with pytest.raises(Unavailable):  # refused at connect: error, then close 1011
                await connect(url(w), token("mia"), reconnect=False)
        finally:
            private_redis.process.send_signal(18)  # SIGCONT


async def test_internal_error_at_connect(worker: Worker, admin: aioredis.Redis) -> None:
    await admin.set(keys.player("broken"), "not a hash")  # the attach script fails on it
    with pytest.raises(InternalError):
        await connect(url(worker), token("broken"))
    await admin.delete(keys.player("broken"))
