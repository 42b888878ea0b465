"""The run's bookkeeping: every player spawned is a player simulated, crashed or not, and the
live progress line reads running counters instead of walking every finished player."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import redis.asyncio as aioredis

from server.app.worker import Worker
from server.config import DEV_SECRET
from server.sim.cli import progress_line
from server.sim.playing import PlayerResult, SimSettings
from server.sim.runner import RunConfig, RunResult, check, run
from server.store import keys
from tests.conftest import GameServerFactory
from tests.helpers import TIMEOUT


def settings() -> SimSettings:
    return SimSettings(url="ws://127.0.0.1:1/ws", secret=DEV_SECRET, lifetime_s=1.0)


async def test_a_crashed_player_is_counted_and_reported(redis_url: str) -> None:
    """A player task that raises (here: a behaviour the simulator does not have, a bug of its
    own) is one of the players simulated, with outcome `crashed`, and a violation."""
    cfg = RunConfig(settings=settings(), redis_url=redis_url, rate=1e6, duration_s=0.5,
                    mix={"no_such_behaviour": 1.0}, max_players=3, sample=False, leftover_wait_s=0)
    result = await run(cfg)
    assert [(p.player, p.behaviour, p.outcome) for p in sorted(result.players, key=lambda p: p.player)] \
        == [(f"sim1-{n}", "no_such_behaviour", "crashed") for n in range(3)]
    assert len(result.crashes) == 3
    assert len([v for v in result.violations if v.startswith("simulated player crashed: sim1-")]) == 3
    assert (result.tally.done, result.tally.matched, result.tally.violations) == (3, 0, 3)


class _Unwalkable(list[PlayerResult]):
    """The players of a long run: a walk over them per progress tick is what must not happen."""

    def __iter__(self) -> Iterator[PlayerResult]:
        raise AssertionError("the progress line walked every finished player")


def test_the_progress_line_reads_running_counters() -> None:
    result = RunResult(RunConfig(settings=settings(), redis_url="", rate=1, duration_s=1, mix={}))
    result.finished(PlayerResult("a", "normal", outcome="matched"))
    result.finished(PlayerResult("b", "normal", outcome="matched", violations=["b: x", "b: y"]))
    result.finished(PlayerResult("c", "afk", outcome="loading_timeout"))
    result.crashed(PlayerResult("d", "normal"), "RuntimeError()")
    result.players = _Unwalkable(result.players)
    assert progress_line(result, 5, 2.0) == "t=  2.0s  active=5  done=4  matched=2  violations=3"


async def test_a_run_against_a_real_worker_is_judged_over_its_steady_window(
        worker: Worker, start_game_server: GameServerFactory, admin: aioredis.Redis,
        redis_url: str) -> None:
    """Plain players of one rating, in pairs: nothing violated or left, messages counted as they
    went (so over the steady window, at most all of them), and a simulated player put back into
    the live worker's set afterwards is found by the run's check."""
    await start_game_server()
    cfg = RunConfig(settings=replace(settings(), url=f"ws://127.0.0.1:{worker.front.port}/ws",
                                     lifetime_s=TIMEOUT * 2, rating_sd=0.0, redis_url=redis_url),
                    redis_url=redis_url, rate=20, duration_s=3.0, mix={"normal": 1.0},
                    max_players=10, leftover_wait_s=TIMEOUT)
    result = await run(cfg)
    assert result.violations == [] and result.leftover_keys == [], result.violations[:5]
    since, until = result.steady_s
    assert 0.3 <= since < until == result.arrivals_s
    messages = sum(p.sent + p.received for p in result.players)
    assert 0 < result.steady_messages_per_s * (until - since) <= messages
    [worker_id] = [str(w) for w in await admin.zrange(keys.workers(), 0, -1)]
    await admin.sadd(keys.worker_players(worker_id), "sim1-0")
    again = replace(result, config=replace(cfg, leftover_wait_s=0))
    await check(again)
    assert again.violations == [f"leftover key {keys.worker_players(worker_id)} member sim1-0 "
                                "(a simulated player, after every one left)"]
