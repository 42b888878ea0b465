"""Handshakes accepted while a worker sheds load (server/transport/overload.py ``Shed``): refused
with the bytes the full WebSocket path would write, for a few microseconds each; everything
else handed to the full path; and how long each handshake waited, accept queue included."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from prometheus_client import REGISTRY

from server import metrics
from server.app.worker import Worker
from server.transport.frontend import WS_PATHS
from server.transport.overload import WS_PATHS as SHED_PATHS
from server.transport.overload import RetryHint
from tests.conftest import WorkerFactory, make_config
from tests.helpers import TIMEOUT, answer, connect_player, half_request, request, token

UPGRADE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           f"Authorization: Bearer {token('shed')}\r\n\r\n").encode()


def sample(name: str, **labels: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def read_all(sock: socket.socket) -> bytes:
    """The server's whole answer, up to its close (which must come in time)."""
    try:
        data = await answer(sock)
    finally:
        sock.close()
    assert data is not None, "no answer in time"
    return data


async def exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send ``parts`` (``pause`` between them) and read the answer until the server closes."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    for i, part in enumerate(parts):
        if i and pause:
            await asyncio.sleep(pause)
        await loop.sock_sendall(sock, part)
    return await read_all(sock)


async def sheds(w: Worker, count: int) -> None:
    """Until the worker holds ``count`` connections as ``Shed``."""
    async with asyncio.timeout(TIMEOUT):
        while len(w.front._sheds) != count:
            await asyncio.sleep(0.01)


def head(answer: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers less Date, body."""
    top, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = top.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines)
    assert headers.pop(b"Date").endswith(b" GMT")
    return status, headers, body


async def full(start_worker: WorkerFactory) -> tuple[Worker, int]:
    """A worker whose one connection slot is taken: every new handshake is shed."""
    w = await start_worker(cfg=make_config(**{"server.max_connections": 1,
                                              "server.max_loop_lag_ms": 0}))
    seated, welcome = await connect_player(w.front.port, "seated")
    assert welcome["type"] == "welcome"
    w.seated = seated  # type: ignore[attr-defined]
    return w, w.front.port


async def test_shed_upgrades_get_the_503_websockets_would_write(start_worker: WorkerFactory) -> None:
    w, port = await full(start_worker)
    refused = sample("fastmatch_handshakes_refused_total", reason="max_connections")
    waits = sample("fastmatch_handshake_wait_seconds_count", status="503")
    cheap = await exchange(port, UPGRADE)
    # Bytes after the request's head (a client that sends a frame before the answer): Shed
    # hands the connection to the full WebSocket path, which answers through websockets.
    # (The frame then lies unread when the server closes, which may turn the close into a
    # reset after the answer; the answer itself is read first.)
    through_websockets = await exchange(port, UPGRADE + b"\x81\x80\x00\x00\x00\x00")
    assert head(cheap) == head(through_websockets)
    status, headers, body = head(cheap)
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert headers[b"Retry-After"] == b"1" and headers[b"Connection"] == b"close"
    assert body == b"server busy (max_connections); retry later\n"
    assert int(headers[b"Content-Length"]) == len(body)
    assert sample("fastmatch_handshakes_refused_total", reason="max_connections") - refused == 2
    assert sample("fastmatch_handshake_wait_seconds_count", status="503") - waits == 2
    # The player already connected keeps its service; nothing is left of the refused ones.
    assert (await request(w.seated, {"type": "status"}))["state"] == "idle"  # type: ignore[attr-defined]
    assert not w.front._sheds and len(w.front.connections) == 1
    await w.seated.close()  # type: ignore[attr-defined]


async def test_health_ready_and_split_requests_while_shedding(start_worker: WorkerFactory) -> None:
    w, port = await full(start_worker)
    # The two sets of WebSocket paths, the front end's and Shed's bytes, agree.
    assert {p.encode() for p in WS_PATHS} == SHED_PATHS
    health = await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200 ") and health.endswith(b"ok\n")
    ready = await exchange(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ready.startswith(b"HTTP/1.1 200 ") and ready.endswith(b"ready\n")
    missing = await exchange(port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404 ")
    # A request head that arrives in pieces is read to its end, then refused.
    split = await exchange(port, UPGRADE[:7], UPGRADE[7:40], UPGRADE[40:], pause=0.05)
    assert head(split)[0] == b"HTTP/1.1 503 Service Unavailable"
    # What websockets would not take as an upgrade request gets its answer, not the 503: a
    # malformed request line is closed without a word, as it always is.
    assert await exchange(port, b"GET /ws FOO\r\nHost: x\r\n\r\n") == b""
    # A head past Shed's bound goes to websockets, which answers it as it always has.
    huge = await exchange(port, UPGRADE[:-2] + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n")
    assert huge.startswith(b"HTTP/1.1 ") and not huge.startswith(b"HTTP/1.1 101 ")
    # A connection that closes halfway through its head frees its place.
    sock = await half_request(port)
    await sheds(w, 1)
    sock.close()
    await sheds(w, 0)
    # Room again: the next upgrade is welcomed, not shed.
    await w.seated.close()  # type: ignore[attr-defined]
    async with asyncio.timeout(TIMEOUT):
        while w.front.connections:
            await asyncio.sleep(0.01)
    welcomed, welcome = await connect_player(port, "next")
    assert welcome["type"] == "welcome"
    await welcomed.close()


async def test_the_wait_counts_the_accept_queue(start_worker: WorkerFactory) -> None:
    """A request that sits in the kernel while the worker's loop is busy is measured from its
    arrival, not from when the worker got to it."""
    w, port = await full(start_worker)
    before = sample("fastmatch_handshake_wait_seconds_bucket", status="503", le="0.25")
    total = sample("fastmatch_handshake_wait_seconds_count", status="503")
    sock = socket.create_connection(("127.0.0.1", port))  # the kernel completes it, queued
    sock.sendall(UPGRADE)
    time.sleep(0.4)  # noqa: ASYNC251 (on purpose: the worker runs on this loop, it accepts nothing meanwhile)
    data = await read_all(sock)
    assert head(data)[0] == b"HTTP/1.1 503 Service Unavailable"
    assert sample("fastmatch_handshake_wait_seconds_count", status="503") - total == 1
    # Waited at least the 0.4 s: not in the bucket of those under 0.25 s.
    assert sample("fastmatch_handshake_wait_seconds_bucket", status="503", le="0.25") == before
    await w.seated.close()  # type: ignore[attr-defined]


async def test_a_request_queued_too_long_is_refused(start_worker: WorkerFactory) -> None:
    """server.max_handshake_queue_ms: a request that waited that long before the worker read
    it (the worker was busy) is refused, not welcomed later still; the next one is welcomed."""
    # A bound well above any stall a busy machine gives the next connection's request.
    w = await start_worker(cfg=make_config(**{"server.max_handshake_queue_ms": 1000,
                                              "server.max_loop_lag_ms": 0}))
    port = w.front.port
    refused = sample("fastmatch_handshakes_refused_total", reason="queued")
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(UPGRADE)
    time.sleep(1.2)  # noqa: ASYNC251 (on purpose: the worker's loop is busy)
    status, headers, body = head(await read_all(sock))
    assert status == b"HTTP/1.1 503 Service Unavailable" and headers[b"Retry-After"] == b"1"
    assert body == b"server busy (queued); retry later\n"
    assert sample("fastmatch_handshakes_refused_total", reason="queued") - refused == 1
    ws, welcome = await connect_player(port, "prompt")
    assert welcome["type"] == "welcome"
    await ws.close()


async def test_a_worker_shutting_down_answers_its_shed_connections(start_worker: WorkerFactory) -> None:
    """Draining: a shed connection whose request is not complete yet is answered 503 at once,
    not left to its open timeout."""
    w, port = await full(start_worker)
    sock = await half_request(port)
    await sheds(w, 1)
    closing = asyncio.create_task(w.close())
    status, headers, body = head(await read_all(sock))
    assert status == b"HTTP/1.1 503 Service Unavailable" and headers[b"Retry-After"] == b"1"
    assert body == b"server busy (draining); retry later\n"
    async with asyncio.timeout(TIMEOUT * 4):
        await closing
    assert not w.front._sheds


# -- Retry-After grows with the share refused ----------------------------------------------------


class Clock:
    """The hint's clock, moved by hand: the arithmetic per window, not the machine's pace."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def window(hint: RetryHint, clock: Clock, admitted: int, refused: int) -> int:
    """One window's handshakes; then the next window's first (a refusal) closes it."""
    for _ in range(admitted):
        hint.admitted()
    for _ in range(refused):
        hint.refused()
    clock.now += RetryHint.WINDOW_S
    hint.refused()
    return hint.value


def test_the_retry_hint_grows_with_the_share_refused_and_comes_back() -> None:
    clock = Clock()
    hint = RetryHint(1, 10, clock)
    assert hint.value == 1
    # Within a window nothing changes, however many are refused.
    for _ in range(100):
        hint.refused()
    assert hint.value == 1
    clock.now += RetryHint.WINDOW_S
    hint.admitted()  # closes the first window: 100 of 100 refused, smoothed to half
    assert hint.share == 0.5 and hint.value == 2
    # A sixth refused (base 1): the wait rounds to the base.
    other = Clock()  # the hint above keeps its own clock's windows
    fresh = RetryHint(1, 10, other)
    assert window(fresh, other, admitted=20, refused=10) == 1 and fresh.share == pytest.approx(1 / 6)
    # Fewer handshakes than MIN_SEEN weigh as that many: one refusal alone is no storm.
    lone = RetryHint(1, 10, other)
    assert window(lone, other, admitted=0, refused=1) == 1 and lone.share == pytest.approx(0.05)
    # Sustained: 1 / (1 - share) as the smoothed share climbs, capped at the maximum.
    assert [window(hint, clock, 1, 9) for _ in range(4)] == [3, 5, 7, 8]
    assert [window(hint, clock, 0, 10) for _ in range(3)] == [10, 10, 10]
    # Caught up: each window of admitted handshakes halves the share (0.98 -> 0.54 -> 0.27).
    values = []
    for _ in range(4):
        for _ in range(10):
            hint.admitted()
        clock.now += RetryHint.WINDOW_S
        hint.admitted()
        values.append(hint.value)
    assert values == [2, 1, 1, 1]


def test_an_idle_stretch_counts_as_nothing_refused() -> None:
    clock = Clock()
    hint = RetryHint(2, 30, clock)
    assert window(hint, clock, 0, 50) == 4  # share 0.5: twice the base
    clock.now += 10 * RetryHint.WINDOW_S  # after the refusal that closed it, ten quiet windows
    hint.refused()
    # That window (one refusal, weighing as MIN_SEEN), then nine with nobody, each halving.
    assert hint.share == pytest.approx((0.5 * 0.5 + 0.5 / RetryHint.MIN_SEEN) * 0.5**9)
    assert hint.value == 2
    # An overload that ends in silence: the refused window is aged by the quiet one after it.
    after = RetryHint(1, 10, clock)
    for _ in range(100):
        after.refused()
    clock.now += 2 * RetryHint.WINDOW_S
    after.refused()
    assert after.share == pytest.approx(0.25) and after.value == 1


def test_an_idle_worker_comes_back_to_the_base_without_handshakes() -> None:
    """The worker's once-a-second timer closes windows too (``tick``): the header and the
    gauge do not keep an overload's value while nobody connects."""
    clock = Clock()
    hint = RetryHint(1, 10, clock)
    for _ in range(3):
        assert window(hint, clock, 0, 50) > 1
    grown = hint.value
    assert sample("fastmatch_overload_retry_after_seconds") == grown
    hint.tick()  # within the window: nothing changes
    assert hint.value == grown
    for _ in range(3):
        clock.now += RetryHint.WINDOW_S
        hint.tick()
    assert hint.value == 1 and sample("fastmatch_overload_retry_after_seconds") == 1


def test_a_fixed_retry_after_stays_fixed() -> None:
    clock = Clock()
    for base in (0, 3):
        hint = RetryHint(base, base, clock)
        assert [window(hint, clock, 0, 10) for _ in range(3)] == [base] * 3


async def test_a_worker_refusing_most_handshakes_asks_for_longer_waits(
    start_worker: WorkerFactory,
) -> None:
    """Real handshakes: while every new one is refused the 503s' Retry-After climbs, and the
    gauge shows it; once the worker admits again it comes back to the base."""
    w, port = await full(start_worker)
    assert w.front.retry_hint.max_s == 10  # the default ceiling
    seen = []
    async with asyncio.timeout(TIMEOUT * 3):
        while not seen or seen[-1] < 4:
            status, headers, _ = head(await exchange(port, UPGRADE))
            assert status == b"HTTP/1.1 503 Service Unavailable"
            seen.append(int(headers[b"Retry-After"]))
            await asyncio.sleep(0.01)  # a storm: many more than MIN_SEEN a window
    # Climbs from the base (a stalled test process may see a dip on the way: not asserted).
    assert seen[0] == 1, seen
    # The gauge is the worker's current value (the once-a-second timer may have moved it
    # since the last answer).
    assert sample("fastmatch_overload_retry_after_seconds") == w.front.retry_hint.value >= 2
    await w.seated.close()  # type: ignore[attr-defined]
    async with asyncio.timeout(TIMEOUT * 3):
        while w.front.retry_hint.value > 1:
            player, welcome = await connect_player(port, "admitted")
            assert welcome["type"] == "welcome"
            await player.close()
            await asyncio.sleep(0.05)
