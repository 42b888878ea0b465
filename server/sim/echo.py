"""The load generator's own ceiling: the same client against a trivial websockets echo server.

A "lifecycle" here is what a simulated player costs the client: connect (with a token in the
URL), 4 requests answered, close. The rate this reaches is the most the generator could ever
report, so sim results are given as a rate and as a share of this ceiling.
"""

from __future__ import annotations

import asyncio
import json
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from server.protocol.auth import mint_token


async def _echo(ws: ServerConnection) -> None:
    await ws.send(json.dumps({"type": "welcome"}))
    async for frame in ws:
        await ws.send(frame)


async def measure_ceiling(seconds: float = 5.0, concurrency: int = 200) -> float:
    """Lifecycles per second the client completes against an echo server on loopback."""
    server = await serve(_echo, "127.0.0.1", 0, compression=None)
    port = server.sockets[0].getsockname()[1]
    token = mint_token("ceiling-secret-ceiling-secret-123", "p", 1500)
    done = 0
    stop = time.monotonic() + seconds

    async def one_client() -> None:
        nonlocal done
        while time.monotonic() < stop:
            async with connect(f"ws://127.0.0.1:{port}/ws?token={token}", compression=None,
                               ping_interval=None) as ws:
                await ws.recv()
                for kind in ("enqueue", "status", "loading_complete", "dequeue"):
                    await ws.send(json.dumps({"type": kind, "game_mode": "1v1"}))
                    await ws.recv()
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    server.close()
    await server.wait_closed()
    return done / elapsed


def ceiling_in_process(seconds: float) -> float:
    return asyncio.run(measure_ceiling(seconds))
