"""One simulated player: a behaviour from the mix, played with fastmatch's own client.

Every player acts as a real client would when things go wrong (docs/protocol.md section 7): a
connection that ends without the player asking (1001, 1011, an abrupt end, a killed worker) is
resumed by the client with jittered backoff within the resume grace; a refused first connect is
retried the same way; a request refused with ``unavailable`` is sent again after
``retry_after_ms`` once it is clear it did not run; a player that wants a match queues again
when it learns its ticket is gone. What it heard is checked on the way (:mod:`checker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

import msgspec

from server.client import (
    Connecting,
    Dequeue,
    Dequeued,
    Enqueue,
    Enqueued,
    Error,
    FastmatchClientError,
    LoadingComplete,
    MatchFound,
    QueueStatus,
    ServerMessage,
    StartLoading,
    Status,
    Welcome,
    retry,
)
from server.sim.checker import SequenceChecker, SessionSeen
from server.sim.facts import Facts
from server.sim.simclient import ObservedClient
from server.sim.tokens import TokenMinter

BEHAVIOURS: Final = (
    "normal", "quit_before_match", "quit_during_loading", "slow_loader", "afk",
    "invalid", "double_enqueue", "drop_resume",
)
_AMBIGUOUS: Final = frozenset({"unavailable", "internal_error"})
_RETRY_MAX_S: Final = 5.0  # the longest a player waits before asking again
_SETTLE_S: Final = 3.0  # at the end: how long messages in flight get to arrive
_TRAIL: Final = 24  # messages kept to show what led to a violation


def parse_mix(text: str) -> dict[str, float]:
    """"normal=70,afk=5" -> weights; unknown names are an error naming them."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {name!r}; one of {', '.join(BEHAVIOURS)}")
        mix[name] = float(weight or 1)
    if not mix or sum(mix.values()) <= 0:
        raise ValueError("the behaviour mix is empty")
    return mix


@dataclass(frozen=True)
class SimSettings:
    url: str  # ws://host:port/ws
    secret: str
    mode: str = "1v1"
    lifetime_s: float = 30.0  # a player gives up after this
    slow_load_s: float = 1.0  # slow_loader's delay before loading_complete
    rating_mean: float = 1500.0
    rating_sd: float = 200.0
    redis_url: str = ""  # the server's Redis, to tell a legitimate outcome from a lost ticket
    resume_grace_s: float = 10.0  # the server's: the client resumes within it
    # Ready deadline + game server allocation + slack: a loading player has an outcome by then.
    outcome_bound_s: float = 25.0


@dataclass
class PlayerResult:
    """Compact: what the report and the cross-checks need, not the whole message log."""

    player: str
    behaviour: str
    arrived: float = 0.0  # wall-clock offsets are relative to the run's start
    t_enqueue: float | None = None
    t_start_loading: float | None = None
    t_match_found: float | None = None
    outcome: str = "unfinished"
    sent: int = 0
    received: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    sessions: list[SessionSeen] = field(default_factory=list)
    # (t, what): drops, refused attempts, resumes, removals, explained surprises (simclient.py)
    events: list[tuple[float, str]] = field(default_factory=list)
    trail: list[str] = field(default_factory=list)  # the last messages both ways, if it failed


class _Play:
    def __init__(self, settings: SimSettings, tokens: TokenMinter, player: str, behaviour: str,
                 rng: random.Random, t0: float, facts: Facts) -> None:
        self.s = settings
        self.tokens = tokens
        self.player = player
        self.behaviour = behaviour
        self.rng = rng
        self.t0 = t0
        self.facts = facts
        self.rating = round(rng.gauss(settings.rating_mean, settings.rating_sd))
        self.result = PlayerResult(player, behaviour, arrived=time.monotonic() - t0)
        self.check = SequenceChecker(player)
        self.client: ObservedClient | None = None
        self.wants_queue = False  # queue again whenever the ticket is gone
        self.loads = True  # answers ready checks (afk does not)
        self.since = 0.0  # when the current ticket was asked for
        self.session_at = 0.0  # when the current ready check began, as this player saw it
        self.retry: tuple[float, str] | None = None  # (when, what) to ask again
        self._told = ""  # the last state the server reported (the audit)
        self.trail: deque[str] = deque(maxlen=_TRAIL)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mint(self) -> str:
        return self.tokens.mint(self.player, self.rating)

    # -- the connection -------------------------------------------------------------------------

    async def open(self, auto_ready: bool) -> ObservedClient:
        """Connect, retrying refusals as the client's reconnects do; then read the welcome."""
        client = self.client = ObservedClient(self.s.url, self.mint, self.now, auto_ready=auto_ready,
                                              resume_grace_s=self.s.resume_grace_s)
        attempt = 0
        while True:
            try:
                await Connecting(client)
                break
            except (OSError, TimeoutError, FastmatchClientError) as exc:
                client.note_refused(type(exc).__name__)
                wait = retry.verdict(exc, fresh_token=False)
                if wait is None:
                    raise
                await asyncio.sleep(retry.delay(attempt, min(wait, _RETRY_MAX_S)))
                attempt += 1
        self.check.connected()
        await self.next()  # the welcome
        return client

    async def next(self) -> ServerMessage:
        msg = await self.recv()
        assert msg is not None
        return msg

    async def recv(self, within: float | None = None) -> ServerMessage | None:
        """The next message, checked (None if nothing came ``within`` seconds)."""
        client = self.client
        assert client is not None
        if within is not None:
            try:
                async with asyncio.timeout(max(within, 0.0)):
                    msg = await client.recv()
            except TimeoutError:
                return None
        else:
            msg = await client.recv()
        self.result.received += 1
        self.trail.append(f"{self.now():.2f} < {_brief(msg)}")
        if client.fresh and client.fresh[0] is msg:
            client.fresh.popleft()
            if self.check.state != "welcome":
                await self._resumed(client, msg)
                return msg
        sessions = len(self.check.sessions)
        self.check.received(msg)
        if len(self.check.sessions) > sessions:
            self.session_at = self.now()
        if type(msg) is Error:
            self.result.errors[msg.code] += 1
            if msg.code in _AMBIGUOUS:
                client.note(msg.code)
        elif type(msg) is Dequeued and msg.reason == "removed":
            client.note("removed")
        if self.check.vanished:
            await self._explain()
        return msg

    async def _resumed(self, client: ObservedClient, welcome: ServerMessage) -> None:
        assert isinstance(welcome, Welcome)
        ends = [e for _, e in client.events if e.startswith(("drop:", "asked:drop"))]
        # After its own drop (drop_resume) a resume is the behaviour's, not a fault's doing.
        client.note(f"{'resumed_asked' if ends and ends[-1] == 'asked:drop' else 'resumed'}:{welcome.state}")
        current = self.check.sessions[-1] if self.check.sessions else None
        ended = current is not None and not current.outcome
        sessions = len(self.check.sessions)
        self.check.resumed(welcome)
        if len(self.check.sessions) > sessions:
            self.session_at = self.now()
        if ended and current is not None and current.outcome == "dropped":
            # How the ready check it was cut from ended (assigned: a match it never heard of).
            client.note(f"dropped:{await self.facts.match_status(current.session)}")
        if self.check.vanished:
            await self._explain()
        self.retry = None  # the welcome says where things stand

    async def _explain(self) -> None:
        """The ticket is gone and nobody said so: legitimate only for a reason we can see."""
        what, self.check.vanished = self.check.vanished, ""
        assert self.client is not None
        why = ""
        if self.facts.data_lost_between(self.since - 0.5, self.now()):
            why = "redis_restart"
        elif what.startswith("resumed"):
            drops = [t for t, e in self.client.events if e.startswith(("drop:", "asked:drop"))]
            if drops and self.now() - drops[-1] > self.s.resume_grace_s * 0.9:
                why = "grace_over"
            elif await self.facts.penalised(self.player):
                why = "walked_out"  # matched the instant it dropped: leaving cancelled the match
        if why:
            self.client.note(f"explained:{why}")
        else:
            self.check.violations.append(
                f"{self.player}: {what}: its ticket (asked for at {self.since:.1f}s) is gone and "
                f"nobody said so; events {self.client.events[-6:]}")

    # -- requests ---------------------------------------------------------------------------------

    def sent(self, what: str) -> None:
        self.trail.append(f"{self.now():.2f} > {what}")

    def enqueue(self) -> None:
        assert self.client is not None
        self.sent("enqueue")
        self.since = self.now()
        self.result.t_enqueue = self.result.t_enqueue or self.since
        self.check.sent("enqueue")
        self.client.send(Enqueue(game_mode=self.s.mode))

    def dequeue(self) -> None:
        assert self.client is not None
        self.wants_queue = False
        self.sent("dequeue")
        self.check.sent("dequeue")
        self.client.send(Dequeue())

    async def step(self) -> ServerMessage | None:
        """One message (None when a retry came due), and what any player does about it: queue
        again once the ticket is gone, ask again what storage trouble refused."""
        due = None if self.retry is None else self.retry[0] - self.now()
        msg = await self.recv(due)
        if msg is None:
            self._retry()
            return None
        if type(msg) is MatchFound or (isinstance(msg, Error)
                                       and msg.code in ("loading_timeout", "player_blocked")):
            self.wants_queue = False
        elif isinstance(msg, Error) and msg.code in _AMBIGUOUS and self.retry is None:
            wait = min((msg.retry_after_ms or 0) / 1000 + self.rng.uniform(0, 0.2), _RETRY_MAX_S)
            self.retry = (self.now() + wait, self.check.state)
        if self.wants_queue and self.check.state == "idle" and not self._asked("enqueue"):
            self.enqueue()
        return msg

    def _asked(self, request: str) -> bool:
        return request in self.check.pending or request in self.check.ambiguous

    def _retry(self) -> None:
        """A request was refused with `unavailable`: if nothing since says it ran, send it again."""
        assert self.retry is not None and self.client is not None
        state, self.retry = self.retry[1], None
        if not self.client.connected or state != self.check.state:
            return
        if state == "idle" and self.wants_queue:
            self.enqueue()
        elif state == "queued" and not self.wants_queue and self._asked("dequeue"):
            self.dequeue()
        elif state == "loading" and self.loads and self.check.sessions:
            # The client answers a ready check once; an answer refused by storage trouble is sent
            # again, as an application would after `unavailable`.
            self.sent("loading_complete (again)")
            self.client.send(LoadingComplete(loading_session_id=self.check.sessions[-1].session))

    # -- a whole player ---------------------------------------------------------------------------

    async def run(self) -> PlayerResult:
        try:
            async with asyncio.timeout(self.s.lifetime_s):  # one timer for the whole player
                await getattr(self, f"_{self.behaviour}")()
        except TimeoutError:
            self.result.outcome = "unfinished"
            with contextlib.suppress(FastmatchClientError, OSError):
                await self._audit()
        except (OSError, FastmatchClientError) as exc:
            self.result.outcome = f"connection_failed:{type(exc).__name__}"
            if self.client is not None:
                self.client.note(f"gave_up:{type(exc).__name__}")
        finally:
            await self._close()
        self.result.violations = self.check.violations
        self.result.sessions = self.check.sessions
        if self.result.violations:
            self.result.trail = list(self.trail)
        return self.result

    async def _audit(self) -> None:
        """Out of time while waiting: does the server agree with what this player was told?
        A ticket gone or a ready check ended without a message shows here."""
        client = self.client
        if client is None or not client.connected or self.check.state not in ("idle", "queued", "loading"):
            return
        try:
            async with asyncio.timeout(_SETTLE_S * 4):
                for attempt in range(3):
                    if await self._ask_status(f"audit{attempt}") == self.check.state:
                        break
                    # An outcome may be on its way (or storage refused): let it arrive, ask again.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_SETTLE_S):
                            while True:
                                await self.next()
                else:
                    self.check.violations.append(
                        f"{self.player}: the server says {self._told}, the player was told "
                        f"{self.check.state}; events {client.events[-6:]}")
                    return
        except TimeoutError:
            client.note("audit:unanswered")  # e.g. the connection ended during the audit
            return
        waited = self.now() - self.session_at
        if self.check.state == "loading" and waited > self.s.outcome_bound_s:
            self.check.violations.append(
                f"{self.player}: never told how ready check {self.check.sessions[-1].session} "
                f"ended ({waited:.0f}s)")

    async def _ask_status(self, rid: str) -> str:
        """The state the server reports (``""`` if it refused to say, e.g. ``unavailable``)."""
        assert self.client is not None
        self.client.send(Status(request_id=rid))
        while getattr(msg := await self.next(), "request_id", None) != rid:
            pass
        self._told = msg.state if isinstance(msg, QueueStatus) else ""
        return self._told

    async def _close(self) -> None:
        client = self.client
        if client is None:
            return
        self.check.left()
        self.result.sent = client.messages_sent
        client.asked = "close"
        with contextlib.suppress(Exception):
            await client.close()
        self.result.events = client.events

    # -- behaviours -------------------------------------------------------------------------------

    async def _queue(self, auto_ready: bool) -> ObservedClient:
        client = await self.open(auto_ready)
        self.wants_queue = True
        self.enqueue()
        return client

    async def _lifecycle(self, load_delay: float = 0.0) -> None:
        """From queued to an outcome: answer every ready check, follow requeues and resumes."""
        client = self.client
        assert client is not None
        while True:
            msg = await self.step()
            kind = type(msg)
            if self.check.state == "loading" and (kind is StartLoading or kind is Welcome):
                self.result.t_start_loading = self.result.t_start_loading or self.now()
                if self.loads and not client.auto_ready:  # else the client answered already
                    if load_delay:
                        await asyncio.sleep(load_delay)
                    with contextlib.suppress(FastmatchClientError):
                        client.loading_complete(self.check.sessions[-1].session)
            elif kind is MatchFound:
                self.result.t_match_found = self.now()
                self.result.outcome = "matched"
                return
            elif isinstance(msg, Error) and msg.code in ("loading_timeout", "player_blocked"):
                self.result.outcome = msg.code
                return

    async def _normal(self) -> None:
        await self._queue(auto_ready=True)
        await self._lifecycle()

    async def _slow_loader(self) -> None:
        await self._queue(auto_ready=False)
        await self._lifecycle(load_delay=self.s.slow_load_s)

    async def _afk(self) -> None:
        self.loads = False
        await self._queue(auto_ready=False)
        await self._lifecycle()

    async def _quit_before_match(self) -> None:
        await self._queue(auto_ready=False)
        self.loads = False
        while self.check.state not in ("queued", "loading"):
            await self.step()
        await asyncio.sleep(self.rng.uniform(0, 0.05))
        self.dequeue()
        while True:
            await self.step()
            if self.check.state == "idle" and not self._asked("dequeue"):
                self.result.outcome = "quit"
                return
            if self.check.state == "loading":
                self.result.outcome = "quit_late"  # matched before the dequeue: walks out
                return

    async def _quit_during_loading(self) -> None:
        await self._queue(auto_ready=False)
        self.loads = False
        while self.check.state != "loading":
            await self.step()
        self.result.t_start_loading = self.now()
        self.result.outcome = "quit_loading"

    async def _invalid(self) -> None:
        client = await self.open(auto_ready=True)
        for frame in ("not json", '{"type": "warp"}'):
            client.send(frame)
            while not isinstance(err := await self.next(), Error):
                pass
            if err.code != "invalid_message":
                self.check.violations.append(f"{self.player}: bad frame answered {err}")
        self.wants_queue = True
        self.enqueue()
        await self._lifecycle()

    async def _double_enqueue(self) -> None:
        client = await self.open(auto_ready=True)
        self.wants_queue = True
        self.enqueue()
        client.send(Enqueue(game_mode=self.s.mode))  # leaves before the first is answered
        answers: list[ServerMessage] = []
        while len(answers) < 2:
            msg = await self.next()
            if type(msg) is Welcome:
                break  # resumed: the answers went with the old connection
            if type(msg) is Enqueued or type(msg) is Error:
                answers.append(msg)
        codes = [a.code if isinstance(a, Error) else "enqueued" for a in answers]
        if len(answers) == 2 and codes != ["enqueued", "already_in_queue"] \
                and not _AMBIGUOUS.intersection(codes):
            self.check.violations.append(f"{self.player}: double enqueue answered {codes}")
        await self._lifecycle()

    async def _drop_resume(self) -> None:
        """Lose the connection while queued; the client resumes it within the grace."""
        client = await self._queue(auto_ready=False)
        while self.check.state not in ("queued", "loading"):
            await self.step()
        # Whatever the server sent before the drop still counts: a start_loading among it means
        # this player walked out of a ready check, and the match was cancelled.
        client.asked = "drop"
        client.drop()
        client.auto_ready = True  # answers a ready check the welcome resumed into, and any later
        await self._lifecycle()


def _brief(msg: ServerMessage) -> str:
    """One line for the trail: the type and the fields that tell the story."""
    fields = {k: v for k, v in msgspec.structs.asdict(msg).items()
              if v is not None and k not in ("player_id", "protocol", "message", "game_mode")}
    return f"{msg.__struct_config__.tag} {fields}" if fields else str(msg.__struct_config__.tag)


async def play(settings: SimSettings, tokens: TokenMinter, player: str, behaviour: str,
               rng: random.Random, t0: float, facts: Facts) -> PlayerResult:
    return await _Play(settings, tokens, player, behaviour, rng, t0, facts).run()
