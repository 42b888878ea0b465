"""How a simulated player copes with what a server may answer (docs/protocol.md sections 2, 5, 7):
a code it does not know, a long `retry_after_ms`, a mode the server does not run.

What no real fastmatch sends on cue (a newer server's code, a ten-minute wait) comes from a small
real WebSocket server that plays one; the rest from a real worker."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from server.app.worker import Worker
from server.config import DEV_SECRET
from server.sim.facts import Facts
from server.sim.player import BEHAVIOURS, PlayerResult, SimSettings, play
from server.sim.tokens import TokenMinter
from tests.helpers import TIMEOUT

PLAYER = "p1"


class ScriptedServer:
    """Plays fastmatch for one player: its first enqueues are refused with ``refusals`` (error
    fields, one per enqueue), the next is queued and put into a ready check at once, and its
    ``loading_complete`` matched; ``status`` tells the truth."""

    def __init__(self, *refusals: dict[str, Any], match: bool = True, status: bool | str = True) -> None:
        self.refusals = list(refusals)
        self.enqueues = 0
        self.match = match  # else the player stays queued
        # `status`: True tells the truth, False refuses it (unavailable, as during an outage), a
        # state name tells that instead.
        self.status = status

    async def handle(self, ws: ServerConnection) -> None:
        state = "idle"
        await ws.send(json.dumps({"type": "welcome", "player_id": PLAYER, "state": state, "protocol": 1}))
        async for frame in ws:
            msg = json.loads(frame)
            rid = {"request_id": msg["request_id"]} if msg.get("request_id") else {}
            if msg["type"] == "enqueue":
                self.enqueues += 1
                if self.refusals:
                    await ws.send(json.dumps({"type": "error", **self.refusals.pop(0), **rid}))
                    continue
                state = "loading" if self.match else "queued"
                await ws.send(json.dumps({"type": "enqueued", "game_mode": "1v1", "queued_at_ms": 1, **rid}))
                if not self.match:
                    continue
                await ws.send(json.dumps({"type": "start_loading", "loading_session_id": "1.t.1.0",
                                          "game_mode": "1v1", "teams": [[PLAYER], ["q"]],
                                          "deadline_ms": 1}))
            elif msg["type"] == "loading_complete":
                state = "idle"
                await ws.send(json.dumps({"type": "match_found", "loading_session_id": "1.t.1.0",
                                          "game_mode": "1v1", "server_address": "gs:1",
                                          "server_session_id": "x", "teams": [[PLAYER], ["q"]]}))
            elif msg["type"] == "status" and not self.status:
                await ws.send(json.dumps({"type": "error", "code": "unavailable", "message": "x",
                                          "retry_after_ms": 1000, **rid}))
            elif msg["type"] == "status":
                told = self.status if isinstance(self.status, str) else state
                await ws.send(json.dumps({"type": "queue_status", "state": told, "waited_ms": 0,
                                          "queue_size": 0, "search_window": 0, **rid}))


@asynccontextmanager
async def scripted(server: ScriptedServer) -> AsyncIterator[str]:
    async with serve(server.handle, "127.0.0.1", 0) as ws_server:
        yield f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}/ws"


async def play_one(url: str, lifetime_s: float, behaviour: str = "normal", mode: str = "1v1",
                   redis_url: str = "") -> PlayerResult:
    settings = SimSettings(url=url, secret=DEV_SECRET, mode=mode, lifetime_s=lifetime_s,
                           redis_url=redis_url, resume_grace_s=TIMEOUT)
    facts = Facts(redis_url, mode)
    try:
        return await play(settings, TokenMinter(DEV_SECRET), PLAYER, behaviour, random.Random(1),
                          time.monotonic(), facts)
    finally:
        await facts.aclose()


async def test_a_code_the_player_does_not_know_reads_as_internal_error_and_is_retried() -> None:
    """docs/protocol.md 2: the enqueue may or may not have run, so the player asks again (it
    used to wait, its enqueue pending for ever, until its lifetime ended)."""
    server = ScriptedServer({"code": "shard_moving", "message": "from a newer server"})
    async with scripted(server) as url:
        result = await play_one(url, lifetime_s=TIMEOUT * 2)
    assert result.outcome == "matched", result
    assert server.enqueues == 2
    assert result.violations == [] and result.errors == {"shard_moving": 1}


async def test_a_retry_after_longer_than_five_seconds_is_honoured() -> None:
    """`unavailable` with a 10-minute retry_after_ms: the player does not ask again within its
    8 s lifetime (it used to, after at most 5 s), and ends unfinished, nothing violated."""
    server = ScriptedServer({"code": "unavailable", "message": "x", "retry_after_ms": 600_000})
    async with scripted(server) as url:
        result = await play_one(url, lifetime_s=8.0)
    assert server.enqueues == 1
    assert result.outcome == "unfinished" and result.violations == [], result


async def test_a_retry_after_within_the_lifetime_is_waited_then_sent() -> None:
    server = ScriptedServer({"code": "unavailable", "message": "x", "retry_after_ms": 300})
    async with scripted(server) as url:
        result = await play_one(url, lifetime_s=TIMEOUT * 2)
    assert server.enqueues == 2
    assert result.outcome == "matched" and result.violations == [], result


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
async def test_a_mode_the_server_does_not_run_ends_the_player(worker: Worker, redis_url: str,
                                                             behaviour: str) -> None:
    """`unsupported_game_mode` ends the player with that outcome: asking again would be refused
    the same way (it used to re-send `enqueue` at once, in a tight loop, until rate limited)."""
    result = await play_one(f"ws://127.0.0.1:{worker.front.port}/ws", lifetime_s=TIMEOUT * 2,
                            behaviour=behaviour, mode="no_such_mode", redis_url=redis_url)
    assert result.outcome == "unsupported_game_mode", result
    assert result.violations == []
    # One enqueue (two for double_enqueue; invalid sends two bad frames first).
    assert result.sent <= 3, result


class MatchesAfterDequeue:
    """A broken fastmatch: it confirms a player's dequeue, then puts it into a ready check."""

    async def handle(self, ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "welcome", "player_id": PLAYER, "state": "idle", "protocol": 1}))
        async for frame in ws:
            msg = json.loads(frame)
            rid = {"request_id": msg["request_id"]} if msg.get("request_id") else {}
            if msg["type"] == "enqueue":
                await ws.send(json.dumps({"type": "enqueued", "game_mode": "1v1", "queued_at_ms": 1, **rid}))
            elif msg["type"] == "dequeue":
                await ws.send(json.dumps({"type": "dequeued", "game_mode": "1v1", "reason": "requested",
                                          **rid}))
                await ws.send(json.dumps({"type": "start_loading", "loading_session_id": "1.t.1.0",
                                          "game_mode": "1v1", "teams": [[PLAYER], ["q"]],
                                          "deadline_ms": 1}))


async def test_what_arrives_after_the_behaviour_ended_is_checked_before_closing() -> None:
    """quit_before_match has what it wanted on `dequeued`; the start_loading right behind it
    (a match after leaving the queue) used to go unread as the player closed."""
    async with serve(MatchesAfterDequeue().handle, "127.0.0.1", 0) as ws_server:
        url = f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}/ws"
        result = await play_one(url, lifetime_s=TIMEOUT * 2, behaviour="quit_before_match")
    assert result.outcome == "quit", result
    assert result.violations == [f"{PLAYER}: start_loading while idle"], result


async def test_an_audit_the_server_refuses_to_answer_judges_nothing() -> None:
    """Out of time while queued, the player asks the server where it stands; every `status`
    is refused (`unavailable`: an outage as its lifetime ends). That is no disagreement to
    report (it was reported as "the server says , the player was told queued")."""
    server = ScriptedServer(match=False, status=False)
    async with scripted(server) as url:
        result = await play_one(url, lifetime_s=1.0)
    assert result.outcome == "unfinished" and result.violations == [], result


async def test_an_audit_the_server_answers_differently_is_a_violation() -> None:
    """The same audit answered: the server says idle, the player believes it is queued."""
    server = ScriptedServer(match=False, status="idle")
    async with scripted(server) as url:
        result = await play_one(url, lifetime_s=1.0)
    assert any("the server says idle" in v for v in result.violations), result
