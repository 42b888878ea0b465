"""One player's connection to fastmatch: requests, the message stream, the ready check, resumes.

The client runs no task of its own while connected: frames are decoded inside the transport's
``data_received`` (see ``wire.py``), answers resolve the futures of the requests that wait for
them, and every message is appended to the stream the caller iterates. A task exists only
while reconnecting after an unexpected drop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import itertools
import logging
import ssl as ssl_module
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar
from urllib.parse import quote

import msgspec
from websockets.uri import WebSocketURI, parse_uri

from server.client import retry
from server.client.errors import (
    CloseCode,
    ConnectionClosed,
    FastmatchClientError,
    NotConnected,
    TokenUnavailable,
    connection_closed,
    error_for,
)
from server.client.wire import Data, Wire
from server.protocol.messages import (
    ClientMessage,
    Dequeue,
    Dequeued,
    Enqueue,
    Enqueued,
    Error,
    LoadingComplete,
    MatchFound,
    QueueStatus,
    Requeued,
    ServerMessage,
    StartLoading,
    StateName,
    Status,
    Welcome,
    acted_on,
)

log = logging.getLogger(__name__)

Token = str | Callable[[], str] | Callable[[], Awaitable[str]]
T = TypeVar("T")

_decoder: Final = msgspec.json.Decoder(ServerMessage)
_encoder: Final = msgspec.json.Encoder()
# Errors that say a loading_complete did not happen for a passing reason: auto_ready sends it
# again, after the error's retry_after_ms (or this default). A code this client does not know
# (a newer server's) counts as internal_error (docs/protocol.md "Errors").
_ANSWER_AGAIN: Final = frozenset({"unavailable", "rate_limited", "internal_error"})
# Errors that answer a loading_complete: those above, and those that refuse it for good.
_ANSWER_ERRORS: Final = _ANSWER_AGAIN | {"wrong_session_id", "invalid_state"}
_ANSWER_AGAIN_MS: Final = 1000
# The server's own schema, to refuse before sending what it would answer with an
# `invalid_message` that names no request (so no request could be told: it would hang).
_outgoing: Final = msgspec.json.Decoder(ClientMessage)


@functools.lru_cache(maxsize=64)
def _parse_uri(url: str) -> WebSocketURI:
    # Many clients of one process share a URL (a load generator's thousands of players).
    return parse_uri(url)


class Client:
    """A fastmatch connection for one player. Make one with :func:`connect`.

    Iterate it (``async for message in client``) to read every server message in order,
    answers to requests included; the iteration ends after :meth:`close` and raises
    :class:`~server.client.errors.ConnectionClosed` when the server ended the session.
    """

    def __init__(
        self, url: str, token: Token, *, auto_ready: bool = False, reconnect: bool = True,
        resume_grace_s: float = 10.0, token_in_query: bool = False, open_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0, ssl: ssl_module.SSLContext | None = None,
        max_size: int = 2**20, ping_interval_s: float | None = 20.0, ping_timeout_s: float = 20.0,
    ) -> None:
        self.url = url
        self._uri = _parse_uri(url)
        self._token = token
        self._token_in_query = token_in_query
        self._auto_ready = auto_ready
        self.reconnect = reconnect
        self.resume_grace_s = resume_grace_s
        self._open_timeout_s = open_timeout_s
        self._close_timeout_s = close_timeout_s
        self._ssl = ssl
        self._max_size = max_size
        self._ping_interval_s = ping_interval_s
        self._ping_timeout_s = ping_timeout_s

        self.welcome: Welcome | None = None
        """The ``welcome`` of the current (or last) connection: who we are, what was resumed."""
        self.state: StateName = "idle"
        self.game_mode: str | None = None
        self.loading_session_id: str | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.messages_sent = 0
        self.messages_received = 0

        self._wire: Wire | None = None
        self._first: asyncio.Future[Welcome] | None = None
        self._established = False  # the current connection has delivered its welcome
        self._inbox: deque[ServerMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None  # shared by every recv() waiting
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._answered: str | None = None  # loading session whose loading_complete was sent
        self._closing = False
        self._finished = False
        self._terminal: FastmatchClientError | None = None
        self._done: asyncio.Future[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._bound: asyncio.AbstractEventLoop | None = None

    # -- properties -------------------------------------------------------------------------------

    @property
    def player_id(self) -> str:
        return self.welcome.player_id if self.welcome is not None else ""

    @property
    def connected(self) -> bool:
        return self._wire is not None and self._established

    @property
    def resuming(self) -> bool:
        """A dropped connection is being resumed (reconnect on, within the resume grace)."""
        return self._reconnecting is not None and not self._reconnecting.done()

    @property
    def auto_ready(self) -> bool:
        """When true, every ready check (``start_loading``) is answered with ``loading_complete``
        at once; setting it answers the one running now, if any."""
        return self._auto_ready

    @auto_ready.setter
    def auto_ready(self, value: bool) -> None:
        self._auto_ready = value
        if value and self.state == "loading" and self.loading_session_id and self.connected:
            self._answer(self.loading_session_id)

    # -- requests ---------------------------------------------------------------------------------

    async def enqueue(self, game_mode: str, request_id: str | None = None) -> Enqueued:
        """Join the queue of ``game_mode``; raises the error's exception if refused."""
        rid = request_id or self._next_id()
        return await self._request(Enqueue(game_mode=game_mode, request_id=rid), rid, Enqueued)

    async def dequeue(self, request_id: str | None = None) -> Dequeued:
        """Leave the queue."""
        rid = request_id or self._next_id()
        return await self._request(Dequeue(request_id=rid), rid, Dequeued)

    async def status(self, request_id: str | None = None) -> QueueStatus:
        """The player's state, wait and queue size."""
        rid = request_id or self._next_id()
        return await self._request(Status(request_id=rid), rid, QueueStatus)

    def loading_complete(self, loading_session_id: str | None = None) -> None:
        """Answer the ready check now (the current one unless a session id is given). Success has
        no direct answer: ``match_found`` or ``requeued`` follows; errors arrive as messages."""
        sid = loading_session_id or self.loading_session_id
        if not sid:
            raise FastmatchClientError("no ready check is running")
        _checked(LoadingComplete(loading_session_id=sid))
        self._live_wire()  # on the next connection, welcome{loading} brings the check back
        self._answer(sid)

    def send(self, message: ClientMessage | str) -> None:
        """Send one message without waiting for an answer (a ``str`` goes out verbatim: meant
        for testing how a server handles bad input)."""
        wire = self._live_wire()
        wire.send_text(message.encode() if isinstance(message, str) else _encoder.encode(message))
        self.messages_sent += 1

    async def _request(self, message: ClientMessage, rid: str, answer: type[T]) -> T:
        data = _checked(message)
        if rid in self._pending:
            raise ValueError(f"request_id {rid!r} is already waiting for its answer")
        wire = self._live_wire()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[rid] = future
        try:
            wire.send_text(data)
            self.messages_sent += 1
            result = await future
        finally:
            self._pending.pop(rid, None)
        if not isinstance(result, answer):
            raise FastmatchClientError(f"request {rid} was answered with {result!r}")
        return result

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        """The loop this client runs on, looked up once: on Python 3.11 each
        asyncio.get_running_loop() is a getpid() system call, and this is asked per message."""
        if self._bound is None:
            self._bound = asyncio.get_running_loop()
        return self._bound

    def _next_id(self) -> str:
        # Not one the caller chose for a request still waiting (its own ids may be "c3").
        while (rid := f"c{next(self._ids)}") in self._pending:
            pass
        return rid

    def _live_wire(self) -> Wire:
        if self._wire is None or not self._established:
            if self._finished:
                raise self._terminal or ConnectionClosed(CloseCode.NORMAL, "closed by the client")
            raise NotConnected("not connected (reconnecting)")
        return self._wire

    def _answer(self, sid: str) -> None:
        if sid == self._answered or self._wire is None:
            return
        self._answered = sid
        try:
            self._wire.send_text(_encoder.encode(LoadingComplete(loading_session_id=sid)))
        except ConnectionClosed:
            return  # closing already: the server cancels the match as this player leaves
        self.messages_sent += 1

    def _answer_refused(self, message: Error) -> None:
        """The server did not take the ready answer: it may be sent again (``loading_complete``
        would otherwise skip it as sent). With ``auto_ready`` an answer refused for a passing
        reason (storage unavailable, a flood, an internal error) is sent again after the
        server's retry hint, while that ready check runs: else the player would time out of
        it, with a dodge counted, for the server's failure."""
        sid, self._answered = self._answered, None
        if sid and self._auto_ready and acted_on(message.code) in _ANSWER_AGAIN:
            delay = (message.retry_after_ms or _ANSWER_AGAIN_MS) / 1000
            self._loop.call_later(delay, self._answer_again, sid)

    def _answer_again(self, sid: str) -> None:
        if self.state == "loading" and self.loading_session_id == sid and self._established:
            self._answer(sid)

    # -- the message stream ---------------------------------------------------------------------

    async def recv(self) -> ServerMessage:
        """The next server message; raises ConnectionClosed once the client is finished."""
        while not self._inbox:
            if self._finished:
                raise self._terminal or ConnectionClosed(CloseCode.NORMAL, "closed by the client")
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = self._loop.create_future()
            # Shielded: one waiter cancelled must not cancel the future the others wait on.
            await asyncio.shield(waiter)
        return self._inbox.popleft()

    def __aiter__(self) -> AsyncIterator[ServerMessage]:
        return self

    async def __anext__(self) -> ServerMessage:
        try:
            return await self.recv()
        except ConnectionClosed:
            if self._finished and self._terminal is None and not self._inbox:
                raise StopAsyncIteration from None
            raise

    # -- closing --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection (1000) and stop reconnecting; safe to call twice."""
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            # Waited for, not awaited: its CancelledError is its own, and one aimed at the task
            # calling close() (a timeout, a TaskGroup ending) must reach that task.
            await asyncio.wait([self._reconnecting])
        wire = self._wire
        if wire is not None and self._established:
            wire.close(CloseCode.NORMAL)
            if self._done is not None:
                await asyncio.shield(self._done)
            return
        if wire is not None:  # an attempt still opening: give it up
            wire.handler = _Abandoned()
            wire.abort()
            self._wire = None
        self._finish(None)

    def drop(self) -> None:
        """Cut the TCP connection without a closing handshake, as a network failure would
        (to exercise resumes); with ``reconnect`` on, the client comes back within the grace."""
        if self._wire is not None:
            self._wire.abort()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _finish(self, terminal: FastmatchClientError | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._terminal = terminal
        self._fail_pending(terminal or ConnectionClosed(CloseCode.NORMAL, "closed by the client"))
        self._wake()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _fail_pending(self, exc: FastmatchClientError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- connecting -----------------------------------------------------------------------------

    async def _connect(self) -> Welcome:
        """One attempt: TCP, handshake, first message. Raises what went wrong."""
        loop = self._loop
        if self._done is None:
            self._done = loop.create_future()
        token = self._token if isinstance(self._token, str) else await self._fresh_token()
        uri, headers = self._uri, {}
        if self._token_in_query:
            query = f"{uri.query}&token={quote(token)}" if uri.query else f"token={quote(token)}"
            uri = dataclasses.replace(uri, query=query)
        else:
            headers["Authorization"] = f"Bearer {token}"
        first: asyncio.Future[Welcome] = loop.create_future()
        self._first = first
        self._established = False
        wire = self._wire = Wire(uri, headers, self, self._max_size, self._close_timeout_s,
                                 self._ping_interval_s, self._ping_timeout_s)
        try:
            async with asyncio.timeout(self._open_timeout_s):
                await loop.create_connection(lambda: wire, uri.host, uri.port, **self._tls(uri))
                return await first
        except BaseException:
            # Abandon this attempt: its late callbacks must not touch the client.
            wire.handler = _Abandoned()
            wire.abort()
            if self._wire is wire:
                self._wire = None
            raise

    async def _fresh_token(self) -> str:
        assert not isinstance(self._token, str)
        try:
            token = self._token()
            if inspect.isawaitable(token):
                # Bounded like the rest of an attempt: a token service that hangs would
                # otherwise hold a reconnect past its grace, and the stream would never end.
                async with asyncio.timeout(self._open_timeout_s):
                    token = await token
        except TimeoutError as exc:
            raise TokenUnavailable(
                f"the token function took longer than {self._open_timeout_s:g}s") from exc
        except Exception as exc:  # whatever the caller's function raises: a fetch, a bug
            raise TokenUnavailable(f"the token function failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(token, str):
            raise TokenUnavailable(f"the token function returned {type(token).__name__}, not str")
        return token

    def _tls(self, uri: WebSocketURI) -> dict[str, Any]:
        if not uri.secure:
            return {}
        return {"ssl": self._ssl or ssl_module.create_default_context(), "server_hostname": uri.host}

    async def _resume(self, code: int, reason: str) -> None:
        """Reconnect with full-jitter backoff, within the resume grace (docs/protocol.md
        "Resume"): a queued player gets its place back only if it returns in time."""
        try:
            await self._resume_within_grace(code, reason)
        except Exception as exc:
            # A bug below (here, in a library, in the caller's ssl context): nobody awaits this
            # task, so without this the stream would wait forever for a client that is gone.
            log.exception("reconnecting failed")
            failure = ConnectionClosed(
                CloseCode.ABNORMAL, f"reconnecting failed: {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
            self._finish(failure)

    async def _resume_within_grace(self, code: int, reason: str) -> None:
        deadline = time.monotonic() + self.resume_grace_s
        last: FastmatchClientError = connection_closed(code, reason)
        attempt, at_least = 0, 0.0
        while True:
            wait = retry.delay(attempt, at_least)
            if time.monotonic() + wait >= deadline:
                break
            await asyncio.sleep(wait)
            attempt += 1
            try:
                await self._connect()
                return
            except (OSError, TimeoutError, FastmatchClientError) as exc:
                next_wait = retry.verdict(exc, fresh_token=not isinstance(self._token, str))
                failure = exc if isinstance(exc, FastmatchClientError) else ConnectionClosed(
                    CloseCode.ABNORMAL, str(exc) or type(exc).__name__)
                if next_wait is None:
                    self._finish(failure)
                    return
                last, at_least = failure, next_wait
            log.info("reconnect attempt %d failed: %s", attempt, last)
        self._finish(last)

    # -- wire.Handler -----------------------------------------------------------------------------

    def opened(self) -> None:
        """The handshake succeeded; the welcome (or a refusal) is the next frame."""

    def failed(self, exc: FastmatchClientError | OSError) -> None:
        first = self._first
        if first is not None and not first.done():
            first.set_exception(exc)

    def frame(self, data: Data) -> None:
        try:
            message: ServerMessage = _decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            # A newer server may add message types; an old client skips what it cannot read.
            log.debug("skipping a server message this client does not know: %s", exc)
            return
        self.messages_received += 1
        first = self._first
        if first is not None and not first.done():
            if type(message) is Error:
                first.set_exception(error_for(message))  # refused at connect: no welcome
                return
            if type(message) is Welcome:
                self._established = True
                first.set_result(message)
        self._follow(message)
        self._inbox.append(message)
        self._wake()

    def _follow(self, message: ServerMessage) -> None:
        """Track the player's state (docs/protocol.md "Lifecycle"); answer ready checks."""
        kind = type(message)
        if kind is StartLoading:
            assert isinstance(message, StartLoading)
            self.state, self.game_mode = "loading", message.game_mode
            self.loading_session_id = message.loading_session_id
            if self._auto_ready:
                self._answer(message.loading_session_id)
        elif kind is MatchFound or kind is Dequeued:
            self.state, self.game_mode, self.loading_session_id = "idle", None, None
        elif kind is Enqueued or kind is Requeued:
            assert isinstance(message, Enqueued | Requeued)
            self.state, self.game_mode, self.loading_session_id = "queued", message.game_mode, None
        elif kind is Welcome:
            assert isinstance(message, Welcome)
            self._welcomed(message)
        elif kind is QueueStatus:
            # `status` tells the truth (it reads Redis): it corrects a state this client could
            # not follow (a ticket Redis lost, whose dequeued{removed} a server may not send).
            assert isinstance(message, QueueStatus)
            if message.state != self.state:
                self.state, self.game_mode = message.state, message.game_mode
                self.loading_session_id = self.loading_session_id if message.state == "loading" else None
        elif kind is Error:
            assert isinstance(message, Error)
            # not_in_queue: the server found no ticket, and the player is idle there now.
            if message.code in ("loading_timeout", "not_in_queue"):
                self.state, self.game_mode, self.loading_session_id = "idle", None, None
            self._settle_error(message)
            return
        rid = getattr(message, "request_id", None)
        if rid is not None:
            future = self._pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_result(message)

    def _welcomed(self, message: Welcome) -> None:
        self.welcome, self.state, self.game_mode = message, message.state, message.game_mode
        self.loading_session_id = message.loading_session_id
        self._answered = None  # an answer sent on a lost connection may not have arrived
        if self._auto_ready and message.state == "loading" and message.loading_session_id:
            self._answer(message.loading_session_id)

    def _settle_error(self, message: Error) -> None:
        if message.request_id is None and self._answered is not None and self.state == "loading" \
                and acted_on(message.code) in _ANSWER_ERRORS \
                and not (message.code == "rate_limited" and self._pending):
            # The ready answer refused: it carries no request_id, and every request of this
            # client does (a refused flood frame echoes none: with none waiting, it was this).
            self._answer_refused(message)
            return
        future = self._pending.pop(message.request_id, None) if message.request_id else None
        if future is None and message.code == "rate_limited" and self._pending:
            # A refused flood frame is not echoed; frames are answered in order, so the refusal
            # belongs to the oldest request still waiting.
            future = self._pending.pop(next(iter(self._pending)))
        if future is not None and not future.done():
            future.set_exception(error_for(message))

    def closed(self, code: int, reason: str) -> None:
        self._wire = None
        self.close_code, self.close_reason = code, reason
        if not self._established:
            first = self._first
            if first is not None and not first.done():
                first.set_exception(connection_closed(code, reason))
            return  # an attempt that never opened: its opener decides
        self._established = False
        self._fail_pending(connection_closed(code, reason))
        if self._closing:
            self._finish(None)
        elif self.reconnect and code in retry.RESUMABLE:
            self._reconnecting = self._loop.create_task(self._resume(code, reason))
        else:
            self._finish(connection_closed(code, reason))


class _Abandoned:
    """Handler of a connection attempt given up on: whatever it still reports is ignored."""

    def opened(self) -> None:
        pass

    def failed(self, exc: FastmatchClientError | OSError) -> None:
        pass

    def frame(self, data: Data) -> None:
        pass

    def closed(self, code: int, reason: str) -> None:
        pass


def _checked(message: ClientMessage) -> bytes:
    """The message encoded, if the server's schema accepts it; else ValueError (nothing sent)."""
    data = _encoder.encode(message)
    try:
        _outgoing.decode(data)
    except msgspec.ValidationError as exc:
        name = type(message).__name__
        raise ValueError(f"not a valid {name} (docs/protocol.md section 3): {exc}") from None
    return data
