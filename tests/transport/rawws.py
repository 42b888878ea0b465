"""A WebSocket client for hostile-client tests: it writes whatever bytes it is told.

websockets' own client refuses to send a malformed frame, so frames are serialised here
(RFC 6455 5.2), valid or not, and written in any chunking. What the server sends back is parsed
by websockets' sans-I/O ``ClientProtocol``, which also checks that the server's bytes are valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Final

from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri
from websockets.utils import apply_mask

from tests.helpers import TIMEOUT, token

CONT, TEXT, BINARY = 0x0, 0x1, 0x2
CLOSE, PING, PONG = 0x8, 0x9, 0xA
NO_STATUS: Final = 1005  # what a close frame without a payload reads as (RFC 6455 7.1.5)


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          mask: bytes | None = b"\x37\xfa\x21\x3d") -> bytes:
    """One frame as a client would write it; ``mask=None`` leaves it unmasked (a violation)."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode & 0xF])
    bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return bytes(head) + payload
    return bytes(head) + mask + apply_mask(payload, mask)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


@dataclass
class Ending:
    """How a connection ended, as the client saw it."""

    close_code: int | None = None  # the server's close frame (None: the TCP connection ended bare)
    close_reason: str = ""
    invalid: str = ""  # the server's bytes broke RFC 6455 (a server bug)


class RawClient:
    """The client's end of one TCP connection, on a plain socket: a write that fails because
    the server has closed is ignored and reading goes on, so what the server sent before it
    closed (a close frame) is still seen. (An asyncio transport drops the connection at once on
    a failed write, unread bytes and all.)"""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.protocol = ClientProtocol(parse_uri("ws://127.0.0.1/ws"), max_size=None)
        self.response: Response | None = None
        self.frames: list[Frame] = []  # received, not yet taken
        self.eof = False
        self._changed = asyncio.Event()
        self._reading = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, port: int, player: str | None, *, early: bytes = b"",
                      path: str = "/ws", extra: tuple[tuple[str, str], ...] = ()) -> RawClient:
        """TCP connect and send the upgrade request for ``player`` (its token in the header)
        to the request target ``path``, with the ``extra`` header lines after the others,
        followed in the same write by ``early`` (frames sent before the answer)."""
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own segment
        async with asyncio.timeout(TIMEOUT):
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        client = cls(sock)
        request = client.protocol.connect()
        request.path = path  # sent as given, even when no URL parser would accept it
        if player is not None:
            request.headers["Authorization"] = f"Bearer {token(player)}"
        for name, value in extra:
            request.headers[name] = value  # another line, even for a name already there
        client.protocol.send_request(request)
        await client.write(b"".join(client.protocol.data_to_send()) + early)
        return client

    async def handshake(self, timeout: float = TIMEOUT) -> Response | None:
        """The server's HTTP response (None if it closed without a valid one)."""
        async with asyncio.timeout(timeout):
            while self.response is None and not self.eof:
                await self._wait()
        return self.response

    async def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # closed by the server: what it sent is still read
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def next_frame(self, timeout: float = TIMEOUT) -> Frame | None:
        """The next data or control frame from the server; None once the connection ended."""
        async with asyncio.timeout(timeout):
            while not self.frames and not self.eof:
                await self._wait()
        return self.frames.pop(0) if self.frames else None

    async def ending(self, timeout: float = TIMEOUT) -> Ending:
        """Read until the server closes; the close frame it sent, if any."""
        ending = Ending()
        while (received := await self.next_frame(timeout)) is not None:
            if received.opcode is Opcode.CLOSE and ending.close_code is None:
                close = Close.parse(received.data) if received.data else Close(NO_STATUS, "")
                ending.close_code, ending.close_reason = close.code, close.reason
        ending.invalid = self.invalid()
        return ending

    def invalid(self) -> str:
        """What was wrong with the server's bytes ("" when nothing)."""
        exc = self.protocol.parser_exc
        if exc is None or isinstance(exc, EOFError):
            return ""
        return f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        # Unregistered before the close: epoll would otherwise keep a stale entry under an fd
        # number the next socket may reuse.
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self._reading.cancel()
        self.sock.close()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        protocol = self.protocol
        while not self.eof:
            try:
                data = await loop.sock_recv(self.sock, 65536)
            except OSError:  # reset: the bytes that came before it were returned already
                data = b""
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
                self.eof = True
            for event in protocol.events_received():
                if isinstance(event, Response):
                    self.response = event
                else:
                    self.frames.append(event)
            # Not a valid response or frame stream: nothing after it would parse.
            if protocol.handshake_exc is not None or (
                    protocol.parser_exc is not None and not isinstance(protocol.parser_exc, EOFError)):
                self.eof = True
            self._changed.set()

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()
