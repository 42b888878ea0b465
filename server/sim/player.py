"""One simulated player: a behaviour from the mix, played over a real WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.protocol.auth import mint_token
from server.sim.checker import SequenceChecker, SessionSeen
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
    def __init__(self, settings: SimSettings, player: str, behaviour: str, rng: random.Random,
                 t0: float) -> None:
        self.s = settings
        self.player = player
        self.behaviour = behaviour
        self.rng = rng
        self.t0 = t0
        self.rating = round(rng.gauss(settings.rating_mean, settings.rating_sd))
        self.result = PlayerResult(player, behaviour, arrived=time.monotonic() - t0)
        self.check = SequenceChecker(player)
        self.deadline = time.monotonic() + settings.lifetime_s
        self.queued_at: int | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def open(self) -> ClientConnection:
        token = mint_token(self.s.secret, self.player, self.rating, ttl_s=3600)
        ws = await connect(f"{self.s.url}?token={token}", compression=None, open_timeout=10,
                           ping_interval=None, max_queue=64)
        self.check.connected()
        return ws

    async def send(self, ws: ClientConnection, msg: dict[str, Any] | str) -> None:
        await ws.send(msg if isinstance(msg, str) else json.dumps(msg))
        self.result.sent += 1

    async def recv(self, ws: ClientConnection) -> dict[str, Any]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        async with asyncio.timeout(remaining):
            msg: dict[str, Any] = json.loads(await ws.recv())
        self.result.received += 1
        self.check.received(msg)
        if msg.get("type") == "error":
            self.result.errors[msg.get("code", "?")] += 1
        return msg

    async def until(self, ws: ClientConnection, *types: str) -> dict[str, Any]:
        while True:
            msg = await self.recv(ws)
            if msg.get("type") in types:
                return msg

    async def enqueue(self, ws: ClientConnection) -> None:
        self.result.t_enqueue = self.now()
        await self.send(ws, {"type": "enqueue", "game_mode": self.s.mode})

    async def run(self) -> PlayerResult:
        try:
            await getattr(self, f"_{self.behaviour}")()
        except TimeoutError:
            self.result.outcome = "unfinished"
        except (OSError, InvalidStatus, ConnectionClosed) as exc:
            self.result.outcome = f"connection_failed:{type(exc).__name__}"
        self.result.violations = self.check.violations
        self.result.sessions = self.check.sessions
        return self.result

    # -- behaviours ---------------------------------------------------------------------------

    async def _normal(self, ws: ClientConnection | None = None) -> None:
        ws = ws or await self._connect_and_enqueue()
        try:
            await self._lifecycle(ws)
        finally:
            await self._close(ws)

    async def _connect_and_enqueue(self) -> ClientConnection:
        ws = await self.open()
        await self.until(ws, "welcome")
        await self.enqueue(ws)
        return ws

    async def _lifecycle(self, ws: ClientConnection, load_delay: float = 0.0, load: bool = True) -> None:
        """From queued to an outcome: answer every start_loading, follow requeues."""
        while True:
            msg = await self.until(ws, "start_loading", "match_found", "error", "dequeued")
            kind = msg["type"]
            if kind == "start_loading":
                self.result.t_start_loading = self.result.t_start_loading or self.now()
                if load:
                    if load_delay:
                        await asyncio.sleep(load_delay)
                    await self.send(ws, {"type": "loading_complete",
                                         "loading_session_id": msg["loading_session_id"]})
            elif kind == "match_found":
                self.result.t_match_found = self.now()
                self.result.outcome = "matched"
                return
            elif kind == "dequeued" or msg.get("code") == "loading_timeout":
                self.result.outcome = "removed" if kind == "dequeued" else "loading_timeout"
                return

    async def _close(self, ws: ClientConnection) -> None:
        self.check.left()
        with contextlib.suppress(Exception):
            await ws.close()

    async def _quit_before_match(self) -> None:
        ws = await self._connect_and_enqueue()
        try:
            await self.until(ws, "enqueued")
            await asyncio.sleep(self.rng.uniform(0, 0.05))
            await self.send(ws, {"type": "dequeue"})
            msg = await self.until(ws, "dequeued", "error")
            self.result.outcome = "quit" if msg["type"] == "dequeued" else "quit_late"
        finally:
            await self._close(ws)

    async def _quit_during_loading(self) -> None:
        ws = await self._connect_and_enqueue()
        try:
            await self.until(ws, "start_loading")
            self.result.t_start_loading = self.now()
            self.result.outcome = "quit_loading"
        finally:
            await self._close(ws)

    async def _slow_loader(self) -> None:
        ws = await self._connect_and_enqueue()
        try:
            await self._lifecycle(ws, load_delay=self.s.slow_load_s)
        finally:
            await self._close(ws)

    async def _afk(self) -> None:
        ws = await self._connect_and_enqueue()
        try:
            await self._lifecycle(ws, load=False)
        finally:
            await self._close(ws)

    async def _invalid(self) -> None:
        ws = await self.open()
        await self.until(ws, "welcome")
        for frame in ("not json", json.dumps({"type": "warp"})):
            await self.send(ws, frame)
            err = await self.until(ws, "error")
            if err.get("code") != "invalid_message":
                self.check.violations.append(f"{self.player}: bad frame answered {err}")
        await self.enqueue(ws)
        await self._normal(ws)

    async def _double_enqueue(self) -> None:
        ws = await self.open()
        await self.until(ws, "welcome")
        await self.enqueue(ws)
        await self.send(ws, {"type": "enqueue", "game_mode": self.s.mode})
        first = await self.until(ws, "enqueued", "error")
        second = await self.until(ws, "enqueued", "error")
        if (first["type"], second.get("code")) != ("enqueued", "already_in_queue"):
            self.check.violations.append(f"{self.player}: double enqueue answered {first}, {second}")
        await self._normal(ws)

    async def _drop_resume(self) -> None:
        ws = await self._connect_and_enqueue()
        queued = await self.until(ws, "enqueued")
        with contextlib.suppress(Exception):
            await ws.close()
        # Whatever the server sent before it saw the close still counts: if a start_loading was
        # among it, this player walked out of a ready check and the match was cancelled.
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            while True:
                await self.recv(ws)
        walked_out = self.check.state == "loading"
        self.check.left()
        ws = await self.open()
        welcome = await self.until(ws, "welcome")
        if welcome.get("state") == "queued" and welcome.get("queued_at_ms") != queued["queued_at_ms"]:
            self.check.violations.append(f"{self.player}: resumed with a different queued_at")
        if welcome.get("state") == "idle":
            # Matched in the instant it dropped: its start_loading never arrived and leaving
            # cancelled the match. Redis' penalty record says so; a lost ticket leaves none.
            if not walked_out and not await _walked_out_of_ready_check(self.s.redis_url, self.player):
                self.check.violations.append(f"{self.player}: resume within the grace found no ticket")
            await self.enqueue(ws)
        elif welcome.get("state") == "loading":  # matched while away: answer the ready check
            await self.send(ws, {"type": "loading_complete",
                                 "loading_session_id": welcome["loading_session_id"]})
        await self._normal(ws)


_redis: dict[str, aioredis.Redis] = {}


async def _walked_out_of_ready_check(redis_url: str, player: str) -> bool:
    if not redis_url:
        return False
    client = _redis.get(redis_url)
    if client is None:
        client = _redis[redis_url] = aioredis.Redis.from_url(redis_url)
    return bool(await client.zcard(keys.penalty(player)))


async def play(settings: SimSettings, player: str, behaviour: str, rng: random.Random,
               t0: float) -> PlayerResult:
    return await _Play(settings, player, behaviour, rng, t0).run()
