"""One simulated player: a behaviour from the mix, played with fastmatch's own client."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import redis.asyncio as aioredis

from server.client import (
    Client,
    Dequeue,
    Dequeued,
    Enqueue,
    Enqueued,
    Error,
    FastmatchClientError,
    MatchFound,
    ServerMessage,
    StartLoading,
    Welcome,
    connect,
)
from server.sim.checker import SequenceChecker, SessionSeen
from server.sim.tokens import TokenMinter
from server.store import keys

BEHAVIOURS: Final = (
    "normal", "quit_before_match", "quit_during_loading", "slow_loader", "afk",
    "invalid", "double_enqueue", "drop_resume",
)


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
    resume_grace_s: float = 10.0  # the server's; drop_resume must come back within it


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


class _Play:
    def __init__(self, settings: SimSettings, tokens: TokenMinter, player: str, behaviour: str,
                 rng: random.Random, t0: float) -> None:
        self.s = settings
        self.tokens = tokens
        self.player = player
        self.behaviour = behaviour
        self.rng = rng
        self.t0 = t0
        self.rating = round(rng.gauss(settings.rating_mean, settings.rating_sd))
        self.result = PlayerResult(player, behaviour, arrived=time.monotonic() - t0)
        self.check = SequenceChecker(player)

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def open(self, auto_ready: bool, reconnect: bool = False) -> Client:
        # Only drop_resume reconnects: any other drop is the server's doing and must show.
        client = await connect(self.s.url, self.tokens.mint(self.player, self.rating),
                               auto_ready=auto_ready, reconnect=reconnect,
                               resume_grace_s=self.s.resume_grace_s)
        self.check.connected()
        return client

    async def recv(self, client: Client) -> ServerMessage:
        msg = await client.recv()
        self.result.received += 1
        self.check.received(msg)
        if isinstance(msg, Error):
            self.result.errors[msg.code] += 1
        return msg

    async def until(self, client: Client, *types: type[ServerMessage]) -> ServerMessage:
        while True:
            msg = await self.recv(client)
            if type(msg) in types:
                return msg

    def enqueue(self, client: Client) -> None:
        self.result.t_enqueue = self.now()
        client.send(Enqueue(game_mode=self.s.mode))

    async def run(self) -> PlayerResult:
        try:
            async with asyncio.timeout(self.s.lifetime_s):  # one timer for the whole player
                await getattr(self, f"_{self.behaviour}")()
        except TimeoutError:
            self.result.outcome = "unfinished"
        except (OSError, FastmatchClientError) as exc:
            self.result.outcome = f"connection_failed:{type(exc).__name__}"
        self.result.violations = self.check.violations
        self.result.sessions = self.check.sessions
        return self.result

    # -- behaviours ---------------------------------------------------------------------------

    async def _normal(self, client: Client | None = None) -> None:
        client = client or await self._connect_and_enqueue(auto_ready=True)
        try:
            await self._lifecycle(client)
        finally:
            await self._close(client)

    async def _connect_and_enqueue(self, auto_ready: bool, reconnect: bool = False) -> Client:
        client = await self.open(auto_ready, reconnect)
        await self.until(client, Welcome)
        self.enqueue(client)
        return client

    async def _lifecycle(self, client: Client, load_delay: float = 0.0, load: bool = True) -> None:
        """From queued to an outcome: answer every start_loading, follow requeues."""
        while True:
            msg = await self.until(client, StartLoading, MatchFound, Error, Dequeued)
            if isinstance(msg, StartLoading):
                self.result.t_start_loading = self.result.t_start_loading or self.now()
                if load and not client.auto_ready:  # else the client answered already
                    if load_delay:
                        await asyncio.sleep(load_delay)
                    client.loading_complete(msg.loading_session_id)
            elif type(msg) is MatchFound:
                self.result.t_match_found = self.now()
                self.result.outcome = "matched"
                return
            elif type(msg) is Dequeued or (isinstance(msg, Error) and msg.code == "loading_timeout"):
                self.result.outcome = "removed" if type(msg) is Dequeued else "loading_timeout"
                return

    async def _close(self, client: Client) -> None:
        self.check.left()
        self.result.sent = client.messages_sent
        with contextlib.suppress(Exception):
            await client.close()

    async def _quit_before_match(self) -> None:
        client = await self._connect_and_enqueue(auto_ready=False)
        try:
            await self.until(client, Enqueued)
            await asyncio.sleep(self.rng.uniform(0, 0.05))
            client.send(Dequeue())
            msg = await self.until(client, Dequeued, Error)
            self.result.outcome = "quit" if type(msg) is Dequeued else "quit_late"
        finally:
            await self._close(client)

    async def _quit_during_loading(self) -> None:
        client = await self._connect_and_enqueue(auto_ready=False)
        try:
            await self.until(client, StartLoading)
            self.result.t_start_loading = self.now()
            self.result.outcome = "quit_loading"
        finally:
            await self._close(client)

    async def _slow_loader(self) -> None:
        client = await self._connect_and_enqueue(auto_ready=False)
        try:
            await self._lifecycle(client, load_delay=self.s.slow_load_s)
        finally:
            await self._close(client)

    async def _afk(self) -> None:
        client = await self._connect_and_enqueue(auto_ready=False)
        try:
            await self._lifecycle(client, load=False)
        finally:
            await self._close(client)

    async def _invalid(self) -> None:
        client = await self.open(auto_ready=True)
        await self.until(client, Welcome)
        for frame in ("not json", '{"type": "warp"}'):
            client.send(frame)
            err = await self.until(client, Error)
            if not isinstance(err, Error) or err.code != "invalid_message":
                self.check.violations.append(f"{self.player}: bad frame answered {err}")
        self.enqueue(client)
        await self._normal(client)

    async def _double_enqueue(self) -> None:
        client = await self.open(auto_ready=True)
        await self.until(client, Welcome)
        self.enqueue(client)
        client.send(Enqueue(game_mode=self.s.mode))  # leaves before the first is answered
        first = await self.until(client, Enqueued, Error)
        second = await self.until(client, Enqueued, Error)
        if type(first) is not Enqueued or not isinstance(second, Error) or second.code != "already_in_queue":
            self.check.violations.append(f"{self.player}: double enqueue answered {first}, {second}")
        await self._normal(client)

    async def _drop_resume(self) -> None:
        """Lose the connection while queued; the client resumes it within the grace."""
        client = await self._connect_and_enqueue(auto_ready=False, reconnect=True)
        queued = await self.until(client, Enqueued)
        assert isinstance(queued, Enqueued)
        client.drop()
        # Whatever the server sent before the drop still counts: if a start_loading was among
        # it, this player walked out of a ready check and the match was cancelled. The resumed
        # connection starts with its welcome.
        while type(msg := await client.recv()) is not Welcome:
            self.result.received += 1
            self.check.received(msg)
        self.result.received += 1
        walked_out = self.check.state == "loading"
        self.check.left()
        self.check.connected()
        self.check.received(msg)
        assert isinstance(msg, Welcome)
        if msg.state == "queued" and msg.queued_at_ms != queued.queued_at_ms:
            self.check.violations.append(f"{self.player}: resumed with a different queued_at")
        if msg.state == "idle":
            # Matched in the instant it dropped: its start_loading never arrived and leaving
            # cancelled the match. Redis' penalty record says so; a lost ticket leaves none.
            if not walked_out and not await _walked_out_of_ready_check(self.s.redis_url, self.player):
                self.check.violations.append(f"{self.player}: resume within the grace found no ticket")
            self.enqueue(client)
        client.auto_ready = True  # answers a ready check the welcome resumed into, and any later
        await self._normal(client)


_redis: dict[str, aioredis.Redis] = {}


async def _walked_out_of_ready_check(redis_url: str, player: str) -> bool:
    if not redis_url:
        return False
    client = _redis.get(redis_url)
    if client is None:
        client = _redis[redis_url] = aioredis.Redis.from_url(redis_url)
    return bool(await client.zcard(keys.penalty(player)))


async def play(settings: SimSettings, tokens: TokenMinter, player: str, behaviour: str,
               rng: random.Random, t0: float) -> PlayerResult:
    return await _Play(settings, tokens, player, behaviour, rng, t0).run()
