"""Abuse against `fastmatch serve` as real processes (issue 18): 10,000 bad frames leave the
log as it was while the metrics count every one of them, and a worker short of descriptors
refuses connections instead of running out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from collections.abc import AsyncIterator
from typing import Final

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.transport.fdlimit import fit
from tests.app.served import FASTMATCH, Served, http_get, sample, wait_workers
from tests.helpers import TIMEOUT, connect_player, player_and_queue_keys, request

FRAMES: Final = 10_000
PER_CONNECTION: Final = 100  # bad_message_budget 99: the 100th is answered, then close 1008
# Bad input of every kind the decoder meets: syntax, binary, schema, a type nobody knows,
# nesting past the interpreter's recursion limit in an ignored field (the report),
# an escaped lone surrogate, a field over its length limit, JSON that is not an object.
BAD_FRAMES: Final[list[str | bytes]] = [
    "{{{", b"\x00\x01binary", '{"type":"enqueue","game_mode":5}', '{"type":"teleport"}',
    '{"type":"enqueue","game_mode":"1v1","x":' + "[" * 1_900 + "]" * 1_900 + "}",
    '{"type":"status","request_id":"\\ud800"}', json.dumps({"type": "status", "request_id": "x" * 129}),
    "[]",
]
# What the log may grow by while this runs. No bad frame is logged at all; lines that client
# traffic can cause come from server/logthrottle.py: per kind, the first occurrence in each
# 10 s interval and one summary with the count. The run takes seconds, so a handful of lines
# from the workers' own lifecycle fit; one line per connection (100) or per frame (10,000)
# does not.
LOG_BOUND: Final = 10


@pytest.fixture
async def served(redis_url: str) -> AsyncIterator[Served]:
    served = Served(redis_url, workers=2, **{
        "FASTMATCH_SERVER__BAD_MESSAGE_BUDGET": str(PER_CONNECTION - 1),
        # Only the bad-input budget may end these connections: no rate limit in the way.
        "FASTMATCH_SERVER__MESSAGE_RATE": "1000000", "FASTMATCH_SERVER__MESSAGE_BURST": "1000000",
        "FASTMATCH_SERVER__CONNECT_RATE_PER_IP": "1000000",
        "FASTMATCH_SERVER__CONNECT_BURST_PER_IP": "1000000",
    }).start()
    try:
        admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await wait_workers(admin, 2)
        await admin.aclose()
        yield served
    finally:
        await asyncio.to_thread(served.stop)


async def _abuse(port: int, player: str) -> int:
    """One connection's worth of bad frames; the invalid_message answers it got."""
    ws, welcome = await connect_player(port, player)
    assert welcome["type"] == "welcome"
    for i in range(PER_CONNECTION):
        await ws.send(BAD_FRAMES[i % len(BAD_FRAMES)])
    answers = 0
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(TIMEOUT):
            async for frame in ws:
                message = json.loads(frame)
                assert message["type"] == "error" and message["code"] == "invalid_message", message
                answers += 1
    assert ws.close_code == 1008, (ws.close_code, ws.close_reason)
    return answers


async def _counts(served: Served) -> tuple[float, float]:
    _, text = await http_get(served.metrics_port, "/metrics")
    return (sample(text, "fastmatch_messages_received_total", type="invalid") or 0.0,
            sample(text, "fastmatch_errors_sent_total", code="invalid_message") or 0.0)


@pytest.mark.slow
async def test_ten_thousand_bad_frames_grow_the_log_by_a_bounded_number_of_lines(
    served: Served, admin: aioredis.Redis
) -> None:
    before = served.output().splitlines()
    assert await _counts(served) == (0.0, 0.0)
    connections = FRAMES // PER_CONNECTION
    gate = asyncio.Semaphore(10)

    async def one(i: int) -> int:
        async with gate:
            return await _abuse(served.port, f"abuser{i}")

    answered = await asyncio.gather(*(one(i) for i in range(connections)))
    assert sum(answered) == FRAMES
    # Workers add their in-memory counts to /metrics every metrics.flush_interval_s (0.1 s here).
    async with asyncio.timeout(TIMEOUT):
        while await _counts(served) != (FRAMES, FRAMES):
            await asyncio.sleep(0.05)
    fresh, welcome = await connect_player(served.port, "after-abuse")
    assert welcome["type"] == "welcome"
    await fresh.close()
    async with asyncio.timeout(TIMEOUT):
        while await player_and_queue_keys(admin):
            await asyncio.sleep(0.05)
    grown = served.output().splitlines()[len(before):]
    assert len(grown) <= LOG_BOUND, "\n".join(grown)
    assert not [line for line in grown if " ERROR " in line or "Traceback" in line], "\n".join(grown)


class LimitedServed(Served):
    """`fastmatch serve` under a hard descriptor limit (a container's, say) it cannot raise."""

    def __init__(self, redis_url: str, nofile: int, **env: str) -> None:
        super().__init__(redis_url, workers=1, **env)
        self.nofile = nofile

    def start(self) -> LimitedServed:
        limited = f'ulimit -Sn {self.nofile} && ulimit -Hn {self.nofile} && exec "$0" serve --workers 1'
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(["sh", "-c", limited, FASTMATCH], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)
        return self


async def _seat(port: int, player: str) -> tuple[ClientConnection | None, int]:
    """A player's handshake: its connection if welcomed, else the HTTP status it got."""
    try:
        ws, welcome = await connect_player(port, player)
    except InvalidStatus as exc:
        assert exc.response.headers.get("Retry-After") == "1"
        return None, exc.response.status_code
    assert welcome["type"] == "welcome"
    return ws, 101


async def _slowloris(port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


async def _first_bytes(sock: socket.socket, wait: float) -> bytes | None:
    """What the server sent before closing; None while it stays silent."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        try:
            async with asyncio.timeout(wait):
                while chunk := await asyncio.get_running_loop().sock_recv(sock, 4096):
                    data += chunk
        except TimeoutError:
            return None
    return data


@pytest.mark.slow
async def test_worker_under_a_low_descriptor_limit_refuses_instead_of_running_out(
    redis_url: str, admin: aioredis.Redis
) -> None:
    """With 200 descriptors and max_connections 500 the cap cannot be met: the worker says so
    at start and takes what fits; every handshake past it, and every half-sent request past
    its ceiling, gets a 503 at once; the worker never runs out and keeps serving."""
    served = LimitedServed(redis_url, nofile=200, FASTMATCH_SERVER__CONNECT_RATE_PER_IP="1000000",
                           FASTMATCH_SERVER__CONNECT_BURST_PER_IP="1000000").start()
    seated: list[ClientConnection] = []
    slow: list[socket.socket] = []
    try:
        await wait_workers(admin, 1)
        caps = fit(500, 256, 200)
        assert f"this worker takes at most {caps.connections} connections" in served.output()
        statuses = []
        for i in range(caps.connections + 30):
            ws, status = await _seat(served.port, f"fd{i}")
            statuses.append(status)
            if ws is not None:
                seated.append(ws)
        assert statuses == [101] * caps.connections + [503] * 30
        slow = [await _slowloris(served.port) for _ in range(300)]
        answers = await asyncio.gather(*(_first_bytes(sock, wait=TIMEOUT / 2.5) for sock in slow))
        assert sum(a is None for a in answers) == caps.sockets - caps.connections
        assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers if a is not None)
        for ws in seated[:5]:  # the players already connected keep their service
            assert (await request(ws, {"type": "status"}))["state"] == "idle"
        for sock in slow:
            sock.close()
        for ws in seated:
            await ws.close()
        async with asyncio.timeout(TIMEOUT):  # until the worker has seen them all go
            while (after := await _seat(served.port, "after"))[0] is None:
                await asyncio.sleep(0.05)
        await after[0].close()
        log = served.output()
        assert "Too many open files" not in log and " ERROR " not in log and "Traceback" not in log, log
    finally:
        for sock in slow:
            sock.close()
        await asyncio.to_thread(served.stop)
