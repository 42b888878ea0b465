"""WebSocket connections driven straight from the event loop (RFC 6455 by ``websockets``).

websockets' sans-I/O ``ServerProtocol`` does the protocol: the opening handshake, frame
parsing, masking, close codes, UTF-8 and size checks. This module is the thin I/O around it:
an ``asyncio.Protocol`` per connection, so a connection costs no task, no stream pair and no
lock, and each batch of outgoing frames leaves in one ``write``. Subclasses get plain hooks:
the handshake request, each complete message, and the end of the connection.

Requests are handled one at a time, in order (PROTOCOL 2): while the subclass ``hold``s the
connection (a request in flight), messages wait in a short queue; past ``MAX_QUEUED`` reading
pauses, so a flooding client is slowed by TCP instead of filling memory.

At the edge (README "Behind a load balancer"), bytes may pass two layers before websockets, in
the order they arrive on the wire: a PROXY protocol header (once, from a trusted balancer; its
address becomes ``peer``), then TLS. Without them the only cost is one flag test per read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Final, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from server import metrics
from server.logthrottle import Throttled
from server.protocol.ratelimit import TokenBucket
from server.transport import proxyproto
from server.transport.tcpinfo import since_last_data_s
from server.transport.tls import TlsStream

log = logging.getLogger(__name__)
_crashed = Throttled(log, "connection handler failed", level=logging.ERROR)
_tls_failed = Throttled(log, "TLS connections failed", level=logging.INFO)
CLOSE_INTERNAL: Final = 1011
CLOSE_INVALID_DATA: Final = 1007
MAX_QUEUED: Final = 64
MAX_WRITE_BUFFER: Final = 1 << 20  # a client that stops reading is dropped past this
# Frames that carry no message of their own cost the worker as much to parse as those that do,
# and no message budget counts them: at most this many fragments per message (a message is
# at most server.max_message_bytes), and pings and pongs at this rate, past a burst.
MAX_FRAGMENTS: Final = 64
CONTROL_RATE_PER_S: Final = 5.0
CONTROL_BURST: Final = 20.0
CLOSE_POLICY: Final = 1008
_OPEN: Final = State.OPEN
_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_PING, _PONG = Opcode.PING, Opcode.PONG


@dataclass(frozen=True, slots=True)
class WsLimits:
    """What every connection of one listener shares."""

    max_size: int  # server.max_message_bytes, server.ping_interval_s, server.ping_timeout_s
    ping_interval_s: float
    ping_timeout_s: float
    open_timeout_s: float = 10.0  # PROXY header read (TCP accepted) -> handshake request complete
    close_timeout_s: float = 5.0  # close frame sent -> the peer closes TCP
    tls: ssl.SSLContext | None = None  # wss://
    proxy: proxyproto.ProxyPolicy | None = None  # a PROXY header opens every connection


_STATUS: Final = {code: str(code) for code in (101, 200, 400, 401, 404, 426, 503)}


class WebSocketProtocol(asyncio.Protocol):
    # Frames of every connection of this process, both ways (cost accounting, metrics).
    frames_in = 0
    frames_out = 0

    def __init__(self, limits: WsLimits, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.limits = limits
        self.ws = ServerProtocol(max_size=limits.max_size)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.lost = False
        self._loop = loop or asyncio.get_running_loop()  # given: see FrontEnd.loop
        self._held = False
        self._queue: deque[str | bytes] = deque()  # text as str, binary as bytes
        self._paused = False
        self._fragments: list[bytes] = []
        self._fragment_binary = False
        self._controls: TokenBucket | None = None  # made at the first ping or pong
        self._last_recv = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._ping_at = 0.0  # when the unanswered keepalive ping left (0: none out)
        self._responding = False  # the handshake response is among the writes to flush
        # When the handshake request reached the kernel, on the loop's clock (0: unknown); its
        # answer's wait is measured from there (fastmatch_handshake_wait_seconds).
        self.arrived_at = 0.0  # first bytes of the handshake (loop clock; 0 unknown)
        self.closing_by_us = False  # this side began the closing handshake
        self.request_at = 0.0  # the HTTP request itself (the same without TLS)
        # The edge layers (module docstring): set up in connection_made when configured.
        self._edge = False  # bytes go through _from_edge before websockets
        self._header: bytearray | None = None  # the PROXY header so far, until it is read
        self._tls: TlsStream | None = None

    # -- hooks for subclasses -------------------------------------------------------------------

    def handle_request(self, request: Request) -> None:
        """The opening handshake request: answer with ``respond`` (now or later)."""
        raise NotImplementedError

    def handle_message(self, data: str | bytes) -> None:
        """One complete client message, text as ``str``, binary as ``bytes`` (not called while
        held: it waits in the queue)."""
        raise NotImplementedError

    def handle_lost(self) -> None:
        """The TCP connection is gone (called once)."""

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "?"
        self._last_recv = self._loop.time()
        limits = self.limits
        if limits.tls is not None:
            self._tls = TlsStream(limits.tls)
            self._edge = True
        proxy = limits.proxy
        if proxy is not None:
            self._header = bytearray()
            self._edge = True
            if not proxy.trusts(self.peer):
                # Only a balancer may name the client: anyone else could pick their address.
                self._reject_header("untrusted", "not in server.proxy_trusted")
                return
            self._set_timer(proxy.timeout_s, self._header_timed_out)
            return
        self._set_timer(limits.open_timeout_s, self._open_timed_out)

    def data_received(self, data: bytes) -> None:
        self._last_recv = self._loop.time()
        if self._edge:
            if self._tls is not None and not self.arrived_at:
                # With TLS the request comes only after the server has answered the
                # ClientHello: the wait starts with that first record.
                self._request_arrived()
            data = self._from_edge(data)
            tls = self._tls
            if tls is not None and tls.peer_closed:
                # close_notify: the peer's stream has ended, whatever it sends after it.
                if data:
                    self._receive(data)
                self.eof_received()
                return
            if not data:
                return
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        try:
            for event in ws.events_received():
                if isinstance(event, Frame):
                    WebSocketProtocol.frames_in += 1
                    self._on_frame(event)
                elif isinstance(event, Request):
                    self._request_arrived(request=True)
                    if ws.eof_sent:
                        # Bytes after the request were no WebSocket frame (a stray CRLF, say):
                        # websockets failed the connection as it parsed them, and its end of
                        # the stream is queued. There is nobody left to answer or attach.
                        continue
                    self.handle_request(event)
        except Exception:  # a bug must cost this connection only, and one log line per interval
            _crashed("connection from %s", self.peer, exc_info=True)
            self.fail_internal()
        self.flush()

    def eof_received(self) -> bool:
        if self._header is not None:
            if self._header:  # an empty connection is a port probe, not a broken header
                self._reject_header("truncated", f"ended after {len(self._header)} bytes of a header")
            return False
        self.ws.receive_eof()
        self.ws.events_received()
        self.flush()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._cancel_timer()
        self._queue.clear()
        self.handle_lost()

    def pause_writing(self) -> None:
        """The client reads slower than we write: past the limit it is dropped in ``flush``."""

    def resume_writing(self) -> None:
        pass

    # -- sending ----------------------------------------------------------------------------------

    def respond(self, response: Response, *, flush: bool = True) -> None:
        """Send the handshake response (101 opens the connection; anything else ends it).
        ``flush=False`` lets the first messages leave in the same write."""
        if self.lost or self.ws.state is not State.CONNECTING or self.ws.eof_sent:
            return
        if self._header is not None and self.transport is not None:
            # Closed before the balancer named the client: nothing to answer yet.
            self.transport.close()
            return
        self.ws.send_response(response)
        self._responding = True
        if self.arrived_at:
            metrics.observe(metrics.HANDSHAKE_WAIT, self._loop.time() - self.arrived_at,
                            _STATUS.get(response.status_code) or str(response.status_code))
        if response.status_code == 101:
            self._set_timer(self.limits.ping_interval_s, self._keepalive)
        if flush:
            self.flush()

    def send_message(self, data: bytes) -> None:
        """Queue one text message; it leaves with the next ``flush``."""
        if self.ws.state is _OPEN:
            self.ws.send_text(data)

    def _fail(self, code: int, reason: str) -> None:
        """Close at once (websockets' fail: the close frame, then the end of the stream)."""
        self.closing_by_us = True
        self.ws.fail(code, reason)

    def fail_internal(self) -> None:
        """Close 1011 at once (a bug in handling this connection); abort if not open."""
        if self.ws.state is _OPEN:
            self._fail(CLOSE_INTERNAL, "internal error")
            self.flush()
        elif self.transport is not None and not self.lost:
            self.transport.abort()

    def close_with(self, code: int, reason: str) -> None:
        """Start the closing handshake; the peer has ``close_timeout`` to finish it."""
        if self.ws.state is _OPEN:
            self.closing_by_us = True
            self.ws.send_close(code, reason)
            self._set_timer(self.limits.close_timeout_s, self._abort)

    def flush(self) -> None:
        writes = self.ws.data_to_send()
        if writes:
            # Counted before TLS turns them into records; websockets' SEND_EOF (b"", the
            # server closes TCP now) and the handshake response are not frames.
            WebSocketProtocol.frames_out += len(writes) - (not writes[-1]) - self._responding
            self._responding = False
        if self._tls is not None:
            writes = self._tls.send(writes)
        transport = self.transport
        if not writes or transport is None or self.lost:
            return
        eof = not writes[-1]
        transport.write(b"".join(writes))
        if eof:
            self._close(transport)
        elif transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            transport.abort()

    # -- ordering: one request at a time ----------------------------------------------------------

    def hold(self) -> None:
        """A request is in flight: messages wait until ``release``."""
        self._held = True

    def release(self) -> None:
        """The request is answered: its effects are applied; then queued messages go on."""
        self._held = False

    def drain(self) -> None:
        """Handle the queued messages in order, until one of them holds the connection."""
        while self._queue and not self._held and not self.lost:
            self.handle_message(self._queue.popleft())
        if self._paused and len(self._queue) < MAX_QUEUED // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # -- the edge: PROXY header, TLS --------------------------------------------------------------

    def _from_edge(self, data: bytes) -> bytes:
        """What of ``data`` is for websockets: past the PROXY header (read once), decrypted."""
        if self._header is not None:
            data = self._read_header(data)
            if self._header is not None:
                return b""  # incomplete, or refused
            if self._tls is None:
                self._edge = False  # the header was all: from now on bytes go straight through
                return data
        tls = self._tls
        if tls is None:
            return data
        try:
            data = tls.receive(data)
        except ssl.SSLError as exc:
            self._tls_broken(exc)
            return b""
        if not data:
            self.flush()  # the handshake's answer
        return data

    def _read_header(self, data: bytes) -> bytes:
        """Buffer the PROXY header; once complete, return the bytes after it."""
        header = self._header
        transport = self.transport
        if header is None or transport is None or transport.is_closing():
            return b""
        header += data
        try:
            parsed = proxyproto.parse(header)
        except proxyproto.ProxyHeaderError as exc:
            self._reject_header(exc.reason, str(exc))
            return b""
        if parsed is None:
            return b""  # incomplete, and within the size bound (parse enforces it)
        self._header = None
        if parsed.client is not None:
            self.peer = parsed.client
        self._set_timer(self.limits.open_timeout_s, self._open_timed_out)
        return bytes(header[parsed.size:])

    def _reject_header(self, reason: str, detail: str) -> None:
        """Close without a word (it is not a client of ours); count and log it once."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._cancel_timer()
        if self.limits.proxy is not None:
            self.limits.proxy.rejected(self.peer, reason, detail)
        transport.close()

    def _header_timed_out(self) -> None:
        self._timer = None
        if self._header is not None and not self.lost:
            self._reject_header("timeout", "no complete header in time")

    def _tls_broken(self, exc: ssl.SSLError) -> None:
        """Not TLS, or TLS gone wrong: send the alert, if any, and close."""
        metrics.inc(metrics.TLS_FAILED)
        _tls_failed("from %s: %s", self.peer, exc.reason or exc)
        self._cancel_timer()
        transport = self.transport
        if self._tls is not None and transport is not None and not self.lost:
            for alert in self._tls.send([]):
                transport.write(alert)
            self._close(transport)

    # -- internals --------------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = cast(bytes, frame.data)  # the parser reads bytes
        if opcode is _TEXT or opcode is _BINARY:
            if not frame.fin:
                self._fragments = [data]
                self._fragment_binary = opcode is _BINARY
                return
            self._message(data, opcode is _BINARY)
        elif opcode is _CONT:
            self._fragments.append(data)
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self._message(data, self._fragment_binary)
            elif len(self._fragments) >= MAX_FRAGMENTS:
                self._fragments = []
                self._fail(CLOSE_POLICY, f"more than {MAX_FRAGMENTS} fragments in a message")
        elif opcode is _PING or (opcode is _PONG and not self._ping_at):
            # websockets answers pings; any frame proves the peer is alive. A flood of them
            # would cost the worker's loop (each one parsed, each ping answered). A pong while
            # our keepalive ping is out is its answer, however short server.ping_interval_s.
            now = self._loop.time()
            controls = self._controls
            if controls is None:
                controls = self._controls = TokenBucket(CONTROL_RATE_PER_S, CONTROL_BURST, now)
            if not controls.take(now) and self.ws.state is _OPEN:
                self._fail(CLOSE_POLICY, "too many ping or pong frames")

    def _message(self, data: bytes, binary: bool) -> None:
        if self.closing_by_us:
            # We started closing (a 1007 earlier in this read, a 1008, a drain's 1001): what
            # the client sent after that is not acted on, as its answer could not be sent.
            # (Messages before a close the client starts are, as RFC 6455 has them valid.)
            return
        message: str | bytes = data
        if not binary:
            try:
                message = data.decode()  # RFC 6455 8.1: text must be UTF-8, else close 1007
            except UnicodeDecodeError as exc:
                self._fail(CLOSE_INVALID_DATA, f"invalid UTF-8 at position {exc.start}")
                return
        if self._held or self._queue:
            self._queue.append(message)
            if len(self._queue) >= MAX_QUEUED and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            return
        self.handle_message(message)

    def _set_timer(self, delay: float, callback: object) -> None:
        self._cancel_timer()
        if delay > 0:
            self._timer = self._loop.call_later(delay, callback)  # type: ignore[arg-type]

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _open_timed_out(self) -> None:
        if self.ws.state is State.CONNECTING and not self.handshaking:
            self._abort()

    @property
    def handshaking(self) -> bool:
        """The request arrived and its answer is being prepared (the subclass says so)."""
        return False

    def limit_open(self, remaining_s: float) -> None:
        """Taken over from another protocol (a ``Shed`` connection): the open timeout runs
        from the accept, so only what is left of it."""
        if self.ws.state is State.CONNECTING and self._header is None and self._tls is None:
            self._set_timer(max(remaining_s, 0.001), self._open_timed_out)

    def _request_arrived(self, request: bool = False) -> None:
        """Called at the ClientHello (TLS) and at the request: ``arrived_at`` is the first (what
        the client waits, TLS round trips included), ``request_at`` the request's own arrival
        (what the worker has left it waiting: the shedding bound's measure; with TLS a slow
        network's round trips would otherwise count, and a far client be refused every time)."""
        transport = self.transport
        if transport is None:
            return
        if not self.arrived_at:
            waited = since_last_data_s(transport)
            if waited is not None:
                self.arrived_at = self._loop.time() - waited
            if request:
                self.request_at = self.arrived_at
        elif request and not self.request_at:
            waited = since_last_data_s(transport)  # TLS only: the request's last record
            if waited is not None:
                self.request_at = self._loop.time() - waited

    @property
    def request_age_s(self) -> float:
        """How long the handshake request has waited since it arrived (0 when unknown)."""
        return self._loop.time() - self.request_at if self.request_at else 0.0

    def _keepalive(self) -> None:
        """Ping a connection that has been silent for ``ping_interval``; one that sends nothing
        within ``ping_timeout`` of the ping is closed 1011 (websockets' keepalive contract)."""
        self._timer = None
        if self.lost or self.ws.state is not _OPEN:
            return
        now = self._loop.time()
        if self._ping_at and self._last_recv < self._ping_at:
            self._fail(CLOSE_INTERNAL, "keepalive ping timeout")
            self.flush()
            return
        self._ping_at = 0.0
        silent = now - self._last_recv
        if silent < self.limits.ping_interval_s:
            self._set_timer(self.limits.ping_interval_s - silent, self._keepalive)
            return
        self.ws.send_ping(os.urandom(4))
        self.flush()
        self._ping_at = now
        self._set_timer(self.limits.ping_timeout_s, self._keepalive)

    def _close(self, transport: asyncio.Transport) -> None:
        """Close TCP once what was written has left. close() waits for the buffer to drain: a
        client that stopped reading would hold the connection (and its player) for good, so
        it gets close_timeout, then the connection is aborted."""
        transport.close()
        if transport.get_write_buffer_size():
            self._set_timer(self.limits.close_timeout_s, self._abort)

    def _abort(self) -> None:
        self._timer = None
        if self.transport is not None and not self.lost:
            self.transport.abort()
