"""The public WebSocket front end (PROTOCOL 1-6) and the operator endpoints (PROTOCOL 8).

Connections are ``ClientConnection`` protocols on one listening socket per worker
(SO_REUSEPORT). This module decides what a handshake gets (health, readiness, 404, 401, a 503
when the worker is overloaded or draining, or the upgrade), keeps the connections by id for
deliveries from Redis, and releases players when their connection ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import socket
from collections.abc import Coroutine, Mapping
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from server import metrics
from server.aio import in_batches
from server.logthrottle import Throttled
from server.protocol import notices
from server.protocol.auth import AuthError
from server.protocol.messages import Error
from server.protocol.ratelimit import KeyedBuckets, address_key
from server.protocol.results import PlayerState
from server.store import keys
from server.store.errors import StoreError
from server.store.players import Attached
from server.transport import envelope, fdlimit
from server.transport.connection import ClientConnection
from server.transport.overload import LoopLag, RetryHint, Shed, busy_response
from server.transport.proxyproto import ProxyPolicy
from server.transport.services import Services
from server.transport.tls import load_context
from server.transport.wsproto import WsLimits

log = logging.getLogger(__name__)
WS_PATHS: Final = frozenset({"/ws", "/ws/"})
SETTLE_INTERVAL_S: Final = 0.5  # how often lost request outcomes are read back while Redis fails
# A connection busy at a resync (a request or its attach in flight) is read back once it is
# not, checked every SETTLE_INTERVAL_S for this many rounds (a request lasts at most about
# two operation timeouts: longer means Redis fails, and the subscriber resyncs again).
RECHECK_ROUNDS: Final = 20
RESYNC_BATCH: Final = 64  # connections re-attached at once by a resync
_refusing = Throttled(log, "refusing connections, storage unavailable")
_shedding = Throttled(log, "refusing handshakes (HTTP 503), worker busy", level=logging.INFO)
_deferred = Throttled(log, "detach deferred to housekeeping, storage unavailable")
_cancel_deferred = Throttled(log, "cancel of a ready check left to the mode's leader")
_unnotified = Throttled(log, "could not tell another worker of a replaced connection")
_crashed = Throttled(log, "connection task failed", level=logging.ERROR)
_resync_incomplete = Throttled(log, "resync: connections with a request in flight not caught up")


class FrontEnd:
    def __init__(self, services: Services) -> None:
        self.services = services
        config = self.config = services.config
        self.store = services.store
        self.worker_id = services.worker_id
        self.limits = services.limits
        self.ready = False  # set by the worker from its Redis heartbeat
        # SIGTERM: /ready answers 503 so balancers take the host out, while players (new ones
        # too) are still served for server.drain_delay_s; then `close` drains.
        self.leaving = False
        self.draining = False
        self.connections: dict[str, ClientConnection] = {}
        # player -> its registered connections here (one, but for a moment while it reconnects)
        self._players: dict[str, tuple[ClientConnection, ...]] = {}
        self.pending_detach: set[tuple[str, str]] = set()
        # Replacement notices (worker, player, old connection) whose publish failed: housekeeping
        # sends them again, or the old connection would stay open and untold until it spoke.
        self.pending_replace: set[tuple[str, str, str]] = set()
        self.detaching: set[tuple[str, str]] = set()  # (player, conn) being released right now
        proxy = ProxyPolicy(config.proxy_trusted, config.proxy_header_timeout_s) \
            if config.proxy_protocol else None
        self.ws_limits = WsLimits(max_size=config.max_message_bytes,
                                  ping_interval_s=config.ping_interval_s,
                                  ping_timeout_s=config.ping_timeout_s, proxy=proxy)
        self.retry_hint = RetryHint(config.overload_retry_after_s, config.overload_retry_after_max_s)
        self.lag = LoopLag(config.max_loop_lag_ms / 1000, every_second=self.retry_hint.tick)
        self._max_queue_s = config.max_handshake_queue_ms / 1000
        self.caps = fdlimit.caps_for(config.max_connections, config.max_pending_handshakes)
        self.handshakes = 0  # upgrades waiting for their welcome (attach in flight)
        self._per_ip = KeyedBuckets(config.connect_rate_per_ip, config.connect_burst_per_ip)
        self._ipv6_prefix = config.connect_ipv6_prefix
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._all: set[ClientConnection] = set()  # every TCP connection, welcomed or not
        self._sheds: set[Shed] = set()  # ... and those accepted to be refused cheaply
        self._all_gone = asyncio.Event()
        self._unsettled: set[ClientConnection] = set()  # lost a request's outcome: reconcile
        self._settler: asyncio.Task[None] | None = None
        # The loop it serves on, looked up once in start(): asyncio.get_running_loop() makes a
        # getpid() system call on Python 3.11, and the per-player path would ask many times.
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        if self.config.tls_cert_file:
            # Read now, at each worker's start: a rolling restart serves a renewed certificate.
            tls = load_context(self.config.tls_cert_file, self.config.tls_key_file)
            self.ws_limits = dataclasses.replace(self.ws_limits, tls=tls)
        loop = self.loop = asyncio.get_running_loop()
        options: dict[str, Any] = {"sock": sock} if sock is not None else {
            "host": host, "port": port, "reuse_port": True,
        }
        self._server = await loop.create_server(
            self._accepted, backlog=self.config.backlog, **options)
        self.lag.start()

    def _accepted(self) -> asyncio.Protocol:
        held = len(self._all) + len(self._sheds)
        if held >= self.caps.sockets:
            # Connections that never finish their request (slowloris) would otherwise hold a
            # descriptor each until their open timeout, without limit.
            metrics.inc(metrics.HANDSHAKES_REFUSED, "max_connections")
            _shedding("max_connections (%d sockets held, new ones closed at once)", held)
            # Not counted in the hint: these sockets sent nothing yet, and a flood of idle
            # ones (slowloris) must not send every real client away for longer.
            return _Refused(self.retry_hint.value if self._plain else None)
        if self._plain and self._shed():
            shed = Shed(self)
            self._sheds.add(shed)
            return shed
        client = ClientConnection(self)
        self._all.add(client)
        return client

    @property
    def _plain(self) -> bool:
        """Plain ws://: HTTP is the first thing on the wire. With TLS or the PROXY protocol
        other bytes come first, and such connections are refused through the whole
        connection machinery (or, past the socket ceiling, closed without a word)."""
        return self.ws_limits.tls is None and self.ws_limits.proxy is None

    # -- Shed connections (server/transport/overload.py) ------------------------------------------

    def retry_after(self, reason: str) -> int:
        """The Retry-After of a 503 for ``reason``: a draining worker's is the base (another
        worker or host may take the client at once), an overloaded one's the grown hint."""
        return self.retry_hint.base_s if reason == "draining" else self.retry_hint.value

    @property
    def open_timeout_s(self) -> float:
        return self.ws_limits.open_timeout_s

    def shed_reason(self, waited_s: float) -> str:
        return self._shed(waited_s)

    def shed_refused(self, reason: str) -> None:
        metrics.inc(metrics.HANDSHAKES_REFUSED, reason)
        if reason != "draining":  # a shutdown, not a load: it says nothing of the retries
            self.retry_hint.refused()
            _shedding("%s (loop lag %.0f ms, %d upgrades pending)", reason,
                      self.lag.lag_s * 1000, self.handshakes)

    def shed_ended(self, shed: Shed) -> None:
        self._sheds.discard(shed)

    def adopt(self, transport: asyncio.Transport, data: bytes, open_timeout_s: float) -> None:
        """A connection accepted as ``Shed`` that needs the whole treatment after all."""
        client = ClientConnection(self)
        self._all.add(client)
        transport.set_protocol(client)
        client.connection_made(transport)
        client.limit_open(open_timeout_s)
        if data and not client.lost:
            client.data_received(data)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, close every client with 1001, wait for handlers to clean up."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for client in list(self._all):
            if client.attached:
                client.shut_down()
            elif not client.handshaking:
                client.respond(self.refusal(client, 503, "shutting down"))
        for shed in list(self._sheds):  # refused anyway: now, not at their open timeout
            shed.refuse("draining")
        # Each closing handshake is bounded by its close timeout (then aborted).
        if self._all:
            await self._all_gone.wait()
        self.lag.stop()
        if self._settler is not None:
            self._settler.cancel()
            await asyncio.gather(self._settler, return_exceptions=True)
        while self._tasks:  # detaches of the connections that just ended
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = (self.loop or asyncio.get_running_loop()).create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            _crashed("%s", task.get_name(), exc_info=error)

    # -- HTTP: health, readiness, overload, authentication ----------------------------------------

    def admit(self, client: ClientConnection, request: Request) -> Response | None:
        """The answer to a handshake request, or None to go on with the WebSocket upgrade
        (the client's identity and connection id are then set)."""
        try:
            url = urlsplit(request.path)
        except ValueError:  # e.g. "//[x": an authority that is not a valid IPv6 literal
            return self.refusal(client, 400, "bad request target")
        if url.path not in WS_PATHS:
            return self._operator(client, url.path)
        refused = self._shed(client.request_age_s)
        if refused:
            # Beyond capacity: refuse at once, before any work, instead of letting handshakes
            # queue until clients time out; players already connected keep their service.
            self.shed_refused(refused)
            response = self.refusal(client, 503, f"server busy ({refused}); retry later")
            response.headers["Retry-After"] = str(self.retry_after(refused))
            return response
        self.retry_hint.admitted()
        try:
            token = _token(request.headers, url.query)
        except MultipleValuesError:
            # Which one to believe is anybody's guess (and a proxy may have added one).
            return self.refusal(client, 400, "more than one Authorization header")
        try:
            identity = self.services.verifier.verify(token)
        except AuthError as exc:
            response = self.refusal(client, 401, str(exc))
            response.headers["WWW-Authenticate"] = 'Bearer realm="fastmatch"'
            return response
        client.identity = identity
        client.conn_id = f"{self.worker_id}.{next(self._ids)}"
        return None

    def _operator(self, client: ClientConnection, path: str) -> Response:
        """PROTOCOL 8: /health and /ready on the public port; anything else is not found."""
        if path == "/health":
            return self.refusal(client, 200, "ok")
        if path != "/ready":
            return self.refusal(client, 404, "not found")
        if self.ready and not self.draining and not self.leaving:
            return self.refusal(client, 200, "ready")
        why = "draining" if self.draining or self.leaving else "storage unavailable"
        return self.refusal(client, 503, f"not ready: {why}")

    def _shed(self, waited_s: float = 0.0) -> str:
        """Why a handshake whose request has waited ``waited_s`` is refused ("": it is not)."""
        if self.draining:
            return "draining"
        if 0 < self._max_queue_s < waited_s:
            # Queued that long before the worker read it (the accept queue, a busy loop): its
            # welcome would come later still. Refused now, it retries where there is room.
            return "queued"
        if self.lag.lagging:
            return "loop_lag"
        if self.handshakes >= self.config.max_pending_handshakes:
            return "inflight"
        if len(self.connections) >= self.caps.connections:
            return "max_connections"
        return ""

    @staticmethod
    def refusal(client: ClientConnection, status: int, text: str) -> Response:
        return client.reject(status, text)

    def handshake_started(self) -> None:
        self.handshakes += 1

    def handshake_ended(self) -> None:
        self.handshakes -= 1

    def flood_error(self, peer: str, now: float) -> Error | None:
        """PROTOCOL 5: too many new connections from one address (per worker)."""
        refused = self._per_ip.take(address_key(peer, self._ipv6_prefix), now)
        if refused is None:
            return None
        metrics.inc(metrics.RATE_LIMITED, "connection")
        return Error(code="rate_limited", message="too many new connections from this address",
                     retry_after_ms=refused.retry_after_ms())

    def refused_handshake(self, exc: StoreError) -> None:
        _refusing("%s", exc)

    # -- requests whose outcome was lost ----------------------------------------------------------

    def reconcile(self, client: ClientConnection) -> None:
        """``client``'s request timed out (Redis may have run it): read its player back once
        Redis answers. One loop for every such connection, not one per failed request."""
        self._unsettled.add(client)
        if self._settler is None or self._settler.done():
            self._settler = asyncio.get_running_loop().create_task(self._settle(), name="settle")

    async def _settle(self) -> None:
        while self._unsettled:
            await asyncio.sleep(SETTLE_INTERVAL_S)
            clients = [c for c in self._unsettled if not c.lost]
            self._unsettled.clear()
            seen = [c.version for c in clients]
            try:
                states = await self.store.states([c.player_id for c in clients])
            except StoreError:
                self._unsettled.update(clients)  # still unanswered: next round
                continue
            for client, state, before in zip(clients, states, seen, strict=True):
                if client.version != before or client.busy:
                    # The session moved while Redis was read (a retried request answered, a
                    # notice followed), or a request of its own is in flight and its answer may
                    # settle nothing (not sent): read again, after.
                    self._unsettled.add(client)
                    continue
                try:
                    client.reconcile(state)
                except Exception:  # one connection's bug must not leave the others holding
                    _crashed("reconciling %s", client.conn_id, exc_info=True)

    # -- connections ------------------------------------------------------------------------------

    def register(self, client: ClientConnection) -> None:
        metrics.add(metrics.CONNECTIONS, 1)
        self.connections[client.conn_id] = client
        self._players[client.player_id] = (*self._players.get(client.player_id, ()), client)

    def holders(self) -> dict[str, ClientConnection]:
        """Player -> its open (welcomed) connection on this worker."""
        return {c.player_id: c for c in self.connections.values() if c.open}

    async def settle_ended(self, player: str, conn_id: str,
                           holders: Mapping[str, ClientConnection]) -> str:
        """The record of ``conn_id``, an ended connection of ours, left to settle (its detach
        failed, or the audit found it). If the player has another open connection here, that
        one takes the record back instead: a failover may have lost its attach, and a detach
        there would put it in resume grace and get it refused as replaced (4009). Returns
        "taken", or the detach's outcome ("" when deferred)."""
        holder = holders.get(player)
        if holder is not None and holder.conn_id != conn_id and holder.open:
            try:
                taken = await holder.take_back(conn_id)
            except StoreError as exc:
                _deferred("%s: %s", player, exc)  # still pending: the next tick tries again
                return ""
            if taken:
                self.pending_detach.discard((player, conn_id))
                return "taken"
        return await self.detach(player, conn_id)

    async def catch_up_with(self, client: ClientConnection) -> None:
        """Read ``client``'s player back and tell it what it missed (one connection's resync)."""
        self._recheck_later(await self._catch_up([client]))

    def unregister(self, client: ClientConnection) -> None:
        self._all.discard(client)
        if self.draining and not self._all:
            self._all_gone.set()
        if self.connections.pop(client.conn_id, None) is not None:
            metrics.add(metrics.CONNECTIONS, -1)
            player = client.player_id
            rest = tuple(c for c in self._players.get(player, ()) if c is not client)
            if rest:
                self._players[player] = rest
            else:
                self._players.pop(player, None)

    def release(self, player: str, conn_id: str, mode_guess: str = "") -> None:
        """A connection that had attached is gone: detach it, or the player's other open
        connection here takes the record back (housekeeping retries either on failure)."""
        self.detaching.add((player, conn_id))
        self.spawn(self._release(player, conn_id, mode_guess))

    async def _release(self, player: str, conn_id: str, mode_guess: str) -> None:
        # The player's other open connection here, if any, takes the record back instead: a
        # failover may have lost its attach, so Redis may still name the ended connection, and
        # a detach would release the record under the live one (out of a ready check, which
        # cancels the match with a dodge penalty; or into resume grace). Where Redis already
        # names the live connection the re-attach changes nothing: one script call either way.
        holder = next((c for c in self._players.get(player, ())
                       if c.conn_id != conn_id and c.open), None)
        if holder is not None:
            try:
                if await holder.take_back(conn_id, mode_guess):
                    return
            except StoreError as exc:
                _deferred("%s: %s", player, exc)
                self.pending_detach.add((player, conn_id))  # housekeeping: settle_ended
                return
            finally:
                self.detaching.discard((player, conn_id))
        await self.detach(player, conn_id, mode_guess)

    async def detach(self, player: str, conn_id: str, mode_guess: str = "") -> str:
        """Release the player in Redis; if Redis is down, housekeeping retries it later.
        Returns the detach's outcome ("stale": the connection no longer held the player;
        "" when deferred)."""
        self.detaching.add((player, conn_id))
        try:
            return await self._detach(player, conn_id, mode_guess)
        finally:
            self.detaching.discard((player, conn_id))

    async def _detach(self, player: str, conn_id: str, mode_guess: str) -> str:
        try:
            result = await self.store.detach(player, conn_id, mode_guess=mode_guess,
                                             shutdown=self.draining)
        except StoreError as exc:
            _deferred("%s: %s", player, exc)
            self.pending_detach.add((player, conn_id))
            return ""
        self.pending_detach.discard((player, conn_id))
        if result.outcome == "loading" and result.match_id:
            # PROTOCOL 4: leaving during the ready check cancels the match for everyone. If
            # this fails, the detach recorded the leaver and the mode's leader cancels it.
            try:
                await self.services.events.left_loading(result.mode, result.match_id, player,
                                                        self.draining)
            except StoreError as exc:
                _cancel_deferred("match %s (%s left): %s", result.match_id, player, exc)
        return result.outcome

    async def replace_previous(self, player: str, attached: Attached, conn_id: str) -> None:
        """PROTOCOL 1: the new connection wins; the old one, wherever it is, is closed with 4009."""
        old_worker, old_conn = attached.previous_worker, attached.previous_conn
        if not old_conn or old_conn == conn_id:
            return
        if old_worker == self.worker_id:
            self._close_replaced(old_conn)
            return
        await self.send_replace(old_worker, player, old_conn)

    async def send_replace(self, worker: str, player: str, conn: str) -> None:
        """Tell ``worker`` that its connection ``conn`` of ``player`` lost to a newer one; on
        failure, housekeeping tries again (a resync of that worker would also catch it, but only
        if its subscriber is the one that failed)."""
        data = envelope.encode(envelope.Replace(player=player, conn=conn))
        try:
            await self.store.publish(keys.worker_channel(worker), data)
        except StoreError as exc:
            _unnotified("%s of %s: %s", worker, conn, exc)
            self.pending_replace.add((worker, player, conn))
            return
        self.pending_replace.discard((worker, player, conn))

    def _close_replaced(self, conn_id: str) -> None:
        client = self.connections.get(conn_id)
        if client is not None:
            client.replaced()

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
            case envelope.Notices(events=events):
                connections = self.connections
                for event in events:
                    for player, conn, server_message in notices.messages(event):
                        client = connections.get(conn)
                        # A connection replaced since the script looked is skipped: the new
                        # one learned the same state from its welcome.
                        if client is not None and client.identity.player_id == player:
                            try:
                                client.deliver(server_message)
                            except Exception:  # one connection's bug: the others still hear theirs
                                _crashed("delivering to %s", conn, exc_info=True)
                                # It missed a notice: closed, so that it resumes and its
                                # welcome says where it stands, rather than stay out of step.
                                client.fail_internal()

    async def resync(self) -> None:
        """After (re)subscribing: whatever was published to this worker while it could not
        hear is lost, so read every player it holds back from Redis. Close connections
        replaced meanwhile, re-attach those whose record Redis lost, and tell the rest what
        they missed (a ready check that began or ended)."""
        # One still attaching has no record yet (or one whose notices may be lost already): it
        # is read back with the busy ones, once its attach is done.
        attaching = [c for c in self.connections.values() if c.handshaking]
        busy = await self._catch_up([c for c in self.connections.values() if c.attached])
        self._recheck_later(busy + attaching)

    async def _catch_up(self, clients: list[ClientConnection]) -> list[ClientConnection]:
        """Read ``clients`` back and act on what Redis says; returns those busy with a request
        (their state settles when it answers: read them again then)."""
        seen = [c.version for c in clients]  # a session that moves on meanwhile heard it live
        records = await self.store.records([c.player_id for c in clients])
        behind: list[tuple[ClientConnection, PlayerState, int]] = []
        lost: list[tuple[ClientConnection, str]] = []
        busy: list[ClientConnection] = []
        for client, (worker, conn, state), before in zip(clients, records, seen, strict=True):
            if not client.open:
                continue
            if (worker, conn) == (self.worker_id, client.conn_id):
                if client.busy:
                    busy.append(client)  # a request in flight: read it again once it is done
                elif client.version == before and client.behind(state):
                    behind.append((client, state, before))
            elif not (worker or conn) or (worker == self.worker_id and conn not in self.connections):
                # No record, or one naming an ended connection of ours: this one's attach was
                # lost (a Redis restart, a failover's lost write); it was never replaced.
                lost.append((client, conn))
            else:
                self._close_replaced(client.conn_id)
        if behind:
            views = await self.services.loading.views(sorted(
                {ref for client, state, _ in behind for ref in client.matches_involved(state)}))
            for client, state, before in behind:
                if client.version == before:
                    client.catch_up(state, views)
        # Raised to the caller (the subscriber's resync runs again) if Redis refuses. In
        # batches: after a restart (or a reaper) thousands may need it, each 2-3 calls, and
        # all at once would run past the client's max_inflight.
        await in_batches(lost, lambda pair: pair[0].record_lost(pair[1]), RESYNC_BATCH)
        return busy

    def _recheck_later(self, clients: list[ClientConnection]) -> None:
        if clients:
            self.spawn(self._recheck(clients))

    async def _recheck(self, clients: list[ClientConnection]) -> None:
        """Connections busy during a read-back (a request or their attach in flight): once
        they are not, read them back too (a notice lost meanwhile is not on its way). A
        connection that is still busy is waited for again, not given up after one look."""
        for _ in range(RECHECK_ROUNDS):
            await asyncio.sleep(SETTLE_INTERVAL_S)
            # Still attaching counts as alive: such a connection is not open (welcomed) yet.
            clients = [c for c in clients if not c.lost and (c.open or c.handshaking)]
            ready = [c for c in clients if not c.handshaking and not c.busy and c.attached]
            waiting = [c for c in clients if c.handshaking or c.busy]
            try:
                waiting += await self._catch_up(ready) if ready else []
            except StoreError as exc:
                _resync_incomplete("%d connections not read back: %s", len(clients), exc)
                return
            clients = waiting
            if not clients:
                return
        _resync_incomplete("%d connections still busy, not read back", len(clients))


class _Refused(asyncio.Protocol):
    """A socket past the worker's ceiling: a 503 before its request is even read, then closed
    (best effort: a client whose request is already on its way may see a reset instead). With
    TLS or the PROXY protocol the first bytes are not HTTP's: closed without a word."""

    def __init__(self, retry_after_s: int | None) -> None:
        self.retry_after_s = retry_after_s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.retry_after_s is not None:
            cast(asyncio.Transport, transport).write(
                busy_response("max_connections", self.retry_after_s))
        transport.close()


def _token(headers: Headers, query: str) -> str | None:
    """The bearer token of the Authorization header, else of the query string (raises
    ``MultipleValuesError`` for a request with several Authorization headers)."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    values = parse_qs(query).get("token")
    return values[0] if values else None
