"""The client resumes across a rolling restart of a real `fastmatch serve` (close 1001, PROTOCOL
"Disconnect while queued"): same place in the queue, a fresh token for the new connection."""

from __future__ import annotations

import signal

import redis.asyncio as aioredis

from server.client import CloseCode, Enqueued, Welcome, connect
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
