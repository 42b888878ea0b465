"""The run's bookkeeping: every player spawned is a player simulated, crashed or not, and the
live progress line reads running counters instead of walking every finished player."""

from __future__ import annotations

from collections.abc import Iterator

from server.config import DEV_SECRET
from server.sim.cli import progress_line
from server.sim.playing import PlayerResult, SimSettings
from server.sim.runner import RunConfig, RunResult, run


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
