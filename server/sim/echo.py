"""The load generator's ceiling: the same client against a trivial stand-in server.

The stand-in answers like fastmatch does in one lifecycle (welcome; enqueue -> enqueued and
start_loading; loading_complete -> match_found) with no matchmaking behind it, so a "lifecycle"
here costs the client exactly what a simulated player does: connect with a token, the same
frames both ways, close. The rate it reaches is the most the generator could ever report, so
sim results are given as a rate and as a share of this ceiling.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import uvloop
from websockets.asyncio.server import ServerConnection, serve

from server.client import Enqueue, MatchFound, connect
from server.sim.tokens import TokenMinter

_WELCOME: Final = '{"type":"welcome","player_id":"p","state":"idle","protocol":1}'
_ENQUEUED: Final = '{"type":"enqueued","game_mode":"1v1","queued_at_ms":1}'
_START: Final = ('{"type":"start_loading","loading_session_id":"m","game_mode":"1v1",'
                 '"teams":[["p"],["q"]],"deadline_ms":1}')
_FOUND: Final = ('{"type":"match_found","loading_session_id":"m","game_mode":"1v1",'
                 '"server_address":"gs:7777","server_session_id":"s","teams":[["p"],["q"]]}')


async def _stand_in(ws: ServerConnection) -> None:
    await ws.send(_WELCOME)
    async for frame in ws:
        if '"enqueue"' in frame:
            await ws.send(_ENQUEUED)
            await ws.send(_START)
        elif '"loading_complete"' in frame:
            await ws.send(_FOUND)


async def measure_ceiling(seconds: float = 5.0, concurrency: int = 200) -> float:
    """Lifecycles per second the client completes against the stand-in on loopback."""
    server = await serve(_stand_in, "127.0.0.1", 0, compression=None)
    port = server.sockets[0].getsockname()[1]
    tokens = TokenMinter("ceiling-secret-ceiling-secret-123")
    url = f"ws://127.0.0.1:{port}/ws"
    done = 0
    stop = time.monotonic() + seconds

    async def one_client() -> None:
        nonlocal done
        while time.monotonic() < stop:
            async with connect(url, tokens.mint("p", 1500), auto_ready=True, reconnect=False) as client:
                client.send(Enqueue(game_mode="1v1"))
                async for message in client:
                    if type(message) is MatchFound:
                        break
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    server.close()
    await server.wait_closed()
    return done / elapsed


def ceiling_in_process(seconds: float) -> float:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(measure_ceiling(seconds))
