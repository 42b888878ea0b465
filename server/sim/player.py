"""One simulated player: a behaviour from the mix, played with fastmatch's own client.

The behaviours are what a player wants (a match, to leave the queue, to walk out of a ready
check, ...); how it copes with drops, refusals and lost tickets on the way is :mod:`playing`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Final

from server.client import (
    Enqueue,
    Enqueued,
    Error,
    FastmatchClientError,
    MatchFound,
    ServerMessage,
    StartLoading,
    Welcome,
)
from server.sim.facts import Facts
from server.sim.playing import AMBIGUOUS, PlayerResult, Playing, SimSettings, Traffic
from server.sim.simclient import ObservedClient
from server.sim.tokens import TokenMinter

__all__ = ["BEHAVIOURS", "PlayerResult", "SimSettings", "Traffic", "parse_mix", "play"]

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


class _Play(Playing):
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
            if kind is StartLoading and self.check.sessions:
                # Which leader's term formed it (``<epoch>.<tag>.<tick>.<n>``): the report
                # tells when a new term's first match came after a fault.
                client.note("formed:" + ".".join(self.check.sessions[-1].session.split(".")[:2]))
            if self.check.state == "loading" and (kind is StartLoading or kind is Welcome):
                self.result.t_start_loading = self.result.t_start_loading or self.now()
                if self.loads and not client.auto_ready:  # else the client answered already
                    if load_delay:
                        await asyncio.sleep(load_delay)
                    with contextlib.suppress(FastmatchClientError):
                        client.loading_complete(self.check.sessions[-1].session)
            elif kind is MatchFound:
                if not self.loads:  # afk: never said loading_complete, on any connection
                    self.check.violations.append(
                        f"{self.player}: match_found for a ready check it never answered")
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
        await self.open(auto_ready=True)
        for frame in ("not json", '{"type": "warp"}'):
            if not self.send(frame, frame):
                break
            while not isinstance(answer := await self.next(), Error | Welcome):
                pass
            if type(answer) is Welcome:
                break  # resumed: the answer went with the old connection
            if isinstance(answer, Error) and answer.code != "invalid_message":
                self.check.violations.append(f"{self.player}: bad frame answered {answer}")
        self.wants_queue = True
        self.enqueue()
        await self._lifecycle()

    async def _double_enqueue(self) -> None:
        await self.open(auto_ready=True)
        self.wants_queue = True
        self.enqueue()
        self.send(Enqueue(game_mode=self.s.mode), "enqueue (again, before the first is answered)")
        answers: list[ServerMessage] = []
        while len(answers) < 2:
            msg = await self.next()
            if type(msg) is Welcome:
                break  # resumed: the answers went with the old connection
            if type(msg) is Enqueued or type(msg) is Error:
                answers.append(msg)
        codes = [a.code if isinstance(a, Error) else "enqueued" for a in answers]
        if len(answers) == 2 and codes != ["enqueued", "already_in_queue"] \
                and not AMBIGUOUS.intersection(codes):
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


async def play(settings: SimSettings, tokens: TokenMinter, player: str, behaviour: str,
               rng: random.Random, t0: float, facts: Facts, traffic: Traffic | None = None) -> PlayerResult:
    return await _Play(settings, tokens, player, behaviour, rng, t0, facts, traffic).run()
