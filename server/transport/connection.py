"""One client connection: runs the session's effects against the store and the socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from server import metrics
from server.protocol import codec
from server.protocol.auth import Identity
from server.protocol.messages import Error as ErrorMessage
from server.protocol.session import (
    CLOSE_INTERNAL,
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
from server.store.matches import LoadingStore, ReadyResult
from server.store.players import PlayerStore


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


class ClientConnection:
    def __init__(
        self, ws: ServerConnection, identity: Identity, conn_id: str, session: Session,
        store: PlayerStore, loading: LoadingStore, events: MatchEvents, allocation_timeout_ms: int,
    ) -> None:
        self.ws = ws
        self.identity = identity
        self.conn_id = conn_id
        self.session = session
        self.store = store
        self.loading = loading
        self.events = events
        self.allocation_timeout_ms = allocation_timeout_ms
        self.attached = False  # set once Redis records this connection as the player's
        self._closing: asyncio.Task[None] | None = None
        self._reconciling: asyncio.Task[None] | None = None
        self.log = logging.LoggerAdapter(log, {"player": identity.player_id, "conn": conn_id})

    @property
    def player_id(self) -> str:
        return self.identity.player_id

    async def apply(self, effects: list[Effect]) -> None:
        """Carry out effects in order; results of requests feed back into the session."""
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            pending[:0] = await self._one(effect)

    async def _one(self, effect: Effect) -> list[Effect]:
        match effect:
            case Send(message=message):
                tag = message.__struct_config__.tag
                metrics.MESSAGES_OUT.labels(tag).inc()
                if isinstance(message, ErrorMessage):
                    metrics.ERRORS_SENT.labels(message.code).inc()
                    if message.code == "rate_limited":
                        metrics.RATE_LIMITED.labels("message").inc()
                await self.send_text(codec.encode(message))
            case Close(code=code, reason=reason):
                # In the background: the handler must keep reading (and dropping) frames, or
                # a flooded receive queue pauses reading and the closing handshake never ends.
                if self._closing is None:
                    self._closing = asyncio.create_task(self.ws.close(code, reason))
            case RunEnqueue(game_mode=mode, request_id=rid):
                return await self._guarded(rid, self._enqueue(mode, rid))
            case RunDequeue(request_id=rid):
                return await self._guarded(rid, self._dequeue(rid))
            case RunStatus(request_id=rid):
                return await self._guarded(rid, self._status(rid))
            case RunReady(loading_session_id=sid, game_mode=mode, request_id=rid):
                return await self._guarded(rid, self._ready(mode, sid, rid))
        return []

    async def send_text(self, text: str) -> None:
        # A closed socket is noticed by the handler, which cleans up.
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(text)

    async def _guarded(self, rid: str | None, request: object) -> list[Effect]:
        """Storage failures become PROTOCOL errors; the session undoes its optimistic phase.

        A timeout does not say whether Redis ran the script, so the outcome is read back from
        Redis once it answers again (``reconcile``) and the client is told what happened.
        """
        try:
            return await request  # type: ignore[no-any-return, misc]
        except StoreUnavailable as exc:
            self.log.warning("request failed, storage unavailable: %s", exc)
            if self._reconciling is None or self._reconciling.done():
                self._reconciling = asyncio.create_task(self._reconcile())
            return self.session.request_failed(
                "unavailable", _UNAVAILABLE_MSG, rid, exc.retry_after_ms
            )
        except StoreError:
            self.log.exception("request failed")
            return self.session.request_failed("internal_error", "internal error", rid)

    async def _enqueue(self, mode: str, rid: str | None) -> list[Effect]:
        rating = self.identity.rating(mode, self.session.modes[mode].default_rating)
        result = await self.store.enqueue(
            self.player_id, self.conn_id, mode, rating, self.identity.attrs
        )
        if result.outcome == "ok":
            self.log.debug("enqueued in %s at %d", mode, result.queued_at_ms)
            return self.session.enqueued(mode, result.queued_at_ms, rid)
        if result.outcome == "already" and result.current is not None:
            return self.session.enqueue_refused(result.current.state, result.current.mode, rid)
        if result.outcome == "blocked":
            self.events.enqueue_blocked(mode)
            return self.session.enqueue_blocked(result.retry_after_ms, rid)
        return self.session.replaced()

    async def _ready(self, mode: str, match_id: str, rid: str | None) -> list[Effect]:
        result = await self.loading.ready(
            mode, match_id, self.player_id, self.conn_id, self.allocation_timeout_ms,
            self.store.worker_id,
        )
        match result.outcome:
            case "allocating":
                self.events.all_ready(mode, match_id, result)
            case "replaced":
                return self.session.replaced()
            case "unknown" | "wrong_session":
                return self.session.ready_refused(rid)
        # "ready" and "final" have no answer: the match's outcome message follows (PROTOCOL 4).
        return []

    async def _dequeue(self, rid: str | None) -> list[Effect]:
        result = await self.store.dequeue(self.player_id, self.conn_id, self.session.game_mode or "")
        if result.outcome == "ok":
            return self.session.dequeued(result.mode, rid)
        if result.outcome == "replaced":
            return self.session.replaced()
        return self.session.dequeue_refused(result.outcome, rid)

    async def _status(self, rid: str | None) -> list[Effect]:
        status = await self.store.status(self.player_id, self.session.game_mode or "")
        p = status.player
        return self.session.status(
            p.state, p.mode, p.queued_at_ms, status.queue_size, status.now_ms, rid
        )

    async def fail(self) -> None:
        await self.ws.close(CLOSE_INTERNAL, "internal error")

    async def _reconcile(self, attempts: int = 120, interval_s: float = 0.5) -> None:
        for _ in range(attempts):
            await asyncio.sleep(interval_s)
            try:
                status = await self.store.status(self.player_id, self.session.game_mode or "")
            except StoreError:
                continue
            p = status.player
            await self.apply(self.session.resync(p.state, p.mode, p.queued_at_ms))
            return

    async def closed(self) -> None:
        """Wait for a close this connection started (after its socket has ended)."""
        if self._reconciling is not None:
            self._reconciling.cancel()
        if self._closing is not None:
            with contextlib.suppress(Exception):
                await self._closing
