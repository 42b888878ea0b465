"""The public WebSocket front end (PROTOCOL 1-6) and the operator endpoints (PROTOCOL 8)."""

from __future__ import annotations

import asyncio
import http
import itertools
import logging
import socket
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from server import metrics
from server.config import ModeConfig, ServerConfig
from server.protocol import codec
from server.protocol.auth import AuthError, Identity, TokenVerifier
from server.protocol.messages import Error
from server.protocol.ratelimit import KeyedBuckets
from server.protocol.session import CLOSE_INTERNAL, CLOSE_RATE_LIMITED, Limits, Session
from server.store import keys
from server.store.errors import StoreError, StoreUnavailable
from server.store.matches import LoadingStore
from server.store.players import Attached, PlayerStore
from server.transport import envelope
from server.transport.connection import ClientConnection, MatchEvents

log = logging.getLogger(__name__)
WS_PATHS: Final = frozenset({"/ws", "/ws/"})


class PlayerSocket(ServerConnection):
    """A server connection that carries the identity proven at the handshake."""

    identity: Identity | None = None


class FrontEnd:
    def __init__(
        self, config: ServerConfig, modes: Mapping[str, ModeConfig], store: PlayerStore,
        loading: LoadingStore, events: MatchEvents, allocation_timeout_ms: int,
        verifier: TokenVerifier, worker_id: str,
    ) -> None:
        self.config = config
        self.modes = modes
        self.store = store
        self.loading = loading
        self.events = events
        self.allocation_timeout_ms = allocation_timeout_ms
        self.verifier = verifier
        self.worker_id = worker_id
        self.ready = False  # set by the worker from its Redis heartbeat
        self.draining = False
        self.connections: dict[str, ClientConnection] = {}
        self._by_player: dict[str, set[str]] = {}
        self.pending_detach: set[tuple[str, str]] = set()
        self.limits = Limits(config.bad_message_budget, config.message_rate, config.message_burst,
                             config.rate_limit_strikes)
        self._per_ip = KeyedBuckets(config.connect_rate_per_ip, config.connect_burst_per_ip)
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: Server | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        options: dict[str, Any] = {"sock": sock} if sock is not None else {
            "host": host, "port": port, "reuse_port": True,
        }
        self._server = await serve(
            self._handler, process_request=self._process_request,
            create_connection=PlayerSocket, compression=None,
            max_size=self.config.max_message_bytes, ping_interval=self.config.ping_interval_s,
            ping_timeout=self.config.ping_timeout_s, **options,
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, close every client with 1001, wait for handlers to clean up."""
        self.draining = True
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- HTTP: health, readiness, authentication --------------------------------------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/health":
            return ws.respond(http.HTTPStatus.OK, "ok\n")
        if url.path == "/ready":
            if self.ready and not self.draining:
                return ws.respond(http.HTTPStatus.OK, "ready\n")
            why = "draining" if self.draining else "storage unavailable"
            return ws.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {why}\n")
        if url.path not in WS_PATHS:
            return ws.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        try:
            identity = self.verifier.verify(_token(request.headers, url.query))
        except AuthError as exc:
            response = ws.respond(http.HTTPStatus.UNAUTHORIZED, f"{exc}\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="fastmatch"'
            return response
        assert isinstance(ws, PlayerSocket)
        ws.identity = identity
        return None

    # -- one connection -------------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        assert isinstance(ws, PlayerSocket) and ws.identity is not None
        identity = ws.identity
        conn_id = f"{self.worker_id}.{next(self._ids)}"
        now = time.monotonic()
        session = Session(identity.player_id, self.modes, self.limits, now)
        client = ClientConnection(ws, identity, conn_id, session, self.store, self.loading,
                                  self.events, self.allocation_timeout_ms)
        self._register(client)
        try:
            if await self._connection_flood(client, ws, now):
                return
            try:
                result = await self.store.attach(identity.player_id, conn_id)
            except StoreError as exc:
                await self._refuse(client, exc)
                return
            client.attached = True
            await self._replace_previous(identity.player_id, result, conn_id)
            p = result.player
            await client.apply(session.welcome(p.state, p.mode, p.queued_at_ms, p.match_id))
            # Read until the socket ends, also after the session closed it: frames that keep
            # coming are dropped, and reading on lets the closing handshake finish.
            async for frame in ws:
                if session.closed:
                    continue
                effects = session.receive(frame, time.monotonic())
                metrics.MESSAGES_IN.labels(session.last_type).inc()
                await client.apply(effects)
        except ConnectionClosed:
            pass
        except Exception:
            client.log.exception("connection handler failed")
            await client.fail()
        finally:
            self._unregister(client)
            await client.closed()
            if client.attached:
                await self.detach(identity.player_id, conn_id, session.game_mode or "")

    async def _connection_flood(self, client: ClientConnection, ws: ServerConnection, now: float) -> bool:
        """PROTOCOL 5: too many new connections from one address: rate_limited, close 4008."""
        address = ws.remote_address[0] if ws.remote_address else "?"
        refused = self._per_ip.take(str(address), now)
        if refused is None:
            return False
        metrics.RATE_LIMITED.labels("connection").inc()
        await client.send_text(codec.encode(Error(
            code="rate_limited", message="too many new connections from this address",
            retry_after_ms=refused.retry_after_ms(),
        )))
        await ws.close(CLOSE_RATE_LIMITED, "rate limited")
        return True

    async def _refuse(self, client: ClientConnection, exc: StoreError) -> None:
        retry = exc.retry_after_ms if isinstance(exc, StoreUnavailable) else None
        code = "unavailable" if isinstance(exc, StoreUnavailable) else "internal_error"
        client.log.warning("refusing connection: %s", exc)
        await client.send_text(codec.encode(Error(
            code=code, message="matchmaking storage is unavailable; retry later",
            retry_after_ms=retry,
        )))
        await client.ws.close(CLOSE_INTERNAL, code)

    async def detach(self, player: str, conn_id: str, mode_guess: str = "") -> None:
        """Release the player in Redis; if Redis is down, housekeeping retries it later."""
        try:
            result = await self.store.detach(player, conn_id, mode_guess=mode_guess)
            self.pending_detach.discard((player, conn_id))
            if result.outcome == "loading" and result.match_id:
                # PROTOCOL 4: leaving during the ready check cancels the match for everyone.
                await self.events.left_loading(result.mode, result.match_id, player, self.draining)
        except StoreError as exc:
            log.warning("detach of %s deferred: %s", player, exc)
            self.pending_detach.add((player, conn_id))

    async def _replace_previous(self, player: str, attached: Attached, conn_id: str) -> None:
        """PROTOCOL 1: the new connection wins; the old one, wherever it is, is closed with 4009."""
        old_worker, old_conn = attached.previous_worker, attached.previous_conn
        if not old_conn or old_conn == conn_id:
            return
        if old_worker == self.worker_id:
            self._close_replaced(old_conn)
            return
        data = envelope.encode(envelope.Replace(player=player, conn=old_conn))
        try:
            await self.store.publish(keys.worker_channel(old_worker), data)
        except StoreError as exc:
            # The old worker's resync after its next reconnect closes it instead.
            log.warning("could not notify %s of replaced %s: %s", old_worker, old_conn, exc)

    def _close_replaced(self, conn_id: str) -> None:
        client = self.connections.get(conn_id)
        if client is not None:
            client.log.info("session replaced by a newer connection")
            self.spawn(client.apply(client.session.replaced()))

    # -- delivery from other workers ------------------------------------------------------------

    def on_delivery(self, data: bytes) -> None:
        try:
            message = envelope.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("dropping undecodable delivery %r", data[:200])
            return
        match message:
            case envelope.Replace(conn=conn):
                self._close_replaced(conn)
            case envelope.Deliver(items=items):
                for item in items:
                    client = self.connections.get(item.conn)
                    # A connection replaced since the sender looked is skipped: the new one
                    # learned the same state from its welcome.
                    if client is not None and client.player_id == item.player:
                        self.spawn(client.apply(client.session.deliver(item.message)))

    async def resync(self) -> None:
        """After (re)subscribing: close connections replaced while we could not hear about it."""
        # Only connections whose attach finished: one still attaching has no record yet.
        clients = [c for c in self.connections.values() if c.attached]
        owners = await self.store.owners([c.player_id for c in clients])
        for client, (worker, conn) in zip(clients, owners, strict=True):
            if (worker, conn) == (self.worker_id, client.conn_id) or client.session.closed:
                continue
            if conn:
                self._close_replaced(client.conn_id)
            else:
                self.spawn(self._reattach(client))

    async def _reattach(self, client: ClientConnection) -> None:
        """Redis lost the player's record (restart without persistence): tell the client."""
        client.log.warning("player record lost in Redis; re-attaching as idle")
        result = await self.store.attach(client.player_id, client.conn_id)
        session = client.session
        effects = []
        if session.game_mode and result.player.state == "idle":
            effects = session.removed(session.game_mode)
        await client.apply(effects)

    def _register(self, client: ClientConnection) -> None:
        metrics.CONNECTIONS.inc()
        self.connections[client.conn_id] = client
        self._by_player.setdefault(client.player_id, set()).add(client.conn_id)

    def _unregister(self, client: ClientConnection) -> None:
        metrics.CONNECTIONS.dec()
        self.connections.pop(client.conn_id, None)
        conns = self._by_player.get(client.player_id)
        if conns is not None:
            conns.discard(client.conn_id)
            if not conns:
                del self._by_player[client.player_id]


def _token(headers: Headers, query: str) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    values = parse_qs(query).get("token")
    return values[0] if values else None
