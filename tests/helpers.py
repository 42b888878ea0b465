"""Client-side helpers for tests: tokens, connections, reading JSON frames with a deadline.

Tests that play the protocol as a client would use fastmatch's own client (``player``,
``next_of``); tests that must send raw or malformed frames use websockets directly."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect

from server import client as fm
from server.config import DEV_SECRET
from server.protocol.auth import mint_token
from server.store import keys

# Every wait in the tests scales from this one constant (slow CI machines can raise it).
TIMEOUT: Final = float(os.environ.get("FASTMATCH_TEST_TIMEOUT", "5"))
M = TypeVar("M", bound=fm.ServerMessage)


def token(player: str, mmr: float | None = None, ttl_s: int = 600, **kw: Any) -> str:
    return mint_token(DEV_SECRET, player, mmr, ttl_s, **kw)


async def open_client(port: int, player: str, mmr: float | None = None) -> ClientConnection:
    return await connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers={"Authorization": f"Bearer {token(player, mmr)}"},
        open_timeout=TIMEOUT,
    )


async def player(port: int, name: str, mmr: float | None = None, **options: Any) -> fm.Client:
    """A connected player on fastmatch's own client (typed messages; requests raise errors)."""
    return await fm.connect(f"ws://127.0.0.1:{port}/ws", token(name, mmr), open_timeout_s=TIMEOUT,
                            **options)


async def next_of(client: fm.Client, kind: type[M], timeout: float = TIMEOUT) -> M:
    """The next message of one type from the client's stream, skipping the others."""
    async with asyncio.timeout(timeout):
        while True:
            message = await client.recv()
            if isinstance(message, kind):
                return message


async def recv(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        frame = await ws.recv()
    message: dict[str, Any] = json.loads(frame)
    return message


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def request(ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    await send(ws, message)
    return await recv(ws)


async def connect_player(
    port: int, player: str, mmr: float | None = None
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await open_client(port, player, mmr)
    return ws, await recv(ws)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT) -> None:
    """Wait for a condition held in Redis, which has no event to subscribe to."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


async def closed_code(ws: ClientConnection, timeout: float = TIMEOUT) -> int | None:
    """Drain frames until the server closes; return the close code it sent."""
    async with asyncio.timeout(timeout):
        await ws.wait_closed()
    return ws.close_code


async def on_every_node(admin: Any, *command: str) -> list[Any]:
    """A server command's reply from each node: one on a single Redis, one per node of a
    cluster (whose client would send it to one node only)."""
    if isinstance(admin, aioredis.RedisCluster):
        replies = await admin.execute_command(*command, target_nodes=aioredis.RedisCluster.ALL_NODES)
        return list(replies.values()) if isinstance(replies, dict) else [replies]
    return [await admin.execute_command(*command)]


async def player_and_queue_keys(admin: Any) -> list[str]:
    """Every key that would be left behind by a player, a queue entry or a match."""
    # SCAN, not KEYS: a cluster client sends KEYS to one node, and SCAN to every one.
    return sorted([k async for k in admin.scan_iter("*") if not keys.outlives_players(k)])


async def retry_while_unavailable(ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    """What a well-behaved client does: wait `retry_after_ms` and ask again (bounded)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            answer = await request(ws, message)
            if answer.get("code") != "unavailable":
                return answer
            await asyncio.sleep(answer["retry_after_ms"] / 1000)


# -- raw sockets, for what no WebSocket client sends ------------------------------------------------

async def half_request(port: int) -> socket.socket:
    """A client that starts its request and never finishes it (slowloris)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


async def answer(sock: socket.socket, wait: float = TIMEOUT) -> bytes | None:
    """Everything the server sent until it closed; None if it is still silent after ``wait``."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    data = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await loop.sock_recv(sock, 4096):
                data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass  # closed with our request unread: what it sent before is in ``data``
    return data
