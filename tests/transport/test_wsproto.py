"""The WebSocket connection layer on its own (server/transport/wsproto.py), over real sockets:
what holds whatever the subclass (the worker's connection) does."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from websockets.client import ClientProtocol
from websockets.http11 import Request
from websockets.uri import parse_uri

from server.transport.tls import load_context
from server.transport.wsproto import WebSocketProtocol, WsLimits
from tests.edge.certs import client_context, make_cert, tls_handshake
from tests.helpers import TIMEOUT


class Talker(WebSocketProtocol):
    """Accepts every upgrade and sends one big message at once."""

    ended: asyncio.Event
    buffered = 0  # bytes left in the process's buffer once the message was sent

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A small kernel buffer, so that the message cannot all leave the process: what a
        # long-stalled reader of a busy server looks like, without sending megabytes.
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        super().connection_made(transport)

    def handle_request(self, request: Request) -> None:
        self.respond(self.ws.accept(request), flush=False)
        self.send_message(b"x" * 600_000)  # under the 1 MiB a slow reader is dropped at
        self.flush()
        assert self.transport is not None
        self.buffered = self.transport.get_write_buffer_size()

    def handle_message(self, data: str | bytes) -> None:
        pass

    def handle_lost(self) -> None:
        self.ended.set()


@contextlib.asynccontextmanager
async def serving(limits: WsLimits) -> AsyncIterator[tuple[int, list[Talker], asyncio.Event]]:
    """A listener of Talkers: (its port, the protocols made so far, set when one is lost)."""
    ended = asyncio.Event()
    made_here: list[Talker] = []

    def made() -> Talker:
        protocol = Talker(limits)
        protocol.ended = ended
        made_here.append(protocol)
        return protocol

    server = await asyncio.get_running_loop().create_server(made, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], made_here, ended
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def stalled_reader(port: int) -> AsyncIterator[socket.socket]:
    """A client connected with a small window, which the test (hardly) reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        yield sock
    finally:
        sock.close()


def upgrade_request() -> bytes:
    client = ClientProtocol(parse_uri("ws://127.0.0.1/ws"))
    client.send_request(client.connect())
    return b"".join(client.data_to_send())


async def test_a_close_with_unsent_bytes_is_aborted_after_the_close_timeout() -> None:
    """A client that stops reading (its window closed) while the server ends the connection,
    here at the keepalive's timeout: close() would wait for the buffer to drain for good,
    holding the connection and its player. It is aborted after close_timeout_s."""
    limits = WsLimits(max_size=4096, ping_interval_s=0.1, ping_timeout_s=0.1, close_timeout_s=0.3)
    async with serving(limits) as (port, made_here, ended), stalled_reader(port) as sock:
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request())
        # Nothing is read: the pings go unanswered, the keepalive closes 1011 with most of
        # the message still in the server's buffer, and the close timeout must end it.
        async with asyncio.timeout(TIMEOUT):
            await ended.wait()
        assert made_here[0].buffered > 0  # the case at hand: bytes were still waiting


async def test_a_broken_tls_record_from_a_reader_that_stopped_is_aborted_too(tmp_path: Path) -> None:
    """The same over TLS, ended by a corrupt record from the client instead of the keepalive:
    the server's alert and close must not wait for good behind the unsent message."""
    loop = asyncio.get_running_loop()
    cert = make_cert(tmp_path, "server")
    limits = WsLimits(max_size=4096, ping_interval_s=60, ping_timeout_s=60, close_timeout_s=0.3,
                      tls=load_context(str(cert.cert_file), str(cert.key_file)))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(cert).wrap_bio(incoming, outgoing, server_hostname="localhost")
    async with serving(limits) as (port, made_here, ended), stalled_reader(port) as sock:
        async with asyncio.timeout(TIMEOUT):
            await tls_handshake(tls, incoming, outgoing, lambda data: loop.sock_sendall(sock, data),
                                lambda: loop.sock_recv(sock, 4096))
            tls.write(upgrade_request())
            await loop.sock_sendall(sock, outgoing.read())
            while not made_here or not made_here[0].buffered:  # the answer and the message sent
                await asyncio.sleep(0.01)
            # A record whose MAC cannot be right: the server's TLS layer fails.
            await loop.sock_sendall(sock, b"\x17\x03\x03\x00\x20" + bytes(32))
            await ended.wait()
