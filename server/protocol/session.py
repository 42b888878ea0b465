"""Per-connection state machine (DESIGN requirement 3), sans I/O.

The transport feeds it decoded input and the results of the requests it asked for; it answers
with effects (messages to send, requests to run, a close). The phase changes *before* the
transport awaits anything, so two fast ``enqueue`` frames can never both reach Redis.

    idle --enqueue--> enqueuing --ok--> queued --dequeue--> dequeuing --ok--> idle
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, get_args

from server.config import ModeConfig
from server.protocol import codec, notices
from server.protocol.messages import (
    PROTOCOL_VERSION,
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
    RequeueReason,
    ServerMessage,
    StartLoading,
    StateName,
    Status,
    Welcome,
)
from server.protocol.ratelimit import TokenBucket
from server.protocol.results import (
    DequeueResult,
    EnqueueResult,
    Failed,
    MatchView,
    PlayerState,
    ReadyResult,
    Result,
    StatusResult,
)

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_RATE_LIMITED: Final = 4008
CLOSE_REPLACED: Final = 4009


_REQUEUE_REASONS: Final = frozenset(get_args(RequeueReason))


class Phase(StrEnum):
    CONNECTING = "connecting"  # until the welcome is sent
    IDLE = "idle"
    ENQUEUING = "enqueuing"
    QUEUED = "queued"
    DEQUEUING = "dequeuing"
    LOADING = "loading"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Send:
    message: ServerMessage


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class RunEnqueue:
    game_mode: str
    request_id: str | None


@dataclass(frozen=True, slots=True)
class RunDequeue:
    request_id: str | None


@dataclass(frozen=True, slots=True)
class RunStatus:
    request_id: str | None


@dataclass(frozen=True, slots=True)
class RunReady:
    loading_session_id: str
    game_mode: str
    request_id: str | None


Request = RunEnqueue | RunDequeue | RunStatus | RunReady
Effect = Send | Close | Request

# What the client sees of each internal phase (PROTOCOL 3 `state`).
_VISIBLE: Final[dict[Phase, StateName]] = {
    Phase.CONNECTING: "idle", Phase.IDLE: "idle", Phase.ENQUEUING: "idle", Phase.QUEUED: "queued",
    Phase.DEQUEUING: "queued", Phase.LOADING: "loading", Phase.CLOSED: "idle",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """PROTOCOL 5 budgets of one connection."""

    bad_messages: int
    message_rate: float
    message_burst: float
    rate_strikes: int


class Session:
    def __init__(
        self, player_id: str, modes: Mapping[str, ModeConfig], limits: Limits, now: float = 0.0
    ) -> None:
        self.player_id = player_id
        self.modes = modes
        self.phase = Phase.CONNECTING
        self.last_type = ""  # type of the last frame received ("invalid", "rate_limited")
        self._bucket = TokenBucket(limits.message_rate, limits.message_burst, now)
        self._strikes_left = limits.rate_strikes
        self.game_mode: str | None = None
        self.queued_at_ms = 0
        self.loading_session_id: str | None = None
        self.delivered = 0  # server messages followed
        self.answered = 0  # requests answered (``complete``)
        self._awaiting = False  # a request of ours is in flight: server messages wait for it
        # An enqueue or dequeue that timed out may have run: server messages wait for Redis'
        # answer read back (``resync``), so that e.g. a start_loading follows its `enqueued`.
        self._unsettled = False
        self._dequeued_mode: str | None = None  # left by a dequeue of ours, not queued since
        # Server messages that arrive while one of our requests is in flight wait for its
        # reply: a match notice may overtake the `enqueued` it follows (DESIGN requirement 3).
        self._held: list[ServerMessage] = []
        self._bad_left = limits.bad_messages

    # -- connection lifecycle ---------------------------------------------------------------

    def welcome(
        self, state: StateName, game_mode: str, queued_at_ms: int, loading_session_id: str = ""
    ) -> list[Effect]:
        """First message on every connection; shows state resumed from Redis (PROTOCOL 3)."""
        self.phase = Phase(state)
        self.game_mode = game_mode or None
        # Kept through a ready check too (the record keeps it): a requeue this session has to
        # make up (``_out_of_step``) must carry the player's original place, not 0.
        self.queued_at_ms = queued_at_ms if state in ("queued", "loading") else 0
        self.loading_session_id = loading_session_id if state == "loading" else None
        return [Send(Welcome(
            player_id=self.player_id, state=state, game_mode=self.game_mode,
            loading_session_id=self.loading_session_id,
            queued_at_ms=self.queued_at_ms if state == "queued" and self.queued_at_ms else None,
            protocol=PROTOCOL_VERSION,
        )), *self._release()]

    def replaced(self) -> list[Effect]:
        """Another connection of this player won (PROTOCOL 1): close 4009, touch nothing."""
        return self.close(CLOSE_REPLACED, "session_replaced")

    def close(self, code: int, reason: str) -> list[Effect]:
        if self.phase is Phase.CLOSED:
            return []
        self.phase = Phase.CLOSED
        return [Close(code, reason)]

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def visible_state(self) -> StateName:
        return _VISIBLE[self.phase]

    # -- client input -------------------------------------------------------------------------

    def receive(self, frame: str | bytes, now: float = 0.0) -> list[Effect]:
        """One client frame at time ``now`` (seconds, any monotonic origin)."""
        if self.closed:
            return []
        if not self._bucket.take(now):
            # PROTOCOL 5 floods: refused, not processed; past the strikes, close 4008.
            self.last_type = "rate_limited"
            self._strikes_left -= 1
            effects = self._error("rate_limited", "too many messages; slow down",
                                  retry_after_ms=self._bucket.retry_after_ms())
            if self._strikes_left < 0:
                effects += self.close(CLOSE_RATE_LIMITED, "rate limited")
            return effects
        try:
            message = codec.decode(frame)
        except codec.BadMessage as exc:
            self.last_type = "invalid"
            return self._bad_input(str(exc))
        self.last_type = message.__struct_config__.tag  # type: ignore[assignment]
        effects = self._dispatch(message)
        if effects and not isinstance(effects[-1], Send | Close):
            self._awaiting = True  # a request: what the server says meanwhile follows its answer
        return effects

    def _dispatch(self, message: ClientMessage) -> list[Effect]:
        match message:
            case Enqueue(game_mode=mode, request_id=rid):
                return self._on_enqueue(mode, rid)
            case Dequeue(request_id=rid):
                return self._on_dequeue(rid)
            case Status(request_id=rid):
                return [RunStatus(rid)]
            case LoadingComplete(loading_session_id=sid, request_id=rid):
                return self._on_loading_complete(sid, rid)
        return self._bad_input("unhandled message")  # pragma: no cover - the union is closed

    def _on_dequeue(self, rid: str | None) -> list[Effect]:
        if self.phase is Phase.QUEUED:
            self.phase = Phase.DEQUEUING
            return [RunDequeue(rid)]
        if self.phase is Phase.LOADING:
            return self._error("invalid_state", "a match is loading; it cannot be left", rid)
        return self._error("not_in_queue", "not in a queue", rid)

    def _on_loading_complete(self, sid: str, rid: str | None) -> list[Effect]:
        if self.phase is not Phase.LOADING or self.game_mode is None:
            return self._error("invalid_state", "no loading session is in progress", rid)
        if sid != self.loading_session_id:
            current = self.loading_session_id or "not known yet (its start_loading is on its way)"
            return self._error("wrong_session_id", f"loading session is {current}", rid)
        return [RunReady(sid, self.game_mode, rid)]

    def _on_enqueue(self, mode: str, rid: str | None) -> list[Effect]:
        if mode not in self.modes:
            known = ", ".join(sorted(self.modes))
            return self._error("unsupported_game_mode", f"unknown game_mode {mode!r}; one of: {known}", rid)
        if self.phase is not Phase.IDLE:
            where = f" for {self.game_mode}" if self.game_mode else ""
            return self._error("already_in_queue", f"already {self.visible_state}{where}", rid)
        self.phase = Phase.ENQUEUING
        self._dequeued_mode = None
        self.game_mode = mode
        return [RunEnqueue(mode, rid)]

    def _bad_input(self, why: str) -> list[Effect]:
        self._bad_left -= 1
        effects = self._error("invalid_message", why)
        if self._bad_left < 0:
            effects += self.close(CLOSE_POLICY, "too many invalid messages")
        return effects

    # -- results of requests the transport ran --------------------------------------------------

    def complete(self, request: Request, result: Result) -> list[Effect]:
        """The outcome of a request this session asked for, as storage reported it. Held
        server messages follow the answer (a match notice never overtakes its `enqueued`)."""
        rid = request.request_id
        self._awaiting = False
        self.answered += 1
        if isinstance(request, RunEnqueue | RunDequeue):
            # Only an answer from Redis settles the player's queue state; a request that did not
            # run (refused, not sent) leaves an earlier unknown outcome unknown.
            if not isinstance(result, Failed):
                self._unsettled = False
            elif result.unsettled and self.phase in (Phase.ENQUEUING, Phase.DEQUEUING):
                self._unsettled = True
        if isinstance(result, Failed):
            effects = self._failed(result, rid)
        elif isinstance(request, RunEnqueue) and isinstance(result, EnqueueResult):
            effects = self._enqueue_done(request.game_mode, result, rid)
        elif isinstance(request, RunDequeue) and isinstance(result, DequeueResult):
            effects = self._dequeue_done(result, rid)
        elif isinstance(request, RunReady) and isinstance(result, ReadyResult):
            effects = self._ready_done(result, rid, request.loading_session_id)
        elif isinstance(request, RunStatus) and isinstance(result, StatusResult):
            effects = self._status(result, rid)
        else:
            raise TypeError(f"{type(result).__name__} does not answer {type(request).__name__}")
        return [*effects, *self._release()]

    def _enqueue_done(self, mode: str, result: EnqueueResult, rid: str | None) -> list[Effect]:
        match result.outcome:
            case "ok":
                if self.phase is not Phase.ENQUEUING:
                    return []
                self.phase, self.game_mode, self.queued_at_ms = Phase.QUEUED, mode, result.queued_at_ms
                return [Send(Enqueued(game_mode=mode, queued_at_ms=result.queued_at_ms, request_id=rid))]
            case "already" if result.current is not None:
                # Already queued or loading, e.g. from another connection: trust Redis, with
                # the ticket's place (a requeue made up later carries it). Which ready check it
                # is stays unknown here: its start_loading, held or on its way, tells the client.
                current = result.current
                self.phase, self.game_mode = Phase(current.state), current.mode or None
                self.queued_at_ms = current.queued_at_ms
                self.loading_session_id = None
                return self._error("already_in_queue", f"already {current.state} for {current.mode}", rid)
            case "blocked":  # too many dodged ready checks recently (PROTOCOL 3 `player_blocked`)
                self.phase, self.game_mode = Phase.IDLE, None
                return self._error("player_blocked", "too many left or missed ready checks recently",
                                   rid, result.retry_after_ms)
        return self.replaced()

    def _dequeue_done(self, result: DequeueResult, rid: str | None) -> list[Effect]:
        match result.outcome:
            case "ok":
                self.phase, self.game_mode, self.queued_at_ms = Phase.IDLE, None, 0
                self._left_queue(result.mode)
                return [Send(Dequeued(game_mode=result.mode, reason="requested", request_id=rid))]
            case "not_in_queue":  # Redis disagrees with our view: trust Redis, tell the client
                mode = self.game_mode
                if mode and not self._held_ends_the_ticket():
                    # Idle, and no held ending explains it: an earlier dequeue of ours ran (its
                    # answer was lost), so a ready check held since came before it.
                    self._left_queue(mode)
                self.phase, self.game_mode, self.queued_at_ms = Phase.IDLE, None, 0
                return self._error("not_in_queue", "not in a queue", rid)
            case "invalid_state":  # loading in Redis: the start_loading is held or on its way
                self.phase = Phase.QUEUED
                return self._error("invalid_state", "a match is loading; it cannot be left", rid)
        return self.replaced()

    def _ready_done(self, result: ReadyResult, rid: str | None, sid: str) -> list[Effect]:
        match result.outcome:
            case "replaced":
                return self.replaced()
            case "unknown" if sid == self.loading_session_id:
                # Our own ready check, whose record has expired since it ended: its outcome
                # message is on its way (or comes with a catch-up), like a `final` answer.
                return []
            case "unknown" | "wrong_session":
                return self._error("wrong_session_id", "not a player of that loading session", rid)
        # Recorded, or the match already ended: no answer, its outcome message follows
        # (PROTOCOL 4 has no acknowledgement of loading_complete).
        return []

    def _failed(self, result: Failed, rid: str | None) -> list[Effect]:
        """The request did not happen (e.g. storage unavailable): undo the optimistic phase."""
        if self.phase is Phase.ENQUEUING:
            self.phase, self.game_mode = Phase.IDLE, None
        elif self.phase is Phase.DEQUEUING:
            self.phase = Phase.QUEUED
        return self._error(result.code, result.message, rid, result.retry_after_ms)

    def _status(self, result: StatusResult, rid: str | None) -> list[Effect]:
        p = result.player
        mode = self.modes.get(p.mode) if p.mode else None
        queued = p.state == "queued"
        waited = max(result.now_ms - p.queued_at_ms, 0) if queued and p.queued_at_ms else 0
        window = mode.window(waited) if mode is not None and queued else 0.0
        return [Send(QueueStatus(
            state=p.state, waited_ms=waited, queue_size=result.queue_size, search_window=window,
            game_mode=p.mode or None, request_id=rid,
            # Both holds (nobody listens; the back-off after failed handoffs) wait for the same.
            waiting_for="game_server" if queued and result.waiting_for else None,
        ))]

    def deliver(self, message: ServerMessage) -> list[Effect]:
        """A server-initiated message (from the matchmaker, via this worker): follow it, send it."""
        if self.closed:
            return []
        if self._awaiting or self._unsettled or self.phase in (
                Phase.CONNECTING, Phase.ENQUEUING, Phase.DEQUEUING):
            # PROTOCOL 2: nothing the server says overtakes the answer to a request in flight
            # (a `start_loading` before the `queue_status` that still says queued).
            self._held.append(message)
            return []
        out_of_step = self._out_of_step(message)
        if out_of_step is not None:
            return out_of_step
        self.delivered += 1
        match message:
            case StartLoading(loading_session_id=sid, game_mode=mode):
                self.phase, self.game_mode, self.loading_session_id = Phase.LOADING, mode, sid
            case Requeued(game_mode=mode, queued_at_ms=queued_at):
                self.phase, self.game_mode, self.queued_at_ms = Phase.QUEUED, mode, queued_at
                self.loading_session_id = None
            case Dequeued(reason="removed") | MatchFound() | Error(code="loading_timeout"):
                self.phase, self.game_mode, self.queued_at_ms = Phase.IDLE, None, 0
                self.loading_session_id = None
        return [Send(message)]

    def _left_queue(self, mode: str) -> None:
        """A dequeue of ours ran in Redis: a ready check held meanwhile (its start_loading, its
        requeue) came before it and is over, and so is one still on its way. Replayed after
        `dequeued`, they would leave the session queued with Redis idle."""
        self._held = [m for m in self._held if not isinstance(m, StartLoading | Requeued)]
        self._dequeued_mode = mode

    def _held_ends_the_ticket(self) -> bool:
        """Does a held message end the player's ticket (a match found, a ready check timed out,
        a removal)? Then that, not a dequeue of ours, is why Redis has the player idle."""
        return any(isinstance(m, MatchFound | Dequeued)
                   or (isinstance(m, Error) and m.code == "loading_timeout") for m in self._held)

    def _out_of_step(self, message: ServerMessage) -> list[Effect] | None:
        """What to do instead with a notice out of step with this session (None: in step). One
        that says again what the player knows (it raced the catch-up after a resync, or a
        removal came after the player left the queue itself) is dropped; one that follows an
        ending the session never heard (published while its worker was deaf) is preceded or
        replaced by what the client must know first."""
        match message:
            case StartLoading(loading_session_id=sid, game_mode=mode) if (
                    sid == self.loading_session_id
                    or (self.phase is Phase.IDLE and mode == self._dequeued_mode)):
                # Known already, or from before a dequeue of ours ran (the dequeue's answer
                # overtook the notice).
                return []
            case StartLoading() if self.phase is Phase.LOADING and self.game_mode \
                    and self.loading_session_id:
                # The last ready check's ending went unheard: requeued (by no fault of the
                # player's) before the next one.
                requeued = Requeued(game_mode=self.game_mode, reason="server_shutdown",
                                    queued_at_ms=self.queued_at_ms)
                return [*self.deliver(requeued), *self.deliver(message)]
            case Requeued() if self.phase is not Phase.LOADING:
                return []  # from a ready check this session never heard of, or told already
            case Error(code="loading_timeout") if self.phase is Phase.QUEUED and self.game_mode:
                return self.removed(self.game_mode)  # out, for a ready check it never heard of
            case Dequeued(reason="removed") | MatchFound() | Error(code="loading_timeout") \
                    if self.phase is Phase.IDLE:
                return []
        return None

    def _release(self) -> list[Effect]:
        held, self._held = self._held, []
        return [effect for message in held for effect in self.deliver(message)]

    def resync(self, state: StateName, game_mode: str, queued_at_ms: int) -> list[Effect]:
        """After a request whose outcome was lost (a timeout after Redis ran it), Redis' view
        is read back: correct ours and tell the client what really happened."""
        if self.closed or self.phase in (Phase.ENQUEUING, Phase.DEQUEUING):
            return []  # a request in flight settles it (and releases what is held)
        told: list[Effect] = []
        if state in ("queued", "loading") and self.phase is Phase.IDLE:
            # The enqueue ran. Loading already: the `enqueued` still comes first, then the
            # held start_loading (released below) moves the session on.
            self.phase, self.game_mode, self.queued_at_ms = Phase.QUEUED, game_mode, queued_at_ms
            told = [Send(Enqueued(game_mode=game_mode, queued_at_ms=queued_at_ms))]
        elif state == "idle" and self.phase is Phase.QUEUED and self.game_mode \
                and not self._held_ends_the_ticket():
            # The dequeue ran (a held ready check that ended the ticket would explain the idle
            # state instead: then the held messages, released below, tell what happened).
            mode = self.game_mode
            self.phase, self.game_mode, self.queued_at_ms = Phase.IDLE, None, 0
            told = [Send(Dequeued(game_mode=mode, reason="requested"))]
            self._left_queue(mode)  # what is held predates it
        self._unsettled = False
        return [*told, *self._release()]

    @property
    def version(self) -> int:
        """Moves with every notice followed and request answered: a read of Redis taken before
        it moved is stale (it must not undo what the session learned meanwhile)."""
        return self.delivered + self.answered

    @property
    def busy(self) -> bool:
        return self.phase in (Phase.ENQUEUING, Phase.DEQUEUING)

    def behind(self, redis: PlayerState) -> bool:
        """Does Redis show a change this session was not told of (a notice published while
        the worker's delivery subscriber was down)? Requests in flight settle themselves."""
        if self.closed or self.phase not in (Phase.IDLE, Phase.QUEUED, Phase.LOADING):
            return False
        if self.phase is Phase.LOADING:
            return redis.state != "loading" or redis.match_id != self.loading_session_id
        if self.phase is Phase.IDLE:  # queued in Redis: a dequeue whose write was lost
            return redis.state != "idle"
        return redis.state != "queued"  # queued here: loading or idle in Redis

    def caught_up(self, redis: PlayerState, views: Mapping[str, MatchView]) -> list[Effect]:
        """What the player missed, rebuilt from Redis (the player's record and the records of
        the loading sessions involved, ``views``), delivered in the order it happened: the end
        of the ready check it was in, then the one it is in now (DESIGN "Routing and
        delivery": a message lost while a worker was deaf must be recoverable)."""
        if not self.behind(redis):
            return []
        missed: list[ServerMessage] = []
        told: list[Effect] = []
        now = redis.match_id if redis.state == "loading" else ""
        if self.phase is Phase.LOADING and self.loading_session_id and self.game_mode:
            missed.append(_ending(self.game_mode, views.get(self.loading_session_id), redis))
        elif self.phase is Phase.QUEUED and redis.state == "idle" and self.game_mode:
            missed.append(Dequeued(game_mode=self.game_mode, reason="removed"))
        elif self.phase is Phase.IDLE and redis.state in ("queued", "loading"):
            # A late `enqueued` first (queued now, so a ready check it is in follows in step).
            told = self.resync(redis.state, redis.mode, redis.queued_at_ms)
            if redis.state == "queued":
                return told
        current = views.get(now) if now else None
        if current is not None and current.status == "loading":
            missed.append(StartLoading(loading_session_id=now, game_mode=current.mode,
                                       teams=current.teams, deadline_ms=current.deadline_ms))
        return [*told, *(effect for message in missed for effect in self.deliver(message))]

    def missed_match(self, view: MatchView) -> list[Effect]:
        """Right after the welcome: the player was matched while no connection held it (it
        dropped as the game server answered, and reconnected within the grace). Its
        `match_found`, composed as the live notice would have been."""
        if self.phase is not Phase.IDLE or view.status != "assigned":
            return []
        return [Send(_ending(view.mode, view, PlayerState("idle")))]

    def ticket_lost(self) -> list[Effect]:
        """Redis lost the player's record: a ticket the player holds (queued, or in a ready
        check) is gone. A request in flight learns it from its own answer instead."""
        if self.closed or self.phase not in (Phase.QUEUED, Phase.LOADING) or not self.game_mode:
            return []
        return self.removed(self.game_mode)

    def removed(self, game_mode: str) -> list[Effect]:
        """The player's ticket was removed by the server (e.g. poison, PROTOCOL 3 `dequeued`)."""
        self.phase, self.game_mode, self.queued_at_ms = Phase.IDLE, None, 0
        self.loading_session_id = None
        return [Send(Dequeued(game_mode=game_mode, reason="removed"))]

    def _error(
        self, code: str, message: str, request_id: str | None = None,
        retry_after_ms: int | None = None,
    ) -> list[Effect]:
        return [Send(Error(code=code, message=message, request_id=request_id,
                           retry_after_ms=retry_after_ms))]


def _ending(mode: str, ended: MatchView | None, redis: PlayerState) -> ServerMessage:
    """How the ready check a player missed the end of ended for it, as its record shows; its
    loading session record gone (its finished TTL passed), Redis' state of the player says
    requeued or removed. Composed by ``notices.ending``, as the live notice would have been."""
    status = ended.status if ended is not None else ""
    # Its record gone too (Redis lost it): not the player's doing, the server's.
    reason = ended.reason if ended is not None and ended.reason in _REQUEUE_REASONS else "server_shutdown"
    if redis.state != "idle":  # back in the queue (and maybe in a new ready check already)
        what = "requeued"
    else:
        what = {"assigned": "matched", "timed_out": "timed_out"}.get(status, "removed")
    notice = notices.Ended(
        mode=mode, match=ended.match_id if ended is not None else "", status=status,
        reason=reason, to=[], server=ended.server_address if ended is not None else "",
        session=ended.server_session_id if ended is not None else "",
        teams=ended.teams if ended is not None else [])
    return notices.ending(notice, what, redis.queued_at_ms)
