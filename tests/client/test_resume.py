"""The client resumes across a rolling restart of a real `fastmatch serve` (close 1001, PROTOCOL
"Disconnect while queued"): same place in the queue, a fresh token for the new connection."""

from __future__ import annotations

import os
import signal

import redis.asyncio as aioredis

from server.client import CloseCode, Enqueued, Welcome, connect
from server.store import keys
from tests.app.served import Served, wait_workers
from tests.helpers import TIMEOUT, next_of, token


async def test_rolling_restart_is_resumed_with_a_fresh_token(redis_url: str, admin: aioredis.Redis) -> None:
    served = Served(redis_url, workers=1).start()
    try:
        before = await wait_workers(admin, 1)
        minted: list[str] = []

        def fresh_token() -> str:  # called for the first connection and for every reconnect
            minted.append(token("roll"))
            return minted[-1]

        async with connect(f"ws://127.0.0.1:{served.port}/ws", fresh_token, open_timeout_s=TIMEOUT,
                           resume_grace_s=1.5) as client:
            queued = await client.enqueue("5v5")
            await next_of(client, Enqueued)  # past this connection's own welcome in the stream
            served.signal(signal.SIGHUP)  # the replacement listens before the old worker drains
            welcome = await next_of(client, Welcome, timeout=TIMEOUT * 4)
            assert client.close_code == CloseCode.GOING_AWAY  # how the first connection ended
            assert welcome.state == "queued" and welcome.queued_at_ms == queued.queued_at_ms
            assert len(minted) == 2
            after = await wait_workers(admin, 1, exclude=set(before.values()), timeout=TIMEOUT * 6)
            assert not set(after.values()) & set(before.values())
            assert (await client.status()).state == "queued"
            await client.dequeue()
    finally:
        served.stop()


async def test_a_silent_server_is_pinged_and_left_for_another_worker(
    redis_url: str, admin: aioredis.Redis
) -> None:
    """Half-open: the worker holding the connection stops (SIGSTOP: no FIN, no RST, as a NAT
    that forgot the flow or a host gone). The client pings the silent connection, hears
    nothing, drops it and resumes on the other worker within the grace, place kept; without
    the ping its requests would hang until the kernel gave up, minutes later."""
    served = Served(redis_url, workers=2, FASTMATCH_SERVER__RESUME_GRACE_MS="10000").start()
    stopped = 0
    try:
        await wait_workers(admin, 2)
        async with connect(f"ws://127.0.0.1:{served.port}/ws", token("quiet"), open_timeout_s=1.0,
                           resume_grace_s=10.0, ping_interval_s=0.3, ping_timeout_s=0.3) as client:
            queued = await client.enqueue("5v5")
            await next_of(client, Enqueued)  # past this connection's own welcome in the stream
            holder = await admin.hget(keys.player("quiet"), "worker")
            stopped = int(str(holder).rsplit("-", 2)[1])
            os.kill(stopped, signal.SIGSTOP)
            welcome = await next_of(client, Welcome, timeout=TIMEOUT * 3)
            assert welcome.state == "queued" and welcome.queued_at_ms == queued.queued_at_ms
            assert await admin.hget(keys.player("quiet"), "worker") != holder
            assert (await client.status()).state == "queued"
            await client.dequeue()
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        served.stop()
