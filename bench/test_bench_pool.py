"""The leader's pool (issue 10): one tick over 100,000 waiting players with 1% churn.

    make bench PYTEST_ARGS="-k pool -s"

A tick is what the leader's kernel does each tick: apply the changes since the last tick,
take the candidates, pair them. Ratings are spread (uniform over 0..1e9, about 10,000 apart on
average; windows reach 400) so few players are matchable, and every tick scans the whole
pool: the steady state of a big, sparse mode. Each tick 1% of the pool changes: 45% of it
joins, 40% leaves, 5% is requeued with its original queued_at (into the middle of the queue
order), 5% disconnects (grace on) and those of the tick before resume (grace off); the players
matched last tick are removed too (the commit's changes).
"""

from __future__ import annotations

import random
import statistics
import time
from array import array
from types import ModuleType
from typing import Any

import pytest

from server.config import ModeConfig
from server.matching import kernel, kernel_py, tickets
from server.matching.changes import Added, Change, GraceOff, GraceOn, Removed
from server.matching.pool import Pool
from server.matching.tickets import Ticket

NOW = 1_800_000_000_000
PLAYERS = 100_000
CHURN = 0.01
TICK_MS = 100
MODES = {
    "1v1": ModeConfig(team_size=1, teams=2, window_base=50, window_growth_per_s=25, window_max=400,
                      max_wait_s=60),
    "5v5": ModeConfig(team_size=5, teams=2, window_base=50, window_growth_per_s=25, window_max=400,
                      max_wait_s=60),
}
CORES = kernel.pool_cores()
PAIRS: dict[str, ModuleType] = {"python": kernel_py, "cython": kernel.compiled_kernel or kernel_py}


class Churn:
    """The queue's changes, tick after tick (the per-mode stream as the leader reads it)."""

    def __init__(self, size: int, seed: int = 5) -> None:
        self.rng = random.Random(seed)
        self.now = NOW
        self.serial = 0
        self.queued: dict[str, bytes] = {}
        self.order: list[str] = []  # queued players, for picking at random
        self.graced: set[str] = set()
        self.left: list[tuple[str, bytes]] = []  # players out of the queue, with their ticket
        self.matched: list[str] = []
        for _ in range(size):
            self.join(self.now - self.rng.randint(0, 50_000))

    def join(self, queued_at: int) -> tuple[str, bytes]:
        self.serial += 1
        player = f"player-{self.serial}"
        raw = tickets.encode(Ticket(float(self.rng.randrange(1_000_000_000)), queued_at, {"region": "eu"}))
        self.queued[player] = raw
        self.order.append(player)
        return player, raw

    def snapshot(self) -> tuple[list[str], list[bytes | None]]:
        """The whole queue in queue order, as the leader's full read returns it."""
        players = sorted(self.queued, key=lambda p: (tickets.decode(self.queued[p]).queued_at_ms, p))
        return players, [self.queued[p] for p in players]

    def pick(self) -> str:
        while True:
            i = self.rng.randrange(len(self.order))
            player = self.order[i]
            self.order[i] = self.order[-1]
            self.order.pop()
            if player in self.queued:
                return player

    def tick(self) -> list[Change]:
        self.now += TICK_MS
        n = int(len(self.queued) * CHURN)
        batch: list[Change] = [Removed(p) for p in self.matched if self.queued.pop(p, None)]
        resumed = sorted(self.graced)  # disconnected last tick: they resume this tick
        for _ in range(n * 45 // 100):
            batch.append(Added(*self.join(self.now - self.rng.randint(0, 50))))
        for _ in range(n * 40 // 100):
            player = self.pick()
            self.left.append((player, self.queued.pop(player)))
            self.graced.discard(player)
            batch.append(Removed(player))
        for _ in range(n * 5 // 100):
            player, raw = self.left.pop(self.rng.randrange(len(self.left)))
            self.queued[player] = raw
            self.order.append(player)
            batch.append(Added(player, raw))
        for _ in range(n * 5 // 100):
            player = self.pick()
            self.order.append(player)
            if player not in self.graced:
                self.graced.add(player)
                batch.append(GraceOn(player))
        for player in resumed:
            if player in self.graced:
                self.graced.discard(player)
                batch.append(GraceOff(player))
        return batch


def run_ticks(impl: str, mode: ModeConfig, benchmark: Any, rounds: int) -> dict[str, list[float]]:
    churn = Churn(PLAYERS)
    pool = Pool(CORES[impl]())
    players, raws = churn.snapshot()
    started = time.perf_counter()
    pool.load(players, raws)
    load_s = time.perf_counter() - started
    pair = PAIRS[impl].pair
    parts: dict[str, list[float]] = {"apply": [], "candidates": [], "pair": [], "matches": []}

    def tick(changes: list[Change]) -> array[int]:
        t0 = time.perf_counter()
        pool.apply(changes)
        t1 = time.perf_counter()
        cands = pool.candidates()
        t2 = time.perf_counter()
        flat = pair(cands.ratings, cands.queued, churn.now, mode.team_size, mode.teams, mode.window_base,
                    mode.window_growth_per_s, mode.window_max, mode.max_wait_ms)
        t3 = time.perf_counter()
        parts["apply"].append(t1 - t0)
        parts["candidates"].append(t2 - t1)
        parts["pair"].append(t3 - t2)
        parts["matches"].append(len(flat) / mode.match_size)
        churn.matched = [cands.players[cands.index[c]] for c in flat]
        return flat

    tick(churn.tick())  # the first tick matches the few close pairs of the initial pool
    parts = {name: [] for name in parts}
    parts["load"] = [load_s]
    benchmark.pedantic(tick, setup=lambda: ((churn.tick(),), {}), rounds=rounds, iterations=1)
    assert len(pool) == len(churn.queued) and pool.matchable == len(churn.queued) - len(churn.graced)
    return parts


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", list(CORES))
def test_pool_tick_100k_1pct_churn(benchmark: Any, capsys: pytest.CaptureFixture[str], impl: str,
                                   mode: str) -> None:
    parts = run_ticks(impl, MODES[mode], benchmark, rounds=100 if impl == "cython" else 3)
    ticks = sorted(a + c + p for a, c, p in zip(parts["apply"], parts["candidates"], parts["pair"],
                                                strict=True))
    ms = {name: statistics.median(values) * 1000 for name, values in parts.items() if name != "matches"}
    p50, p99 = ticks[len(ticks) // 2] * 1000, ticks[len(ticks) * 99 // 100] * 1000
    with capsys.disabled():
        print(f"\npool tick {impl:6} {mode}: {PLAYERS} players, {CHURN:.0%} churn, {len(ticks)} ticks: "
              f"p50 {p50:.2f} ms, p99 {p99:.2f} ms "
              f"(medians: apply {ms['apply']:.2f} + candidates {ms['candidates']:.2f} "
              f"+ pair {ms['pair']:.2f}; {statistics.mean(parts['matches']):.0f} matches a tick); "
              f"load of the 100k snapshot {ms['load']:.0f} ms")
