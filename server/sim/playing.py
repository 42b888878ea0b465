"""A simulated player's connection, as a real client lives it, and the checks on what it heard.

Every player acts as a real client would when things go wrong (docs/protocol.md section 7): a
connection that ends without the player asking (1001, 1011, an abrupt end, a killed worker) is
resumed by the client with jittered backoff within the resume grace; a refused first connect is
retried the same way; a request refused with ``unavailable`` (or ``internal_error``, or a code
this client does not know, which reads as ``internal_error``: docs/protocol.md section 2) is sent
again after ``retry_after_ms`` once it is clear it did not run; a player that wants a match queues
again when it learns its ticket is gone, and ends when told its mode is not run
(``unsupported_game_mode``: asking again would be refused the same way). What it heard is
checked on the way (:mod:`checker`); a surprise the checker cannot judge alone is looked up
(:mod:`facts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import ssl
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

import msgspec

from server.client import (
    Connecting,
    ConnectionClosed,
    Dequeue,
    Dequeued,
    Enqueue,
    Error,
    FastmatchClientError,
    HandshakeRefused,
    LoadingComplete,
    MatchFound,
    QueueStatus,
    ServerMessage,
    Status,
    Welcome,
    retry,
)
from server.protocol.messages import ClientMessage, acted_on
from server.sim.checker import SequenceChecker, SessionSeen
from server.sim.facts import Facts
from server.sim.simclient import ObservedClient
from server.sim.tokens import TokenMinter

AMBIGUOUS: Final = frozenset({"unavailable", "internal_error"})
_RETRY_JITTER_S: Final = 0.2  # added to retry_after_ms: players refused together spread out
# A 503's Retry-After grows with the share a worker refuses (server.overload_retry_after_max_s,
# 10 by default): honoured up to that, as the bundled clients honour it.
_REFUSED_MAX_S: Final = 10.0
_SETTLE_S: Final = 3.0  # at the end: how long messages in flight get to arrive
# After a behaviour ends, before it closes: what the server had sent by then still arrives and
# is checked (a start_loading after a confirmed dequeue, a second match_found). A message in
# flight takes milliseconds; this is what every player's connection stays open for longer.
_LINGER_S: Final = 0.5
_TRAIL: Final = 24  # messages kept to show what led to a violation


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
    ca_file: str = ""  # wss://: trust this CA (PEM) instead of the system's


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
    # Each connection attempt: ms until the server answered it (101, or a refusal: "503",
    # "401", ...) or it failed ("TimeoutError", "OSError", ...). What overload shedding promises
    # is read here: refusals within milliseconds, no handshake waiting long (README "Overload").
    handshakes: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Traffic:
    """The messages (both ways) of every player of a run process so far, counted as they go:
    the runner reads it where the steady window begins and ends."""

    messages: int = 0


class _Ended(Exception):
    """The player cannot go on (its mode is not run): ``outcome`` says why."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class Playing:
    """A simulated player's connection and checks; the behaviours (player.py) drive it."""

    def __init__(self, settings: SimSettings, tokens: TokenMinter, player: str, behaviour: str,
                 rng: random.Random, t0: float, facts: Facts, traffic: Traffic | None = None) -> None:
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
        self.ends_at = self.result.arrived + settings.lifetime_s  # set again when it starts
        self._told = ""  # the last state the server reported (the audit)
        self.traffic = traffic or Traffic()
        self._counted = 0  # of this player's messages, those added to ``traffic``
        # (t, direction, message): formatted only for a player with a violation
        self.trail: deque[tuple[float, str, ServerMessage | str]] = deque(maxlen=_TRAIL)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mint(self) -> str:
        return self.tokens.mint(self.player, self.rating)

    # -- the connection -------------------------------------------------------------------------

    async def open(self, auto_ready: bool) -> ObservedClient:
        """Connect, retrying refusals as the client's reconnects do; then read the welcome."""
        client = self.client = ObservedClient(
            self.s.url, self.mint, self.now, auto_ready=auto_ready,
            resume_grace_s=self.s.resume_grace_s, ssl=_tls(self.s.ca_file) if self.s.ca_file else None)
        attempt = 0
        while True:
            began = time.monotonic()
            try:
                await Connecting(client)
                self._handshake(began, "101")
                break
            except (OSError, TimeoutError, FastmatchClientError) as exc:
                self._handshake(began, str(exc.status) if isinstance(exc, HandshakeRefused)
                                else type(exc).__name__)
                client.note_refused(type(exc).__name__)
                wait = retry.verdict(exc, fresh_token=False)
                if wait is None:
                    raise
                await asyncio.sleep(retry.delay(attempt, min(wait, _REFUSED_MAX_S)))
                attempt += 1
        self.check.connected()
        await self.next()  # the welcome
        return client

    def _handshake(self, began: float, answer: str) -> None:
        self.result.handshakes.append((round((time.monotonic() - began) * 1000, 2), answer))

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
        self._count(client)
        self.trail.append((self.now(), "<", msg))
        if client.fresh and client.fresh[0] is msg:
            client.fresh.popleft()
            if self.check.state != "welcome":
                await self._resumed(client, msg)
                return msg
        sessions = len(self.check.sessions)
        self.check.received(msg)
        if len(self.check.sessions) > sessions:
            self.session_at = self.now()
        code = acted_on(msg.code) if type(msg) is Error else ""
        if type(msg) is Error:
            self.result.errors[msg.code] += 1
            if code in AMBIGUOUS:
                client.note(code)
        elif type(msg) is Dequeued and msg.reason == "removed":
            client.note("removed")
        if self.check.vanished:
            await self._explain()
        if code == "unsupported_game_mode":
            # The server does not run this mode: no use asking again (what the message showed
            # has been judged above).
            raise _Ended(code)
        return msg

    def _count(self, client: ObservedClient) -> None:
        """Add this player's messages since the last count to the run's. What it sent is seen
        here, at the next message it reads (within milliseconds, an answer), not as it went:
        the client sends some by itself (``auto_ready``)."""
        total = client.messages_sent + self.result.received
        self.traffic.messages += total - self._counted
        self._counted = total

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

    def send(self, message: ClientMessage | str, what: str) -> bool:
        """Send unless the connection is down (then the welcome after the resume says where
        things stand, and the player acts on that)."""
        assert self.client is not None
        if not self.client.connected:
            return False
        self.trail.append((self.now(), ">", what))
        self.client.send(message)
        return True

    def enqueue(self) -> None:
        if self.send(Enqueue(game_mode=self.s.mode), "enqueue"):
            self.since = self.now()
            self.result.t_enqueue = self.result.t_enqueue or self.since
            self.check.sent("enqueue")

    def dequeue(self) -> None:
        self.wants_queue = False
        if self.send(Dequeue(), "dequeue"):
            self.check.sent("dequeue")

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
        elif isinstance(msg, Error) and acted_on(msg.code) in AMBIGUOUS and self.retry is None:
            # The server's wait, however long (a real client honours it too); a retry due after
            # the player's lifetime would never be sent: the lifetime ends it first.
            due = self.now() + (msg.retry_after_ms or 0) / 1000 + self.rng.uniform(0, _RETRY_JITTER_S)
            if due < self.ends_at:
                self.retry = (due, self.check.state)
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
            self.send(LoadingComplete(loading_session_id=self.check.sessions[-1].session),
                      "loading_complete (again)")

    # -- a whole player ---------------------------------------------------------------------------

    async def run(self) -> PlayerResult:
        self.ends_at = self.now() + self.s.lifetime_s
        try:
            async with asyncio.timeout(self.s.lifetime_s):  # one timer for the whole player
                await getattr(self, f"_{self.behaviour}")()
            await self._linger()
        except _Ended as ended:
            self.result.outcome = ended.outcome
        except TimeoutError:
            self.result.outcome = "unfinished"
            # _Ended: an enqueue answered only now, its player out of time all the same.
            with contextlib.suppress(FastmatchClientError, OSError, _Ended):
                await self._audit()
        except (OSError, FastmatchClientError) as exc:
            self.result.outcome = f"connection_failed:{type(exc).__name__}"
            if self.client is not None:
                self.client.note(f"gave_up:{type(exc).__name__}")
            if isinstance(exc, ConnectionClosed) and exc.code not in retry.RESUMABLE:
                # 4009 with no other connection of ours open, 1008, 4008: the server ended a
                # session this well-behaved player had every right to keep.
                self.check.violations.append(f"{self.player}: closed with {exc.code} {exc.reason!r}")
        finally:
            await self._close()
        self.result.violations = self.check.violations
        self.result.sessions = self.check.sessions
        if self.result.violations:
            self.result.trail = [f"{t:.2f} {way} {m if isinstance(m, str) else _brief(m)}"
                                 for t, way, m in self.trail]
        return self.result

    async def _linger(self) -> None:
        """The behaviour has what it wanted (a match, a confirmed dequeue, ...); what arrives
        within ``_LINGER_S`` is read and checked all the same before the player closes: DESIGN
        invariant 5 ends each enqueue once, so e.g. nobody is put into a match after leaving."""
        until = self.now() + _LINGER_S
        client = self.client
        assert client is not None
        # The connection may end meanwhile, or a message end the player: checked up to there.
        with contextlib.suppress(FastmatchClientError, OSError, _Ended):
            while (left := until - self.now()) > 0 and await self.recv(left) is not None:
                pass
            # Dropped meanwhile (a drain's 1001): the client resumes, as it would have before
            # the behaviour ended, and its welcome is read (and checked) before the close;
            # cut short by the close, the drop would go without its resume.
            until = self.now() + self.s.resume_grace_s + _SETTLE_S
            while (client.resuming or client.fresh) and (left := until - self.now()) > 0:
                if await self.recv(left) is None:
                    break

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
                    if not self._told:
                        # Refused every time (unavailable: an outage at the end of this
                        # player's lifetime): nothing to compare, so nothing is judged.
                        client.note("audit:refused")
                        return
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
        self.check.left(answering=self.loads)
        self.result.sent = client.messages_sent
        self._count(client)
        client.asked = "close"
        with contextlib.suppress(Exception):
            await client.close()
        self.result.events = client.events

    # -- behaviours -------------------------------------------------------------------------------


@functools.cache
def _tls(ca_file: str) -> ssl.SSLContext:
    """One context for every player of the process: loading a CA per connection costs more
    than the handshake's own work."""
    return ssl.create_default_context(cafile=ca_file)


def _brief(msg: ServerMessage) -> str:
    """One line for the trail: the type and the fields that tell the story."""
    fields = {k: v for k, v in msgspec.structs.asdict(msg).items()
              if v is not None and k not in ("player_id", "protocol", "message", "game_mode")}
    return f"{msg.__struct_config__.tag} {fields}" if fields else str(msg.__struct_config__.tag)
