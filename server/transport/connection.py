"""One client connection: the WebSocket, its session, and the requests the session asks for."""

from __future__ import annotations

import http
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response
from websockets.protocol import State

from server import metrics
from server.aio import raise_if_cancelling
from server.logthrottle import Throttled
from server.protocol import codec
from server.protocol.auth import Identity
from server.protocol.messages import Error as ErrorMessage
from server.protocol.messages import ServerMessage
from server.protocol.results import (
    DequeueResult,
    EnqueueResult,
    Failed,
    MatchView,
    PlayerState,
    ReadyResult,
    Result,
)
from server.protocol.session import (
    CLOSE_INTERNAL,
    CLOSE_RATE_LIMITED,
    Close,
    Effect,
    Request,
    RunDequeue,
    RunEnqueue,
    RunReady,
    RunStatus,
    Send,
    Session,
)
from server.store.errors import StoreError, StoreUnavailable
from server.transport.wsproto import WebSocketProtocol

if TYPE_CHECKING:
    from server.transport.frontend import FrontEnd


log = logging.getLogger(__name__)
_UNAVAILABLE_MSG: Final = "matchmaking storage is unavailable; retry later"
_RECORD_LOST_MSG: Final = "matchmaking storage lost this session's state; retry"
_RECORD_LOST_RETRY_MS: Final = 250  # the re-attach is one round trip
_failed = Throttled(log, "requests failed, storage unavailable")
# Redis answered with an error (e.g. OOM, a script error): the reply says it all, a traceback
# adds nothing, and every request of every client would repeat it.
_refused = Throttled(log, "requests failed, storage error", level=logging.ERROR)
# Any client with a valid token can reconnect in a loop; each reconnect replaces a connection.
# A Redis restart without its data loses every record at once: one line per interval.
_record_lost = Throttled(log, "player records lost in Redis; re-attached as idle")
_replaced = Throttled(log, "sessions replaced by a newer connection", level=logging.INFO)
_crashed = Throttled(log, "connection handler failed", level=logging.ERROR)


class ClientConnection(WebSocketProtocol):
    def __init__(self, front: FrontEnd) -> None:
        super().__init__(front.ws_limits, front.loop)
        self.front = front
        self.services = front.services
        self.identity = Identity("")
        self.conn_id = ""
        self.session: Session | None = None
        self.attached = False  # set once Redis records this connection as the player's
        self._upgrade: Response | None = None  # the 101, sent together with the welcome
        self._attaching = False
        # A close the session decided before the 101 went out (replaced, or the worker began
        # draining, while the attach ran): sent after the 101 instead of the welcome.
        self._early_close: tuple[int, str] | None = None

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

    def handle_request(self, request: HttpRequest) -> None:
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
        self.session = Session(self.identity.player_id, self.services.modes, self.front.limits, now)
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
        """Attach, then welcome. The open timeout does not run while this does, so a bug in
        it must not leave the handshake hanging with the client waiting: the connection is
        aborted, and a record the attach took is released as any ended connection's is."""
        try:
            await self._attach_and_welcome()
        except Exception:
            raise_if_cancelling()
            _crashed("attaching player %s", self.identity.player_id, exc_info=True)
            if not self.attached:
                # Released whether or not the attach returned: a bug inside it may come after
                # Redis took the record. A release the record does not name changes nothing.
                self.front.release(self.identity.player_id, self.conn_id)
            if self.transport is not None and not self.lost:
                self.transport.abort()  # its connection_lost releases an attached record

    async def _attach_and_welcome(self) -> None:
        front = self.front
        try:
            result = await self.services.store.attach(self.identity.player_id, self.conn_id)
        except StoreError as exc:
            if not isinstance(exc, StoreUnavailable):
                # Redis answered, so the attach ran, but its reply could not be used (a player
                # state this server does not know, written by a newer one in a rolling deploy):
                # the record names this connection, which will never be welcomed. Released now.
                front.release(self.identity.player_id, self.conn_id)
            elif exc.maybe_ran:
                # Redis may have recorded this connection as the player's after all; nothing
                # else would ever release that record (issue 13): settle it once Redis answers.
                front.pending_detach.add((self.identity.player_id, self.conn_id))
            self._attach_failed(exc)
            return
        finally:
            self._attaching = False
            front.handshake_ended()
        player = self.identity.player_id
        if self.lost or front.draining:
            # Gone while attaching, or the worker started draining: never welcomed, so the
            # client sees a close or an immediate 503 to retry elsewhere (a drain that begins
            # after this check, during replace_previous, gets the 101 and then 1001).
            if not self.lost:
                self.respond(front.refusal(self, 503, "shutting down"))
            if result.previous_worker != front.worker_id:
                # The attach took the record from a connection on another worker: it hears the
                # 4009 this one would have caused, rather than stay open and untold.
                await front.replace_previous(player, result, self.conn_id)
            # Released as any ended connection is: an older open one here takes the record
            # back (it never learns of this one), else the player goes into resume grace.
            front.release(player, self.conn_id)
            return
        self.attached = True
        await front.replace_previous(player, result, self.conn_id)
        missed, readable = await self._missed_match(result.found) if result.found else (None, False)
        assert self.session is not None and self._upgrade is not None
        self.respond(self._upgrade, flush=False)
        self.release()
        if self._early_close is not None:
            # Replaced by a newer connection (4009) or the worker began draining (1001)
            # while this one attached: the client hears that close, never a welcome.
            self.close_with(*self._early_close)
            self.flush()
            return
        p = result.player
        self._apply(self.session.welcome(p.state, p.mode, p.queued_at_ms, p.match_id))
        if missed is not None:
            self._apply(self.session.missed_match(missed))
        self.drain()
        self.flush()
        if result.found and readable and not self.lost:  # told now, or its record is gone
            front.spawn(self._found_told(result.found[1]))

    async def _missed_match(self, found: tuple[str, str]) -> tuple[MatchView | None, bool]:
        """The record of the match this player was assigned to while no connection held it,
        read before the welcome so that nothing the client sends overtakes its `match_found`,
        and whether Redis answered (the record may have expired: nothing to tell). Unread
        (storage failing), the player's record keeps it for a later connection."""
        mode, match_id = found
        try:
            return (await self.services.loading.views([(mode, match_id)])).get(match_id), True
        except StoreError as exc:
            _failed("reading the match %s found while disconnected: %s (player %s)",
                    match_id, exc, self.identity.player_id)
            return None, False

    async def _found_told(self, match_id: str) -> None:
        try:
            await self.services.store.found_told(self.identity.player_id, match_id)
        except StoreError as exc:  # a later connection may hear it again: no worse than twice
            _failed("forgetting the match %s told: %s (player %s)",
                    match_id, exc, self.identity.player_id)

    def _attach_failed(self, exc: StoreError) -> None:
        if self.lost or self._upgrade is None:
            return
        retry = exc.retry_after_ms if isinstance(exc, StoreUnavailable) else None
        code = "unavailable" if isinstance(exc, StoreUnavailable) else "internal_error"
        self.front.refused_handshake(exc)
        self.respond(self._upgrade, flush=False)
        message = _UNAVAILABLE_MSG if code == "unavailable" else "the server could not attach this connection"
        self._send(ErrorMessage(code=code, message=message, retry_after_ms=retry))
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

    @property
    def open(self) -> bool:
        """Welcomed (attached) and not closing: a connection Redis should know."""
        return (self.attached and not self.lost and self.session is not None
                and not self.session.closed)

    def reject(self, status: int, text: str) -> Response:
        """An HTTP answer instead of the upgrade (websockets builds it)."""
        return self.ws.reject(http.HTTPStatus(status), f"{text}\n")

    async def record_lost(self, gone_conn: str = "") -> None:
        """A request or the resync found this connection's record gone: Redis lost it (a restart
        without persistence), or lost this connection's attach and the record names (or was
        released by) an ended connection of this worker. Attach again; a player who was queued
        or loading when the record itself was lost is told its ticket is gone (DESIGN invariant
        5). If another connection wrote a record since, this one was replaced: 4009. A storage
        failure is raised (the resync that called it runs again)."""
        await self.take_back(gone_conn)

    async def take_back(self, gone_conn: str, mode_guess: str = "") -> bool:
        """Attach again over a record naming ``gone_conn``, an ended connection of this worker
        (or over no record): its attach was lost. Any other record means this connection was
        replaced: 4009. False when this connection is not open (it ended or is closing: the
        caller detaches ``gone_conn`` instead). ``mode_guess``: the record's mode, if known
        (one round trip when right). A storage failure is raised."""
        session = self.session
        if session is None or not self.open:
            return False
        player = self.identity.player_id
        attached = await self.services.store.reattach(player, self.conn_id, gone_conn, mode_guess)
        if self.lost:
            if attached is not None:  # ended meanwhile: release what was just written
                await self.front.detach(player, self.conn_id)
            return True
        if attached is None:
            self.replaced()
        elif not attached.previous_conn and attached.player.state == "idle":
            # There was no record: whatever ticket the player had is gone. (A record taken back
            # from a connection that ended was not lost, and is not logged as lost.)
            _record_lost("player %s, connection %s", player, self.conn_id)
            self._apply(session.ticket_lost())
            self.flush()
        elif attached.previous_conn:
            # Taken over from the ended connection, or from this one's own record released
            # meanwhile (a reaper took this worker for dead during a stall): what was
            # published meanwhile (a ready check begun or ended) never reached this one.
            await self.front.catch_up_with(self)
        return True

    async def _record_lost_answered(self) -> None:
        """record_lost after a request found the record gone: the client has been answered
        `unavailable` and will ask again (and be answered `gone` again while this fails)."""
        try:
            await self.record_lost()
        except StoreError as exc:
            _failed("re-attach after a lost record: %s (player %s)", exc, self.identity.player_id)

    def replaced(self) -> None:
        """Another connection of this player won (PROTOCOL 1): close 4009."""
        if self.session is not None and not self.lost:
            _replaced("player %s, connection %s", self.identity.player_id, self.conn_id)
            self._apply(self.session.replaced())
            self.flush()

    def shut_down(self) -> None:
        """The worker is draining: 1001, the client reconnects elsewhere (PROTOCOL 6). One
        still attaching is refused with 503 when its attach returns (``_attach``)."""
        if self.session is not None and self.attached and not self.lost:
            self._apply(self.session.close(1001, "server shutting down"))
            self.flush()

    def handle_lost(self) -> None:
        self.front.unregister(self)
        if self.attached:
            mode = self.session.game_mode if self.session is not None else None
            self.front.release(self.identity.player_id, self.conn_id, mode or "")

    # -- effects --------------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out effects in order. A request holds the connection; the effects after it
        and the messages that arrive meanwhile wait for its result."""
        for i, effect in enumerate(effects):
            if type(effect) is Send:
                self._send(effect.message)
            elif type(effect) is Close:
                if self.ws.state is State.CONNECTING:
                    self._early_close = (effect.code, effect.reason)  # after the 101 (_attach)
                else:
                    self.close_with(effect.code, effect.reason)
            else:
                self.hold()
                self.front.spawn(self._request(effect, effects[i + 1:]))  # type: ignore[arg-type]
                return

    def _send(self, message: ServerMessage) -> None:
        tag: str = message.__struct_config__.tag  # type: ignore[assignment]
        metrics.inc(metrics.MESSAGES_OUT, tag)
        if type(message) is ErrorMessage:
            metrics.inc(metrics.ERRORS_SENT, message.code)
        self.send_message(codec.encode(message))

    async def _request(self, request: Request, rest: list[Effect]) -> None:
        result = await self._run(request)
        if not self.lost and self.session is not None:
            self.release()
            self._apply([*self.session.complete(request, result), *rest])  # may hold again
            self.drain()
            self.flush()

    async def _run(self, request: Request) -> Result:
        """Run one request in storage; failures become results too (the session undoes its
        optimistic phase). A timeout does not say whether Redis ran the script, so that
        outcome is read back once Redis answers (``FrontEnd.reconcile``)."""
        try:
            result = await self._call(request)
        except StoreUnavailable as exc:
            _failed("%s (player %s)", exc, self.identity.player_id)
            if exc.maybe_ran:
                self.front.reconcile(self)
            return Failed("unavailable", _UNAVAILABLE_MSG, exc.retry_after_ms, unsettled=exc.maybe_ran)
        except StoreError as exc:
            _refused("%s (player %s)", exc, self.identity.player_id)
            return Failed("internal_error", "internal error")
        if isinstance(result, EnqueueResult | DequeueResult | ReadyResult) and result.outcome == "gone":
            # Redis lost the record (a restart without its data) or a sweep released it while
            # this connection lives: not a newer connection's doing (no 4009). The request did
            # not happen; the re-attach after this answer tells a queued or loading player
            # that its ticket is gone, and the client may ask again.
            self.front.spawn(self._record_lost_answered())
            return Failed("unavailable", _RECORD_LOST_MSG, _RECORD_LOST_RETRY_MS)
        return result

    async def _call(self, request: Request) -> Result:
        services, player, conn = self.services, self.identity.player_id, self.conn_id
        mode = (self.session.game_mode if self.session is not None else None) or ""
        match request:
            case RunEnqueue(game_mode=mode):
                rating = self.identity.rating(mode, services.modes[mode].default_rating)
                enqueued = await services.store.enqueue(player, conn, mode, rating, self.identity.attrs)
                if enqueued.outcome == "blocked":
                    services.events.enqueue_blocked(mode)
                return enqueued
            case RunDequeue():
                return await services.store.dequeue(player, conn, mode)
            case RunStatus():
                return await services.store.status(player, mode)
            case RunReady(loading_session_id=match_id, game_mode=mode):
                ready = await services.loading.ready(mode, match_id, player, conn,
                                                     services.allocation_timeout_ms, services.worker_id)
                if ready.outcome == "allocating":  # the last one: hand the match to a game server
                    services.events.all_ready(mode, match_id, ready)
                return ready
        raise TypeError(f"not a request: {request!r}")

    @property
    def version(self) -> int:
        return self.session.version if self.session is not None else 0

    @property
    def busy(self) -> bool:
        """A request of this connection is in flight (its answer settles the state)."""
        return self.session is not None and self.session.busy

    def behind(self, state: PlayerState) -> bool:
        return self.session is not None and not self.lost and self.session.behind(state)

    def matches_involved(self, state: PlayerState) -> list[tuple[str, str]]:
        """(mode, match id) of the ready checks a catch-up must read: ours and Redis' now."""
        session = self.session
        refs = [(state.mode, state.match_id)] if state.state == "loading" else []
        if session is not None and session.loading_session_id and session.game_mode:
            refs.append((session.game_mode, session.loading_session_id))
        return refs

    def catch_up(self, state: PlayerState, views: Mapping[str, MatchView]) -> None:
        """Tell the player what was published while this worker could not hear (resync)."""
        if self.session is not None and not self.lost:
            was_in = self.session.loading_session_id
            self._apply(self.session.caught_up(state, views))
            self.flush()
            ended = views.get(was_in) if was_in else None
            if was_in and ended is not None and ended.status == "assigned":
                # Its match_found, which nobody heard, is also kept in the record for the
                # next connection (lua/finish_match.lua): told now (or held behind the
                # request in flight, told right after its answer), so forgotten.
                self.front.spawn(self._found_told(was_in))

    def reconcile(self, state: PlayerState) -> None:
        """Redis' view of the player after a request whose outcome was lost: correct ours
        and tell the client what really happened (a late `enqueued` or `dequeued`)."""
        if self.session is not None and not self.lost:
            self._apply(self.session.resync(state.state, state.mode, state.queued_at_ms))
            self.flush()
