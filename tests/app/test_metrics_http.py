"""The supervisor's metrics port keeps its threads and descriptors bounded (a cap on open
connections, a deadline for a whole request) and listens on IPv6 hosts as well as IPv4."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from server.app.console import Observed
from server.app.metrics_http import MAX_CONNECTIONS, REQUEST_DEADLINE_S, MetricsServer
from tests.helpers import TIMEOUT

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")


@pytest.fixture
def observed(redis_url: str, tmp_path: Path) -> Observed:
    return Observed(redis_url, ("1v1",), "battle:request", 1.0, str(tmp_path), dict)


@asynccontextmanager
async def serving(host: str, observed: Observed, request_deadline_s: float = REQUEST_DEADLINE_S,
                  max_connections: int = MAX_CONNECTIONS) -> AsyncIterator[MetricsServer]:
    server = MetricsServer(host, 0, observed, request_deadline_s=request_deadline_s,
                           max_connections=max_connections)
    server.start()
    try:
        yield server
    finally:
        await asyncio.to_thread(server.close)


async def status(host: str, port: int, path: str = "/metrics") -> int:
    """The answer's status, or 0 for a connection closed without one."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            head = await reader.read()
    except ConnectionError:
        return 0
    finally:
        writer.close()
    return int(head.split()[1]) if head else 0


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read() == b""
    except ConnectionError:
        return True


async def test_a_request_trickled_a_byte_at_a_time_is_dropped_at_its_deadline(
    observed: Observed,
) -> None:
    """A byte every 50 ms would keep a per-recv timeout from ever firing: the deadline covers
    the whole request, from the accept to the last header."""
    async with serving("127.0.0.1", observed, request_deadline_s=0.5) as server:
        began = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        closed = asyncio.create_task(closed_by_server(reader))
        try:
            async with asyncio.timeout(TIMEOUT):
                writer.write(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
                while not closed.done():
                    writer.write(b"a")
                    try:
                        await writer.drain()
                    except ConnectionError:
                        break
                    await asyncio.wait([closed], timeout=0.05)
                assert await closed
        finally:
            closed.cancel()
            writer.close()
        assert time.monotonic() - began >= 0.5  # the deadline, not something sooner
        assert await status("127.0.0.1", server.port) == 200  # still serving


async def test_connections_over_the_cap_are_closed_while_open_ones_are_served(
    observed: Observed,
) -> None:
    """Two slots: a scrape and an idle client hold them; a third connection is closed at once
    (long before any deadline), the scrape still gets its answer, and once the idle client
    leaves a new connection is served again."""
    async with serving("127.0.0.1", observed, request_deadline_s=TIMEOUT * 10,
                       max_connections=2) as server:
        opened: list[Streams] = []
        try:
            for _ in range(3):  # accepted in this order: the third finds both slots taken
                opened.append(await asyncio.open_connection("127.0.0.1", server.port))
            (scrape_r, scrape_w), (_, idle_w), (over_r, _) = opened
            async with asyncio.timeout(TIMEOUT):
                assert await closed_by_server(over_r)
            scrape_w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            async with asyncio.timeout(TIMEOUT):
                assert (await scrape_r.read()).startswith(b"HTTP/1.0 200 ")
            idle_w.close()
            async with asyncio.timeout(TIMEOUT):  # its thread gives the slot back once it sees
                while await status("127.0.0.1", server.port) != 200:  # the client leave: poll
                    await asyncio.sleep(0.05)
        finally:
            for _, writer in opened:
                writer.close()


@needs_ipv6
async def test_an_ipv6_host_is_listened_on(observed: Observed) -> None:
    async with serving("::1", observed) as server:
        assert await status("::1", server.port) == 200


@needs_ipv6
async def test_the_ipv6_wildcard_takes_ipv4_clients_too(observed: Observed) -> None:
    """server.host = "::" with no metrics.host: one socket for both families (IPV6_V6ONLY=0)."""
    async with serving("::", observed) as server:
        assert await status("::1", server.port) == 200
        assert await status("127.0.0.1", server.port) == 200
