"""What happens to a connection while its attach is in flight (docs/protocol.md section 1):
Redis is paused for writes (`CLIENT PAUSE ... WRITE`) so that the attach script waits, and the
event that races it happens for real meanwhile (the client drops, a newer connection's
replacement notice arrives). Real worker, real Redis, real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from websockets.frames import Close, Opcode

from server.app.worker import Worker
from server.store import keys
from server.store.embedded import EmbeddedRedis
from server.transport import envelope
from server.transport.connection import ClientConnection
from tests.conftest import WorkerFactory, make_config
from tests.helpers import TIMEOUT, closed_code, connect_player, request
from tests.transport.rawws import RawClient

# Long enough that the paused attach never times out, nor a worker's heartbeat (a write, so
# paused too) lapses, however slow the machine.
SLOW_OK = {"redis.operation_timeout_s": 10.0, "server.resume_grace_ms": 30_000,
           "server.heartbeat_ttl_s": 30.0}


@asynccontextmanager
async def writes_paused(admin: aioredis.Redis) -> AsyncIterator[None]:
    await admin.execute_command("CLIENT", "PAUSE", 8000, "WRITE")
    try:
        yield
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")


async def attaching(worker: Worker, player: str) -> ClientConnection:
    """The connection of ``player`` whose attach is in flight on ``worker``."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            for client in worker.front.connections.values():
                if client.player_id == player and client.handshaking:
                    return client
            await asyncio.sleep(0.005)


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not await check():
            await asyncio.sleep(0.01)


async def test_replaced_while_attaching_is_closed_4009_never_welcomed(
    start_worker: WorkerFactory, admin: aioredis.Redis,
) -> None:
    """A newer connection on another worker attached and sent this one's replacement before
    this one's attach answered: it must hear 4009 after its 101, not be welcomed as a live
    zombie that Redis no longer routes anything to."""
    worker = await start_worker(cfg=make_config(**SLOW_OK))
    async with writes_paused(admin):
        client = await RawClient.connect(worker.front.port, "zombie")
        conn = await attaching(worker, "zombie")
        worker.front.on_delivery(envelope.encode(envelope.Replace(player="zombie", conn=conn.conn_id)))
    response = await client.handshake()
    assert response is not None and response.status_code == 101
    first = await client.next_frame()  # the close frame, no welcome before it
    assert first is not None and first.opcode is Opcode.CLOSE, first
    assert Close.parse(first.data).code == 4009 and not client.invalid()
    client.close()


async def test_dropped_while_attaching_gives_the_record_back_to_the_open_connection(
    start_worker: WorkerFactory, admin: aioredis.Redis,
) -> None:
    """The player's queued connection A is open; a second connection B (same worker) takes
    the record in its attach and drops before the answer. B is released as any ended
    connection is: A takes the record back and keeps its place, instead of the player going
    into resume grace (and out of the queue when it ends) under A's feet."""
    worker = await start_worker(cfg=make_config(**SLOW_OK))
    a, _ = await connect_player(worker.front.port, "stays")
    queued = await request(a, {"type": "enqueue", "game_mode": "1v1"})
    holder = next(c for c in worker.front.connections.values() if c.player_id == "stays")
    async with writes_paused(admin):
        b = await RawClient.connect(worker.front.port, "stays")
        second = await attaching(worker, "stays")
        b.close()  # gone before its attach answers
        async with asyncio.timeout(TIMEOUT):
            while not second.lost:
                await asyncio.sleep(0.005)

    async def settled() -> bool:  # B's attach answered and its release ran
        return not second.handshaking and ("stays", second.conn_id) not in worker.front.detaching

    await eventually(settled)
    # At once, not after housekeeping's audit repairs it: never in grace, A holds the record.
    assert await admin.zscore(keys.grace("1v1"), "stays") is None
    assert await admin.hget(keys.player("stays"), "conn") == holder.conn_id
    status = await request(a, {"type": "status"})
    assert status["state"] == "queued" and status["waited_ms"] >= 0
    assert await admin.zscore(keys.queue("1v1"), "stays") == queued["queued_at_ms"]
    await a.close()


async def test_dropped_while_attaching_tells_the_connection_it_replaced_on_another_worker(
    start_worker: WorkerFactory, admin: aioredis.Redis,
) -> None:
    """The same with A on another worker, which cannot take the record back: A hears the 4009
    a welcomed B would have caused (PROTOCOL 1) instead of staying open and untold while the
    player sits in resume grace."""
    here = await start_worker(cfg=make_config(**SLOW_OK))
    there = await start_worker(cfg=make_config(**SLOW_OK))
    a, _ = await connect_player(there.front.port, "moved")
    await request(a, {"type": "enqueue", "game_mode": "1v1"})
    async with writes_paused(admin):
        b = await RawClient.connect(here.front.port, "moved")
        await attaching(here, "moved")
        b.close()
    assert await closed_code(a) == 4009

    async def resumable() -> bool:  # as after any drop: in resume grace, its place kept
        return await admin.zscore(keys.grace("1v1"), "moved") is not None

    await eventually(resumable)


async def test_a_replacement_notice_that_failed_to_publish_is_sent_again(
    start_worker: WorkerFactory, private_redis: EmbeddedRedis,
) -> None:
    """The newer connection's worker tells the older one's worker with a PUBLISH; when that
    fails, housekeeping sends it again, instead of leaving the old connection open and untold
    until it speaks (the other worker's subscriber did not fail, so no resync of its own
    would catch it). The failure here is real: Redis refuses PUBLISH to the workers' user
    (`ACL SETUSER ... -publish`) until the test allows it again."""
    admin = aioredis.Redis.from_url(private_redis.url)
    await admin.execute_command("ACL", "SETUSER", "fm", "on", ">pw", "~*", "&*", "+@all")
    url = private_redis.url.replace("unix://", "unix://fm:pw@", 1)
    there = await start_worker(url=url)
    here = await start_worker(url=url)
    a, _ = await connect_player(there.front.port, "told")
    await admin.execute_command("ACL", "SETUSER", "fm", "-publish")
    try:
        b, welcome = await connect_player(here.front.port, "told")  # the attach is a script: allowed
        assert welcome["type"] == "welcome"
        async with asyncio.timeout(TIMEOUT):
            while not here.front.pending_replace:
                await asyncio.sleep(0.01)
        assert a.close_code is None  # still open: nobody told it yet
    finally:
        await admin.execute_command("ACL", "SETUSER", "fm", "+publish")
    assert await closed_code(a) == 4009  # housekeeping sent it once Redis took it
    assert not here.front.pending_replace
    await b.close()
    await admin.aclose()
