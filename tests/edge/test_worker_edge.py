"""A worker at the edge, over real sockets: PROXY protocol headers, TLS, and both at once
(README "Behind a load balancer")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect

from server import metrics
from server.app.worker import Worker
from server.store import keys
from tests.conftest import WorkerFactory, make_config
from tests.edge.certs import Cert, client_context, make_cert, tls_handshake
from tests.helpers import TIMEOUT, closed_code, recv, request, token
from tests.transport.test_proxyproto import VALID, inet, v2

PROXIED = {"server.proxy_protocol": True, "server.proxy_trusted": ["127.0.0.1/32"],
           "server.proxy_header_timeout_s": 0.5}
HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"


def counted(name: str, **labels: str) -> float:
    metrics.flush()  # the worker counts in memory until its next flush
    return REGISTRY.get_sample_value(name, labels) or 0.0


def v1(client: str) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    server = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {client} {server} 50123 8080\r\n".encode()


async def exchange(port: int, *parts: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``parts`` as separate TCP segments; return all the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i, part in enumerate(parts):
            if i:
                # Lets each part leave as its own segment; the outcome does not depend on it.
                await asyncio.sleep(0.02)
            writer.write(part)
            await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            return await reader.read()
    finally:
        writer.close()


async def proxied_client(port: int, header: bytes, player: str, *, tls: ssl.SSLContext | None = None,
                         ) -> ClientConnection:
    """A WebSocket client behind a balancer: the header first, then (TLS and) the handshake."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(header)
    scheme = "wss" if tls else "ws"
    return await connect(f"{scheme}://localhost:{port}/ws", sock=sock, ssl=tls,
                         server_hostname="localhost" if tls else None,
                         additional_headers={"Authorization": f"Bearer {token(player)}"},
                         open_timeout=TIMEOUT)


def peers(worker: Worker) -> dict[str, str]:
    return {c.player_id: c.peer for c in worker.front.connections.values()}


@pytest.fixture
async def proxied(start_worker: WorkerFactory) -> Worker:
    return await start_worker(cfg=make_config(**PROXIED))


# -- PROXY protocol -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VALID))
async def test_the_header_names_the_client(proxied: Worker, name: str) -> None:
    header, client, _ = VALID[name]
    ws = await proxied_client(proxied.front.port, header, "p1")
    assert (await recv(ws))["type"] == "welcome"
    # LOCAL and UNKNOWN keep the connection's own address (the balancer's).
    assert peers(proxied) == {"p1": client or "127.0.0.1"}
    await ws.close()


async def test_header_and_request_split_across_segments_anywhere(proxied: Worker) -> None:
    header = v2(addresses=inet("203.0.113.7", "10.0.0.1"))
    stream = header + HEALTH
    for cut in (5, 12, 15, 16, len(header) - 1, len(header), len(header) + 3):
        answer = await exchange(proxied.front.port, stream[:cut], stream[cut:])
        assert answer.startswith(b"HTTP/1.1 200"), (cut, answer)
    # Header and request in one segment, and in many small ones.
    line = v1("198.51.100.1")
    assert (await exchange(proxied.front.port, line + HEALTH)).startswith(b"HTTP/1.1 200")
    pieces = [line[:1], line[1:2], line[2:6], line[6:7], line[7:-1], line[-1:], HEALTH]
    assert (await exchange(proxied.front.port, *pieces)).startswith(b"HTTP/1.1 200")


async def test_per_address_limits_count_the_address_in_the_header(
    start_worker: WorkerFactory,
) -> None:
    worker = await start_worker(cfg=make_config(**PROXIED, **{
        "server.connect_rate_per_ip": 0.01, "server.connect_burst_per_ip": 2}))
    port = worker.front.port
    first = [await proxied_client(port, v1("203.0.113.7"), f"a{i}") for i in range(2)]
    for ws in first:
        assert (await recv(ws))["type"] == "welcome"
    third = await proxied_client(port, v1("203.0.113.7"), "a2")
    assert (await recv(third))["code"] == "rate_limited"
    assert await closed_code(third) == 4008
    # Another client behind the same balancer has its own budget.
    other = await proxied_client(port, v1("203.0.113.8"), "b0")
    assert (await recv(other))["type"] == "welcome"
    for ws in [*first, other]:
        await ws.close()


async def test_ipv6_clients_are_counted_by_their_network(start_worker: WorkerFactory) -> None:
    """A host holds a whole /64 and may use a new address of it for every connection: the
    per-address limit counts the /64 (server.connect_ipv6_prefix)."""
    worker = await start_worker(cfg=make_config(**PROXIED, **{
        "server.connect_rate_per_ip": 0.01, "server.connect_burst_per_ip": 2}))
    port = worker.front.port
    first = [await proxied_client(port, v1(f"2001:db8:7:7::{i + 1}"), f"s{i}") for i in range(2)]
    for ws in first:
        assert (await recv(ws))["type"] == "welcome"
    third = await proxied_client(port, v1("2001:db8:7:7:ffff::3"), "s2")  # another address, same /64
    assert (await recv(third))["code"] == "rate_limited"
    assert await closed_code(third) == 4008
    other = await proxied_client(port, v1("2001:db8:7:8::1"), "t0")  # the next /64
    assert (await recv(other))["type"] == "welcome"
    for ws in [*first, other]:
        await ws.close()


REFUSED: dict[str, tuple[list[bytes], str]] = {
    "missing": ([HEALTH], "missing"),
    "tls-without-header": ([b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"], "missing"),
    "malformed-v1": ([b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n", HEALTH], "malformed"),
    "malformed-v2": ([v2(version=3, addresses=inet("1.2.3.4", "5.6.7.8")), HEALTH], "malformed"),
    "oversized-v1": ([b"PROXY TCP4 " + b"1" * 200], "malformed"),
    "truncated": ([v1("203.0.113.7")[:20]], "truncated"),
    "silent": ([], "timeout"),
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_a_connection_without_a_valid_header_is_closed_and_counted(
    proxied: Worker, name: str,
) -> None:
    parts, reason = REFUSED[name]
    before = counted("fastmatch_proxy_rejected_total", reason=reason)
    if name == "truncated":
        answer = await _half_close_after(proxied.front.port, parts[0])
    else:
        answer = await exchange(proxied.front.port, *parts)
    assert answer == b""  # closed without a word: it is not a client of ours
    assert counted("fastmatch_proxy_rejected_total", reason=reason) == before + 1
    # The worker serves on.
    assert (await exchange(proxied.front.port, v1("203.0.113.9") + HEALTH)).startswith(b"HTTP/1.1 200")


async def _half_close_after(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()
    async with asyncio.timeout(TIMEOUT):
        answer = await reader.read()
    writer.close()
    return answer


async def test_an_untrusted_peer_is_closed_before_a_byte_is_read(
    start_worker: WorkerFactory,
) -> None:
    worker = await start_worker(cfg=make_config(**{**PROXIED, "server.proxy_trusted": ["127.0.0.2"]}))
    before = counted("fastmatch_proxy_rejected_total", reason="untrusted")
    # From 127.0.0.1, claiming to be someone else: refused whatever it says.
    assert await exchange(worker.front.port, v1("203.0.113.7") + HEALTH) == b""
    assert counted("fastmatch_proxy_rejected_total", reason="untrusted") == before + 1
    answer = await exchange(worker.front.port, v1("203.0.113.7") + HEALTH, source="127.0.0.2")
    assert answer.startswith(b"HTTP/1.1 200")


# -- TLS ------------------------------------------------------------------------------------------

@pytest.fixture
def cert(tmp_path: Path) -> Cert:
    return make_cert(tmp_path, "server")


async def test_wss_serves_players_and_plain_ws_is_refused(
    start_worker: WorkerFactory, cert: Cert,
) -> None:
    worker = await start_worker(cfg=make_config(**{
        "server.tls_cert_file": str(cert.cert_file), "server.tls_key_file": str(cert.key_file)}))
    port = worker.front.port
    async with connect(f"wss://localhost:{port}/ws", ssl=client_context(cert),
                       additional_headers={"Authorization": f"Bearer {token('t1')}"}) as ws:
        assert (await recv(ws))["type"] == "welcome"
        assert ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True) == cert.der
        answer = await request(ws, {"type": "enqueue", "game_mode": "1v1"})
        assert answer["type"] == "enqueued"
        assert (await request(ws, {"type": "nope"}))["code"] == "invalid_message"
    before = counted("fastmatch_tls_failed_total")
    assert await exchange(port, HEALTH) == b""  # an alert at most; no HTTP in clear
    assert counted("fastmatch_tls_failed_total") == before + 1


async def test_a_slow_tls_client_is_not_shed_for_its_own_round_trips(
    start_worker: WorkerFactory, cert: Cert,
) -> None:
    """With TLS the request comes a few round trips after the ClientHello. The shedding bound
    (server.max_handshake_queue_ms) measures how long the worker left the request waiting:
    counted from the ClientHello, a client on a slow network would be refused every time on an
    idle server. The handshake-wait metric still counts from the ClientHello (what the client
    waited)."""
    worker = await start_worker(cfg=make_config(**{
        "server.tls_cert_file": str(cert.cert_file), "server.tls_key_file": str(cert.key_file),
        "server.max_handshake_queue_ms": 1000}))
    wait_sum = ("fastmatch_handshake_wait_seconds_sum", {"status": "101"})
    waited_before = REGISTRY.get_sample_value(*wait_sum) or 0.0
    reader, writer = await asyncio.open_connection(
        "localhost", worker.front.port, ssl=client_context(cert), server_hostname="localhost")
    await asyncio.sleep(2.0)  # the round trips of a far client, after the TLS handshake
    writer.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 b"Authorization: Bearer " + token("far").encode() + b"\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        status = await reader.readline()
    assert status.startswith(b"HTTP/1.1 101"), status
    writer.close()
    metrics.flush()
    waited = REGISTRY.get_sample_value(*wait_sum) or 0.0
    assert waited - waited_before >= 1.9  # the client's view: from its ClientHello


async def test_a_tls_close_notify_ends_the_connection_whatever_follows(
    start_worker: WorkerFactory, cert: Cert, admin: aioredis.Redis,
) -> None:
    """close_notify is the end of the client's stream: the connection ends (the player is
    detached), and bytes the client sends after it are not buffered (OpenSSL would keep them
    unread for good, the connection open and growing)."""
    worker = await start_worker(cfg=make_config(**{
        "server.tls_cert_file": str(cert.cert_file), "server.tls_key_file": str(cert.key_file)}))
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.front.port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(cert).wrap_bio(incoming, outgoing, server_hostname="localhost")
    async def send(data: bytes) -> None:
        writer.write(data)

    try:
        async with asyncio.timeout(TIMEOUT):
            await tls_handshake(tls, incoming, outgoing, send, lambda: reader.read(65536))
            tls.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer "
                      + token("notify").encode() + b"\r\n\r\n")
            writer.write(outgoing.read())
            answer = b""
            while b"welcome" not in answer:
                incoming.write(await reader.read(65536))
                with contextlib.suppress(ssl.SSLWantReadError):
                    while chunk := tls.read(65536):  # every record that arrived
                        answer += chunk
        assert answer.startswith(b"HTTP/1.1 101"), answer
        assert await admin.exists(keys.player("notify")) == 1
        with contextlib.suppress(ssl.SSLWantReadError):  # it does not wait for the server's
            tls.unwrap()
        writer.write(outgoing.read() + b"\x17\x03\x03" + bytes(60_000))  # then more, never read
        async with asyncio.timeout(TIMEOUT):
            while await reader.read(65536):  # the server's close_notify, then the end
                pass
            while await admin.exists(keys.player("notify")):  # detached: idle, so forgotten
                await asyncio.sleep(0.01)
    finally:
        writer.close()


async def test_proxy_header_then_tls_even_in_one_segment(
    start_worker: WorkerFactory, cert: Cert,
) -> None:
    worker = await start_worker(cfg=make_config(**PROXIED, **{
        "server.tls_cert_file": str(cert.cert_file), "server.tls_key_file": str(cert.key_file)}))
    port = worker.front.port
    ws = await proxied_client(port, v1("2001:db8::7"), "t2", tls=client_context(cert))
    assert (await recv(ws))["type"] == "welcome"
    assert peers(worker) == {"t2": "2001:db8::7"}
    await ws.close()
    # A balancer often sends the header and the client's ClientHello in one segment.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(cert).wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        async with asyncio.timeout(TIMEOUT):
            data = v2(addresses=inet("203.0.113.7", "10.0.0.1"))
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    writer.write(data + outgoing.read())
                    data = b""
                    incoming.write(await reader.read(65536))
            tls.write(HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            writer.write(outgoing.read())
            answer = b""
            while not answer.endswith(b"ok\n"):
                incoming.write(await reader.read(65536))
                with contextlib.suppress(ssl.SSLWantReadError):
                    answer += tls.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer


# -- leaving the balancer's rotation (drain delay) -------------------------------------------------

async def test_while_leaving_ready_is_503_and_players_are_still_served(worker: Worker) -> None:
    port = worker.front.port
    worker.front.leaving = True  # what SIGTERM does for server.drain_delay_s
    answer = await exchange(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503") and b"draining" in answer
    async with connect(f"ws://127.0.0.1:{port}/ws?token={token('late')}") as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome"
