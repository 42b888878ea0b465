"""One client connection: the WebSocket, its session, and the requests the session asks for."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, Protocol

from websockets.http11 import Request, Response

from server import metrics
from server.logthrottle import Throttled
from server.protocol import codec
from server.protocol.auth import Identity
from server.protocol.messages import Error as ErrorMessage
from server.protocol.messages import ServerMessage
from server.protocol.session import (
    CLOSE_INTERNAL,
    CLOSE_RATE_LIMITED,
    Close,
    Effect,
    RunDequeue,
    RunEnqueue,
    RunReady,
    RunStatus,
    Send,
    Session,
)
from server.store.errors import StoreError, StoreUnavailable
from server.store.matches import ReadyResult
from server.transport.wsproto import WebSocketProtocol

if TYPE_CHECKING:
    from server.transport.frontend import FrontEnd


class MatchEvents(Protocol):
    """What the transport reports to the matchmaking services (implemented in server/app)."""

    def all_ready(self, mode: str, match_id: str, ready: ReadyResult) -> None:
        """Every player of the match is ready: start the game-server handoff (non-blocking)."""

    async def left_loading(self, mode: str, match_id: str, player: str, shutdown: bool) -> None:
        """A player's connection ended during its ready check: cancel the match. With
        ``shutdown`` the server closed it (draining): nobody is at fault, everyone requeued."""

    def enqueue_blocked(self, mode: str) -> None:
        """An enqueue was refused with player_blocked (for metrics)."""


log = logging.getLogger(__name__)
_UNAVAILABLE_MSG: Final = "matchmaking storage is unavailable; retry later"
_failed = Throttled(log, "requests failed, storage unavailable")
# Redis answered with an error (e.g. OOM, a script error): the reply says it all, a traceback
# adds nothing, and every request of every client would repeat it.
_refused = Throttled(log, "requests failed, storage error", level=logging.ERROR)
# Any client with a valid token can reconnect in a loop; each reconnect replaces a connection.
_replaced = Throttled(log, "sessions replaced by a newer connection", level=logging.INFO)


class ClientConnection(WebSocketProtocol):
    def __init__(self, front: FrontEnd) -> None:
        super().__init__(front.ws_limits)
        self.front = front
        self.identity = Identity("")
        self.conn_id = ""
        self.session: Session | None = None
        self.attached = False  # set once Redis records this connection as the player's
        self._upgrade: Response | None = None  # the 101, sent together with the welcome
        self._attaching = False
        self._reconciling: asyncio.Task[None] | None = None

    @property
    def player_id(self) -> str:
        return self.identity.player_id

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        return logging.LoggerAdapter(log, {"player": self.identity.player_id, "conn": self.conn_id})

    @property
    def handshaking(self) -> bool:
        return self._attaching

    # -- the opening handshake ------------------------------------------------------------------

    def handle_request(self, request: Request) -> None:
        refusal = self.front.admit(self, request)
        if refusal is not None:
            self.respond(refusal)
            return
        upgrade = self.ws.accept(request)
        if upgrade.status_code != 101:  # not a valid WebSocket upgrade (e.g. 426)
            self.respond(upgrade)
            return
        self.hold()  # frames that arrive early wait for the welcome
        now = self._loop.time()
        self.session = Session(self.identity.player_id, self.front.modes, self.front.limits, now)
        self.front.register(self)
        flood = self.front.flood_error(self.peer, now)
        if flood is not None:
            # PROTOCOL 5: too many new connections from one address: rate_limited, close 4008.
            self.respond(upgrade, flush=False)
            self._send(flood)
            self.close_with(CLOSE_RATE_LIMITED, "rate limited")
            return
        self._upgrade = upgrade
        self._attaching = True
        self.front.handshake_started()
        self.front.spawn(self._attach())

    async def _attach(self) -> None:
        front = self.front
        try:
            result = await front.store.attach(self.identity.player_id, self.conn_id)
        except StoreError as exc:
            if isinstance(exc, StoreUnavailable) and exc.maybe_ran:
                # Redis may have recorded this connection as the player's after all; nothing
                # else would ever release that record (issue 13): settle it once Redis answers.
                front.pending_detach.add((self.identity.player_id, self.conn_id))
            self._attach_failed(exc)
            return
        finally:
            self._attaching = False
            front.handshake_ended()
        self.attached = True
        if self.lost or front.draining:
            # Gone while attaching, or the worker started draining: never welcomed, so the
            # client sees a close or an immediate 503 to retry elsewhere, never a 1001.
            if not self.lost:
                self.respond(front.refusal(self, 503, "shutting down"))
            await front.detach(self.identity.player_id, self.conn_id)
            return
        await front.replace_previous(self.identity.player_id, result, self.conn_id)
        assert self.session is not None and self._upgrade is not None
        self.respond(self._upgrade, flush=False)
        p = result.player
        self.release()
        self._apply(self.session.welcome(p.state, p.mode, p.queued_at_ms, p.match_id))
        self.drain()
        self.flush()

    def _attach_failed(self, exc: StoreError) -> None:
        if self.lost or self._upgrade is None:
            return
        retry = exc.retry_after_ms if isinstance(exc, StoreUnavailable) else None
        code = "unavailable" if isinstance(exc, StoreUnavailable) else "internal_error"
        self.front.refused_handshake(exc)
        self.respond(self._upgrade, flush=False)
        self._send(ErrorMessage(code=code, message=_UNAVAILABLE_MSG, retry_after_ms=retry))
        self.close_with(CLOSE_INTERNAL, code)
        self.flush()

    # -- client messages ------------------------------------------------------------------------

    def handle_message(self, data: str | bytes) -> None:
        session = self.session
        if session is None or session.closed:
            return  # frames after the session closed are dropped while the close completes
        effects = session.receive(data, self._loop.time())
        metrics.inc(metrics.MESSAGES_IN, session.last_type)
        if session.last_type == "rate_limited":
            metrics.inc(metrics.RATE_LIMITED, "message")
        self._apply(effects)

    def deliver(self, message: ServerMessage) -> None:
        """A server-initiated message for this connection (from the worker's channel)."""
        if self.session is not None and not self.lost:
            self._apply(self.session.deliver(message))
            self.flush()

    def deliver_effects(self, effects: list[Effect]) -> None:
        if not self.lost:
            self._apply(effects)
            self.flush()

    def replaced(self) -> None:
        """Another connection of this player won (PROTOCOL 1): close 4009."""
        if self.session is not None and not self.lost:
            _replaced("player %s, connection %s", self.identity.player_id, self.conn_id)
            self._apply(self.session.replaced())
            self.flush()

    def shut_down(self) -> None:
        """The worker is draining: 1001, the client reconnects elsewhere (PROTOCOL 6)."""
        if self.session is not None and self.attached and not self.lost:
            self._apply(self.session.close(1001, "server shutting down"))
            self.flush()

    def handle_lost(self) -> None:
        self.front.unregister(self)
        if self._reconciling is not None:
            self._reconciling.cancel()
        if self.attached:
            mode = self.session.game_mode if self.session is not None else None
            self.front.spawn(self.front.detach(self.identity.player_id, self.conn_id, mode or ""))

    # -- effects --------------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out effects in order. A request holds the connection; the effects after it
        and the messages that arrive meanwhile wait for its result."""
        for i, effect in enumerate(effects):
            if type(effect) is Send:
                self._send(effect.message)
            elif type(effect) is Close:
                self.close_with(effect.code, effect.reason)
            else:
                self.hold()
                self.front.spawn(self._request(effect, effects[i + 1:]))
                return

    def _send(self, message: ServerMessage) -> None:
        tag: str = message.__struct_config__.tag  # type: ignore[assignment]
        metrics.inc(metrics.MESSAGES_OUT, tag)
        if type(message) is ErrorMessage:
            metrics.inc(metrics.ERRORS_SENT, message.code)
        self.send_message(codec.encode(message))

    async def _request(self, effect: Effect, rest: list[Effect]) -> None:
        effects = await self._guarded(effect)
        if not self.lost:
            self.release()
            self._apply(effects + rest)  # may start the next request
            self.drain()
            self.flush()

    async def _guarded(self, effect: Effect) -> list[Effect]:
        """Storage failures become PROTOCOL errors; the session undoes its optimistic phase.

        A timeout does not say whether Redis ran the script, so the outcome is read back from
        Redis once it answers again (``reconcile``) and the client is told what happened.
        """
        assert self.session is not None
        rid = getattr(effect, "request_id", None)
        try:
            return await self._run(effect)
        except StoreUnavailable as exc:
            _failed("%s (player %s)", exc, self.identity.player_id)
            if self._reconciling is None or self._reconciling.done():
                self._reconciling = asyncio.get_running_loop().create_task(self._reconcile())
            return self.session.request_failed(
                "unavailable", _UNAVAILABLE_MSG, rid, exc.retry_after_ms
            )
        except StoreError as exc:
            _refused("%s (player %s)", exc, self.identity.player_id)
            return self.session.request_failed("internal_error", "internal error", rid)

    async def _run(self, effect: Effect) -> list[Effect]:
        match effect:
            case RunEnqueue(game_mode=mode, request_id=rid):
                return await self._enqueue(mode, rid)
            case RunDequeue(request_id=rid):
                return await self._dequeue(rid)
            case RunStatus(request_id=rid):
                return await self._status(rid)
            case RunReady(loading_session_id=sid, game_mode=mode, request_id=rid):
                return await self._ready(mode, sid, rid)
        return []

    async def _enqueue(self, mode: str, rid: str | None) -> list[Effect]:
        assert self.session is not None
        rating = self.identity.rating(mode, self.session.modes[mode].default_rating)
        result = await self.front.store.enqueue(
            self.player_id, self.conn_id, mode, rating, self.identity.attrs
        )
        if result.outcome == "ok":
            return self.session.enqueued(mode, result.queued_at_ms, rid)
        if result.outcome == "already" and result.current is not None:
            return self.session.enqueue_refused(result.current.state, result.current.mode, rid)
        if result.outcome == "blocked":
            self.front.events.enqueue_blocked(mode)
            return self.session.enqueue_blocked(result.retry_after_ms, rid)
        return self.session.replaced()

    async def _ready(self, mode: str, match_id: str, rid: str | None) -> list[Effect]:
        assert self.session is not None
        front = self.front
        result = await front.loading.ready(
            mode, match_id, self.player_id, self.conn_id, front.allocation_timeout_ms,
            front.worker_id,
        )
        match result.outcome:
            case "allocating":
                front.events.all_ready(mode, match_id, result)
            case "replaced":
                return self.session.replaced()
            case "unknown" | "wrong_session":
                return self.session.ready_refused(rid)
        # "ready" and "final" have no answer: the match's outcome message follows (PROTOCOL 4).
        return []

    async def _dequeue(self, rid: str | None) -> list[Effect]:
        assert self.session is not None
        result = await self.front.store.dequeue(self.player_id, self.conn_id, self.session.game_mode or "")
        if result.outcome == "ok":
            return self.session.dequeued(result.mode, rid)
        if result.outcome == "replaced":
            return self.session.replaced()
        return self.session.dequeue_refused(result.outcome, rid)

    async def _status(self, rid: str | None) -> list[Effect]:
        assert self.session is not None
        status = await self.front.store.status(self.player_id, self.session.game_mode or "")
        p = status.player
        return self.session.status(
            p.state, p.mode, p.queued_at_ms, status.queue_size, status.now_ms, rid
        )

    async def _reconcile(self, attempts: int = 120, interval_s: float = 0.5) -> None:
        assert self.session is not None
        for _ in range(attempts):
            await asyncio.sleep(interval_s)
            try:
                status = await self.front.store.status(self.player_id, self.session.game_mode or "")
            except StoreError:
                continue
            if self.lost:
                return
            p = status.player
            self._apply(self.session.resync(p.state, p.mode, p.queued_at_ms))
            self.flush()
            return
