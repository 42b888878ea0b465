"""A lean RESP2 connection on an asyncio Protocol: hiredis packs and parses, calls pipeline.

Why not redis-py on the player's path: measured here (2026-11-23, 2-core EPYC, uvloop), one
EVALSHA costs 50-110 us of client CPU through redis-py's asyncio client and 20-47 us through
a redis-py pipeline, against 5-15 us through this protocol, because every redis-py call goes
through a connection pool, an encoder and a stream reader. The player's path makes ~5 calls per
lifecycle, so that difference is most of a core at 1,000 players/s. redis-py is still used
where cost does not matter (URL parsing here, admin tools and tests).

Calls issued within one event-loop iteration leave in one ``write`` (the flush runs with
``call_soon``); replies come back in order, so each call is a future in a FIFO. A connection
carries either commands (``send``) or, after SUBSCRIBE, pushed messages (``on_push``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import hiredis
from redis.asyncio.connection import parse_url

Reply = Any  # bytes, int, None, hiredis.ReplyError, or a list of those
OnPush = Callable[[Reply], None]

_SSL_REQS: Final = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class RespConnectionError(ConnectionError):
    """The connection to Redis broke (or never opened); in-flight calls have no known outcome."""


class RespTimeout(RespConnectionError):
    """A call waited past the operation timeout; the connection was dropped with it."""


@dataclass(frozen=True, slots=True)
class Address:
    """Where and how to connect, parsed once from ``redis.url`` (redis-py's URL grammar)."""

    host: str = "localhost"
    port: int = 6379
    path: str = ""  # a unix socket instead of host:port
    db: int = 0
    username: str = ""
    password: str = ""
    tls: ssl.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str) -> Address:
        opts: dict[str, Any] = dict(parse_url(url))
        tls = None
        if url.startswith("rediss://"):
            tls = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
            reqs = _SSL_REQS.get(str(opts.get("ssl_cert_reqs", "required")).lower(), ssl.CERT_REQUIRED)
            tls.check_hostname = reqs == ssl.CERT_REQUIRED and opts.get("ssl_check_hostname", True)
            tls.verify_mode = reqs
            if opts.get("ssl_certfile"):
                tls.load_cert_chain(opts["ssl_certfile"], opts.get("ssl_keyfile"))
        return cls(host=opts.get("host", "localhost"), port=int(opts.get("port", 6379)),
                   path=opts.get("path", ""), db=int(opts.get("db", 0) or 0),
                   username=opts.get("username") or "", password=opts.get("password") or "",
                   tls=tls)

    def handshake(self) -> list[tuple[str | int, ...]]:
        """Commands every new connection sends first (their replies are checked)."""
        commands: list[tuple[str | int, ...]] = []
        if self.password:
            commands.append(("AUTH", self.username, self.password) if self.username
                            else ("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


def pack(*args: str | bytes | int | float) -> bytes:
    return hiredis.pack_command(args)  # type: ignore[arg-type, no-any-return]


class RespProtocol(asyncio.Protocol):
    def __init__(self, on_push: OnPush | None = None, window_s: float = 0.0) -> None:
        self._reader = hiredis.Reader()
        # (future, time sent): replies arrive in order, so the oldest call is the first one.
        self._waiters: deque[tuple[asyncio.Future[Reply], float]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.on_push = on_push
        self.broken = False  # set once the connection can carry no more calls
        self.writes = 0  # round trips: every write carries whatever calls were queued
        self._window_s = window_s
        self._abort_exc: RespConnectionError | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this connection lives on: its callers' too (see RedisClient._call)."""
        return self._loop

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiters = self._waiters
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(RespConnectionError(f"redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if waiters:
                waiter = waiters.popleft()[0]
                if not waiter.done():  # a caller that timed out or was cancelled is skipped
                    waiter.set_result(reply)
            elif self.on_push is not None:
                self.on_push(reply)
            else:
                self.abort(RespConnectionError(f"unexpected reply from redis: {reply!r:.100}"))
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        error = self._abort_exc or RespConnectionError(f"redis connection lost: {exc or 'closed'}")
        while self._waiters:
            waiter = self._waiters.popleft()[0]
            if not waiter.done():
                waiter.set_exception(error)
                # Marked as seen: a caller cancelled just as this lands never awaits it, and
                # the failure is already reported to every caller that does.
                waiter.exception()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- calls ----------------------------------------------------------------------------------

    def send(self, packed: bytes) -> asyncio.Future[Reply]:
        """Queue one packed command; its reply resolves the future. Sent with whatever else
        is queued in this loop iteration."""
        waiter: asyncio.Future[Reply] = self._loop.create_future()
        if self.broken:
            waiter.set_exception(RespConnectionError("redis connection is closed"))
            return waiter
        self._waiters.append((waiter, self._loop.time()))
        self.write(packed)
        return waiter

    def write(self, packed: bytes) -> None:
        """Queue bytes without awaiting a reply (pub/sub commands on a push connection)."""
        self._out.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._window_s:
                self._loop.call_later(self._window_s, self._flush)
            else:
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and not self.broken and self._out:
            self._transport.write(b"".join(self._out))
            self.writes += 1
        self._out.clear()

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    def oldest_sent_at(self) -> float | None:
        """When the oldest call still waiting for its reply was sent (loop time)."""
        return self._waiters[0][1] if self._waiters else None

    def abort(self, exc: RespConnectionError | None = None) -> None:
        """Drop the connection now; every call in flight fails with ``exc`` (its outcome is
        unknown: Redis may or may not have run it)."""
        if self._abort_exc is None:
            self._abort_exc = exc
        self.broken = True
        if self._transport is not None:
            self._transport.abort()
        else:
            self.connection_lost(None)

    def close(self) -> None:
        self.broken = True
        if self._transport is not None:
            self._transport.close()
        elif not self.closed.done():
            self.closed.set_result(None)


async def open_connection(
    address: Address, on_push: OnPush | None = None, window_s: float = 0.0
) -> RespProtocol:
    """Connect, authenticate and select the database. Raises OSError/RespConnectionError;
    the caller bounds it with its timeout."""
    loop = asyncio.get_running_loop()
    if address.path:
        _, protocol = await loop.create_unix_connection(lambda: RespProtocol(on_push, window_s), address.path)
    else:
        _, protocol = await loop.create_connection(
            lambda: RespProtocol(on_push, window_s), address.host, address.port, ssl=address.tls)
    try:
        for command in address.handshake():
            reply = await protocol.send(pack(*command))
            if isinstance(reply, hiredis.ReplyError):
                raise RespConnectionError(f"redis {command[0]} refused: {reply}")
    except BaseException:
        protocol.abort()
        raise
    return protocol
