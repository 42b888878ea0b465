"""A WebSocket client for hostile-client tests: it writes whatever bytes it is told.

websockets' own client refuses to send a malformed frame, so frames are serialised here
(RFC 6455 5.2), valid or not, and written in any chunking. What the server sends back is parsed
by websockets' sans-I/O ``ClientProtocol``, which also checks that the server's bytes are valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
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


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: ClientProtocol
    response: Response | None = None
    frames: list[Frame] = field(default_factory=list)  # received, not yet taken
    eof: bool = False

    @classmethod
    async def connect(cls, port: int, player: str | None, *, early: bytes = b"",
                      path: str = "/ws") -> RawClient:
        """TCP connect and send the upgrade request for ``player`` (its token in the header)
        to the request target ``path``, followed in the same write by ``early`` (frames sent
        before the answer)."""
        protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/ws"), max_size=None)
        request = protocol.connect()
        request.path = path  # sent as given, even when no URL parser would accept it
        if player is not None:
            request.headers["Authorization"] = f"Bearer {token(player)}"
        protocol.send_request(request)
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own segment
        writer.write(b"".join(protocol.data_to_send()) + early)
        return cls(reader, writer, protocol)

    async def handshake(self, timeout: float = TIMEOUT) -> Response | None:
        """The server's HTTP response (None if it closed without one)."""
        async with asyncio.timeout(timeout):
            while self.response is None and not self.eof:
                await self._read()
        return self.response

    async def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)
            with contextlib.suppress(ConnectionError):  # the server closed first: read on
                await self.writer.drain()

    async def next_frame(self, timeout: float = TIMEOUT) -> Frame | None:
        """The next data or control frame from the server; None once the connection ended."""
        async with asyncio.timeout(timeout):
            while not self.frames and not self.eof:
                await self._read()
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
        self.writer.close()

    async def _read(self) -> None:
        try:
            data = await self.reader.read(65536)
        except ConnectionError:
            data = b""
        if data:
            self.protocol.receive_data(data)
        else:
            self.eof = True
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                self.response = event
            else:
                self.frames.append(event)
        if self.protocol.parser_exc is not None and not isinstance(self.protocol.parser_exc, EOFError):
            self.eof = True  # stop reading: the server's stream is broken (reported by invalid())
