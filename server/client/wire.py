"""One WebSocket connection: websockets' sans-I/O ``ClientProtocol`` driven by ``asyncio.Protocol``.

No streams, no task, no per-message future: bytes from the socket go into the protocol, the
events it yields are handed to a :class:`Handler` synchronously, and whatever the handler sends
meanwhile (an automatic ``loading_complete``, a pong) leaves in the same ``transport.write``.
A connection the server has been silent on for ``ping_interval_s`` is pinged, and dropped
(1006, resumed like any network failure) if nothing arrives within ``ping_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final, Protocol, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.uri import WebSocketURI

from server.client.errors import (
    CloseCode,
    ConnectionClosed,
    FastmatchClientError,
    HandshakeRefused,
    handshake_refused,
)

Data = bytes | bytearray | memoryview
_TEXT: Final = Opcode.TEXT
_CONT: Final = Opcode.CONT
_CLOSE: Final = Opcode.CLOSE


class Handler(Protocol):
    """What the wire reports; every call is made from the event loop, never re-entered."""

    def opened(self) -> None:
        """The handshake succeeded (101)."""

    def failed(self, exc: FastmatchClientError | OSError) -> None:
        """The handshake failed; ``closed`` follows when the socket ends."""

    def frame(self, data: Data) -> None:
        """One complete text message."""

    def closed(self, code: int, reason: str) -> None:
        """The connection ended (1006: without a close frame)."""


class Wire(asyncio.Protocol):
    def __init__(
        self, uri: WebSocketURI, headers: dict[str, str], handler: Handler, max_size: int,
        close_timeout_s: float, ping_interval_s: float | None = None, ping_timeout_s: float = 20.0,
    ) -> None:
        self.protocol = ClientProtocol(uri, max_size=max_size)
        self.headers = headers
        self.handler = handler
        self.close_timeout_s = close_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self._last_rx = 0.0  # loop time of the last bytes from the server
        self._keepalive: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self._busy = False  # inside data_received: sends wait for the one flush at its end
        self._fragments: list[Data] = []
        self._abort_timer: asyncio.TimerHandle | None = None
        self._answered = False  # an HTTP response arrived (accepted or refused)
        self._ended = False
        # Made by its loop's create_connection: that loop, looked up once (on Python 3.11 each
        # asyncio.get_running_loop() is a getpid() system call, and this is asked per message).
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        request: Request = self.protocol.connect()
        for name, value in self.headers.items():
            request.headers[name] = value
        self.protocol.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        protocol = self.protocol
        protocol.receive_data(data)
        self._busy = True
        try:
            for event in protocol.events_received():
                if type(event) is Frame:
                    self._on_frame(event)
                else:
                    assert isinstance(event, Response)
                    self._on_response(event)
        finally:
            self._busy = False
        self._flush()

    def eof_received(self) -> bool:
        self.protocol.receive_eof()
        self._flush()
        return False  # asyncio closes the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._ended:
            return
        self._ended = True
        protocol = self.protocol
        if not self._answered:
            # The socket ended before any (valid) HTTP response.
            cause = protocol.handshake_exc or exc or "connection closed"
            self.handler.failed(exc if isinstance(exc, OSError) else OSError(f"handshake failed: {cause}"))
        if protocol.state is State.CONNECTING:
            self.handler.closed(CloseCode.ABNORMAL, "")
            return
        close = protocol.close_rcvd
        if close is None:
            self.handler.closed(CloseCode.ABNORMAL, "")
        else:
            self.handler.closed(close.code, close.reason)

    # -- sending --------------------------------------------------------------------------------

    def send_text(self, data: bytes) -> None:
        """Queue one text message; it leaves now, or with the batch being handled."""
        try:
            self.protocol.send_text(data)
        except InvalidState as exc:
            raise ConnectionClosed(CloseCode.ABNORMAL, "the connection is closing") from exc
        if not self._busy:
            self._flush()

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake (or just drop a connection that is not open)."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            if not self._busy:
                self._flush()
        elif self.transport is not None and self.protocol.state is State.CONNECTING:
            self.transport.abort()

    def abort(self) -> None:
        """End the TCP connection at once, without a closing handshake (a network failure)."""
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        writes = self.protocol.data_to_send()
        transport = self.transport
        if not writes or transport is None or transport.is_closing():
            return
        eof = writes[-1] == b""
        if eof:
            writes.pop()
        if writes:
            transport.write(writes[0] if len(writes) == 1 else b"".join(writes))
        if eof:
            # The protocol half-closes once the closing handshake is done (or failed).
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        if self._abort_timer is None and self.protocol.close_expected():
            # The server closes TCP after the closing handshake; if it never does, we do.
            self._abort_timer = self._loop.call_later(self.close_timeout_s, transport.abort)

    # -- receiving ------------------------------------------------------------------------------

    def _on_response(self, response: Response) -> None:
        self._answered = True
        exc = self.protocol.handshake_exc
        if exc is None:
            if self.ping_interval_s:
                self._keepalive = self._loop.call_later(self.ping_interval_s, self._check_alive)
            self.handler.opened()
            return
        if isinstance(exc, InvalidStatus):
            body = response.body.decode("utf-8", "replace") if response.body else ""
            self.handler.failed(handshake_refused(response.status_code, body,
                                                  _retry_after(response)))
        else:
            self.handler.failed(HandshakeRefused(response.status_code, f"invalid handshake: {exc}"))

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is _TEXT:
            if frame.fin:
                self.handler.frame(frame.data)
            else:
                self._fragments = [frame.data]
        elif opcode is _CONT and self._fragments:
            self._fragments.append(frame.data)
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self.handler.frame(data)
        # Binary frames are not part of the protocol; pings are answered by the protocol;
        # a close frame is reported by connection_lost, once the socket has really ended.


    # -- keepalive --------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        """Nothing from the server for ``ping_interval_s``: ping it. A half-open connection (a
        NAT that forgot it, a mobile handover, a host gone without a FIN) otherwise shows only
        when the kernel gives up, minutes later, long after the resume grace: requests hang
        and the player's place is lost without a word."""
        interval = self.ping_interval_s
        if interval is None or self.protocol.state is not State.OPEN:
            return
        loop = self._loop
        quiet = loop.time() - self._last_rx
        if quiet < interval:  # heard from since: look again when it would be quiet that long
            self._keepalive = loop.call_later(interval - quiet, self._check_alive)
            return
        self.protocol.send_ping(b"")
        if not self._busy:
            self._flush()
        self._keepalive = loop.call_later(self.ping_timeout_s, self._check_answered, loop.time())

    def _check_answered(self, pinged_at: float) -> None:
        if self._last_rx >= pinged_at:  # any frame counts, the pong or another
            self._check_alive()
        elif self.transport is not None:
            # Ends as a network failure does (1006): the client resumes within the grace.
            self.transport.abort()


def _retry_after(response: Response) -> float | None:
    values = response.headers.get_all("Retry-After")
    if not values:
        return None
    value = values[0]  # several would be the server's mistake: the first, not a crash
    with contextlib.suppress(ValueError):
        return max(float(value), 0.0)
    return None  # an HTTP date: rare from a load shedder; the backoff applies instead
