"""A host taken out or lost under load, behind HAProxy (TLS, PROXY v2, /ready checks): the
simulator's players (``fastmatch sim``'s, with every check it makes) play through the balancer
while one of the two hosts is drained or killed (README "Behind a load balancer", issue 12)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.config import DEV_SECRET
from server.sim.player import SimSettings
from server.sim.runner import RunConfig, RunResult, run
from server.store import keys
from tests.app.served import alive, wait_workers
from tests.conftest import GameServerFactory
from tests.edge import test_haproxy
from tests.edge.test_haproxy import Edge, EdgeFactory
from tests.helpers import TIMEOUT

edge = test_haproxy.edge  # the same topology fixture: two hosts behind HAProxy, one Redis

GRACE_S = 1.5  # tests.app.served.FAST_ENV's resume grace
READY_S, ALLOCATION_S = 2.0, 1.5
ENV = {
    # Every simulated player comes from 127.0.0.1: the per-address limit would refuse them.
    "FASTMATCH_SERVER__CONNECT_RATE_PER_IP": "100000",
    "FASTMATCH_SERVER__CONNECT_BURST_PER_IP": "100000",
    "FASTMATCH_MATCHING__READY_TIMEOUT_MS": str(int(READY_S * 1000)),
    "FASTMATCH_GAMESERVER__ALLOCATION_TIMEOUT_MS": str(int(ALLOCATION_S * 1000)),
}
MIX = {"normal": 55, "slow_loader": 10, "afk": 5, "quit_before_match": 5,
       "quit_during_loading": 5, "drop_resume": 10, "double_enqueue": 5, "invalid": 5}


def load(e: Edge, tmp_path: Path, redis_url: str, final_batch: int = 0) -> RunConfig:
    """Players at 20/s for 6 s, through the balancer over TLS (the fixture's certificate); their
    ratings far apart, so that many wait in the queue for seconds, connected when a host goes."""
    settings = SimSettings(url=f"wss://127.0.0.1:{e.port}/ws", secret=DEV_SECRET, lifetime_s=8,
                           rating_sd=3000,
                           resume_grace_s=GRACE_S, redis_url=redis_url,
                           outcome_bound_s=READY_S + ALLOCATION_S + 3,
                           ca_file=str(tmp_path / "server.crt"))
    return RunConfig(settings=settings, redis_url=redis_url, rate=20, duration_s=6, mix=MIX,
                     sample=False, final_batch=final_batch, leftover_wait_s=TIMEOUT * 3)


async def players_on(admin: aioredis.Redis, e: Edge, host: str, at_least: int) -> None:
    """Until the host holds that many players' connections (the load has reached it)."""
    workers = [wid for wid, name in e.workers.items() if name == host]
    async with asyncio.timeout(TIMEOUT * 2):
        while sum([await admin.scard(keys.worker_players(w)) for w in workers]) < at_least:
            await asyncio.sleep(0.05)  # players arrive on their own schedule


def events(result: RunResult, kind: str) -> list[tuple[str, float, str]]:
    return [(p.player, t, what) for p in result.players for t, what in p.events
            if what.startswith(kind)]


async def test_sigterm_under_load_refuses_nobody_and_its_players_resume_on_the_other_host(
    edge: EdgeFactory, admin: aioredis.Redis, redis_url: str, start_game_server: GameServerFactory,
    tmp_path: Path,
) -> None:
    e = await edge(**ENV)
    await start_game_server()
    started: list[float] = []  # the run's clock: its players' events are timed from there

    def progress(_: RunResult, __: int, elapsed: float) -> None:
        started[:] = started or [time.monotonic() - elapsed]

    running = asyncio.create_task(run(load(e, tmp_path, redis_url), progress))
    await players_on(admin, e, "a", 20)
    e.hosts["a"].signal(signal.SIGTERM)
    signalled = time.monotonic() - started[0]
    down = await e.haproxy.logged("Server fastmatch/host-a is DOWN", TIMEOUT * 2)
    assert "code: 503" in down  # out of rotation by /ready while host a still serves
    assert await asyncio.to_thread(e.hosts["a"].wait, TIMEOUT * 2) == 0
    result = await running

    assert result.violations == [], result.violations[:5]
    # Nobody, from the signal on: while the checks caught up, and after.
    assert [ev for ev in events(result, "refused") if ev[1] >= signalled] == []
    drained = {player for player, _, _ in events(result, "drop:1001")}
    assert drained, "host a closed nobody with 1001"
    resumed = {player for player, _, _ in events(result, "resumed:")}
    assert drained <= resumed  # each came back through the balancer: to host b, the only one
    assert events(result, "gave_up") == []
    assert len(result.players) >= 100 and sum(p.outcome == "matched" for p in result.players) > 50


@pytest.mark.parametrize("lost", ["supervisor", "host"])
async def test_sigkill_under_load_players_resume_through_the_balancer_and_nothing_is_left(
    edge: EdgeFactory, admin: aioredis.Redis, redis_url: str, start_game_server: GameServerFactory,
    tmp_path: Path, lost: str,
) -> None:
    """``supervisor``: SIGKILL to host a's supervisor (its worker is told by the kernel and
    drains by itself). ``host``: its worker is SIGKILLed too, as if the machine died."""
    e = await edge(**ENV)
    await start_game_server()
    running = asyncio.create_task(run(load(e, tmp_path, redis_url, final_batch=10)))
    await players_on(admin, e, "a", 20)
    a = e.hosts["a"]
    assert a.proc is not None
    victims = [pid for wid, pid in (await wait_workers(admin, 2)).items() if e.workers[wid] == "a"]
    a.proc.kill()
    if lost == "host":
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    result = await running

    # Zero violations: no double match, every outcome consistent, every resume in its place,
    # nothing left in Redis after the graces, and a clean batch afterwards matched in full.
    assert result.violations == [], result.violations[:5]
    assert result.final_batch is not None and result.final_batch.matched == 10
    assert result.leftover_keys == []
    assert not any(alive(pid) for pid in victims)
    ended = {player for player, _, _ in events(result, "drop:")}
    assert ended, "host a's players kept their connections"
    resumed = {player for player, _, _ in events(result, "resumed")}
    assert ended <= resumed and events(result, "gave_up") == []
