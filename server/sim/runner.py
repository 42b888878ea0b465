"""Drive a run: arrivals at a rate or ramp, faults on schedule, live progress, sampling, the
invariant checks, and after a run with faults a final clean batch that must complete fully."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final

import redis.asyncio as aioredis

from server.sim.checker import cross_check, missed_matches
from server.sim.facts import Facts
from server.sim.faults import Applied, Fault, Injector, Target
from server.sim.leftovers import leftover_keys
from server.sim.player import PlayerResult, SimSettings, Traffic, play
from server.sim.stats import Sampler
from server.sim.tokens import TokenMinter
from server.store import keys, sentinel


@dataclass(frozen=True)
class RunConfig:
    settings: SimSettings
    redis_url: str
    rate: float  # arrivals per second (after the ramp)
    duration_s: float
    mix: dict[str, float]
    ramp_s: float = 0.0
    seed: int = 1
    leftover_wait_s: float = 20.0  # resume grace + ready/allocation deadlines + record TTL
    check_leftovers: bool = True
    sample: bool = True  # sample server CPU/memory and Redis (one process of a --procs run)
    arrival_tick_s: float = 0.1  # arrivals due within a tick start together (the match tick)
    prefix: str = "sim"  # player ids are <prefix><seed>-<n>
    faults: tuple[Fault, ...] = ()  # applied to `target` (a --serve run)
    final_batch: int = 0  # after the run: this many plain players who must all be matched
    max_players: int = 0  # stop arrivals at this many (0: no cap)


@dataclass
class FinalBatch:
    """The clean batch after a run with faults: matching works again, for everyone."""

    players: int
    matched: int
    outcomes: dict[str, int]


@dataclass
class Tally:
    """Running counts for the live progress line, kept as players finish (never recounted)."""

    done: int = 0
    matched: int = 0
    violations: int = 0  # the players' own, and one per crashed player

    def add(self, other: Tally) -> None:
        self.done += other.done
        self.matched += other.matched
        self.violations += other.violations


@dataclass
class RunResult:
    config: RunConfig
    players: list[PlayerResult] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    elapsed_s: float = 0.0
    arrivals_s: float = 0.0
    sampler: Sampler = field(default_factory=Sampler)
    redis_ops: list[tuple[float, float]] = field(default_factory=list)  # (t, commands/s)
    violations: list[str] = field(default_factory=list)
    leftover_keys: list[str] = field(default_factory=list)
    # The load generator's own CPU (user + system, this process) over the steady window, and
    # the lifecycles completed in it: what one simulated player costs the client side.
    client_cpu_s: float = 0.0
    client_lifecycles: int = 0
    # The steady window (run times): from the end of the ramp (and no sooner than a tenth of
    # --duration in) until arrivals stop. Rates and means the report gives are read over it; after
    # it the players still running end one by one, and figures over that tail read low.
    steady_s: tuple[float, float] = (0.0, 0.0)
    steady_messages_per_s: float = 0.0  # both ways, all players of the run (every process)
    faults: list[Applied] = field(default_factory=list)
    final_batch: FinalBatch | None = None
    missed_matches: int = 0  # found for a player while its connection was down (checker.py)
    crashes: list[str] = field(default_factory=list)  # players whose task raised
    # How late the generator's own event loop ran a timer, every LAG_PERIOD_S (ms): the part
    # of the client-side waits (e.g. handshakes) that is the generator's, not the server's.
    client_lag_ms: list[float] = field(default_factory=list)

    def finished(self, player: PlayerResult) -> None:
        self.players.append(player)
        self.tally.done += 1
        if player.outcome == "matched":
            self.tally.matched += 1
        self.tally.violations += len(player.violations)

    def crashed(self, player: PlayerResult, why: str) -> None:
        """A player whose task raised or was cancelled: still one of the players simulated (the
        totals match the arrivals), and a violation (:func:`check`), since it is a bug here."""
        player.outcome = "crashed"
        self.crashes.append(f"{player.player}: {why}")
        self.finished(player)
        self.tally.violations += 1


LAG_PERIOD_S: Final = 0.05


Progress = Callable[[RunResult, int, float], None]


async def run(cfg: RunConfig, progress: Progress | None = None,
              target: Target | None = None) -> RunResult:
    result = RunResult(cfg)
    keys.configure(cfg.redis_url)
    admin = sentinel.async_client(cfg.redis_url, decode_responses=True)
    t0 = time.monotonic()
    facts = Facts(cfg.redis_url, cfg.settings.mode)
    injector = Injector(list(cfg.faults), target, facts, t0, cfg.seed) if target and cfg.faults else None
    stop = asyncio.Event()
    background = [asyncio.create_task(injector.run() if injector else _idle()),
                  asyncio.create_task(_sample(admin, result, t0, stop) if cfg.sample else _idle()),
                  asyncio.create_task(_watch_lag(result.client_lag_ms, stop))]
    try:
        await _play_all(cfg, result, t0, facts, progress)
    finally:
        stop.set()
        for task in background:  # a freeze still on is thawed by its cancellation
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await facts.aclose()
        await admin.aclose()
    if injector is not None:
        applied = {a.fault for a in injector.applied}
        result.faults = sorted(injector.applied, key=lambda a: a.started_s) + [
            Applied(f, f.at_s, f.at_s, "not applied: the run ended first")
            for f in cfg.faults if f not in applied]
    if cfg.check_leftovers:
        await check(result)
    return result


async def _play_all(cfg: RunConfig, result: RunResult, t0: float, facts: Facts,
                    progress: Progress | None) -> None:
    """Arrivals for ``duration_s``, then until every player has ended by itself."""
    rng = random.Random(cfg.seed)
    names, weights = list(cfg.mix), list(cfg.mix.values())
    tasks: set[asyncio.Task[PlayerResult]] = set()
    tokens = TokenMinter(cfg.settings.secret)
    traffic = Traffic()
    steady_from, cpu_at_steady, messages_at_steady = max(cfg.ramp_s, cfg.duration_s * 0.1), -1.0, 0

    def ended(behaviour: str, arrived: float, task: asyncio.Task[PlayerResult]) -> None:
        tasks.discard(task)
        if task.cancelled() or task.exception() is not None:  # a simulator bug: it must show
            why = "cancelled" if task.cancelled() else repr(task.exception())
            result.crashed(PlayerResult(task.get_name(), behaviour, arrived=arrived), why)
        else:
            result.finished(task.result())

    spawned = 0
    while (elapsed := time.monotonic() - t0) < cfg.duration_s:
        due = int(_arrived(cfg, elapsed))
        if cfg.max_players:
            due = min(due, cfg.max_players)
        while spawned < due:
            behaviour = rng.choices(names, weights)[0]
            name = f"{cfg.prefix}{cfg.seed}-{spawned}"
            task = asyncio.create_task(play(cfg.settings, tokens, name, behaviour,
                                            random.Random(rng.random()), t0, facts, traffic), name=name)
            task.add_done_callback(functools.partial(ended, behaviour, elapsed))
            tasks.add(task)
            spawned += 1
        if progress is not None:
            progress(result, len(tasks), elapsed)
        if cpu_at_steady < 0 and elapsed >= steady_from:
            steady_from, cpu_at_steady, messages_at_steady = elapsed, _cpu_s(), traffic.messages
        # Sleep until the next arrival is due, but release arrivals at most once a tick:
        # on a VM each wake-up of an idle process costs ~0.1 ms of CPU, and players that
        # arrive together share the wake-ups of their handshakes and answers.
        await asyncio.sleep(min(max(_due_at(cfg, spawned + 1) - elapsed, cfg.arrival_tick_s), 0.25))
    result.arrivals_s = time.monotonic() - t0
    if cpu_at_steady >= 0:
        result.client_cpu_s = _cpu_s() - cpu_at_steady
        result.steady_s = (steady_from, result.arrivals_s)
        result.steady_messages_per_s = (traffic.messages - messages_at_steady) / max(
            result.arrivals_s - steady_from, 1e-9)
    while tasks:  # every player ends by itself within its lifetime
        if progress is not None:
            progress(result, len(tasks), time.monotonic() - t0)
        await asyncio.wait(tasks, timeout=0.5)
    result.elapsed_s = time.monotonic() - t0
    if cpu_at_steady >= 0:
        result.client_lifecycles = sum(
            1 for p in result.players
            if p.t_match_found is not None and steady_from <= p.t_match_found <= result.arrivals_s)


async def check(result: RunResult) -> None:
    """Every invariant over the whole run (after merging the processes of a --procs run)."""
    keys.configure(result.config.redis_url)  # the parent of a --procs run has not run run()
    result.violations = [v for p in result.players for v in p.violations]
    result.violations += [f"simulated player crashed: {c}" for c in result.crashes]
    # Lease epochs order the ready checks of different leaders (one mode's counter: every
    # simulated player queues for the run's one mode), unless Redis lost its data.
    epochs_ordered = not any(f.kind == "restart-redis" for f in result.config.faults)
    result.violations += cross_check(((p.player, p.sessions) for p in result.players), epochs_ordered)
    result.missed_matches = missed_matches((p.player, p.sessions) for p in result.players)
    admin = sentinel.async_client(result.config.redis_url, decode_responses=True)
    try:
        simulated = {p.player for p in result.players}
        result.leftover_keys = await leftover_keys(admin, result.config.leftover_wait_s, simulated)
    finally:
        await admin.aclose()
    result.violations += [f"leftover key {k}" for k in result.leftover_keys]
    # A run that names a fault and never applied it tested something else than it says.
    result.violations += [f"fault {a.fault} {a.did}" for a in result.faults
                          if a.did.startswith(("could not be applied", "not applied"))]
    if result.config.final_batch:
        await _final_batch(result)


async def _final_batch(result: RunResult) -> None:
    """After the faults: a batch of plain players of one rating, all arriving within a second,
    must all be matched, and leave nothing behind either."""
    cfg = result.config
    n = cfg.final_batch
    settings = replace(cfg.settings, rating_sd=0.0)
    batch = await run(replace(cfg, settings=settings, rate=2.0 * n, duration_s=1.0, ramp_s=0.0,
                              mix={"normal": 1.0}, prefix="final", faults=(), final_batch=0,
                              max_players=n, sample=False))
    matched = sum(1 for p in batch.players if p.outcome == "matched")
    outcomes = Counter(p.outcome for p in batch.players)
    result.final_batch = FinalBatch(len(batch.players), matched, dict(outcomes.most_common()))
    if matched < n:
        result.violations.append(f"final batch: {matched} of {n} players matched ({dict(outcomes)})")
    result.violations += [f"final batch: {v}" for v in batch.violations]
    result.leftover_keys += batch.leftover_keys


def merge(parts: list[RunResult]) -> RunResult:
    """One result from the processes of a run; sampling came from the first one."""
    merged = parts[0]
    for part in parts[1:]:
        merged.players.extend(part.players)
        merged.tally.add(part.tally)
        merged.elapsed_s = max(merged.elapsed_s, part.elapsed_s)
        merged.arrivals_s = max(merged.arrivals_s, part.arrivals_s)
        merged.client_cpu_s += part.client_cpu_s
        merged.client_lifecycles += part.client_lifecycles
        # Each process's rate over its own window; steady_s stays the first's, which sampled.
        merged.steady_messages_per_s += part.steady_messages_per_s
        merged.crashes.extend(part.crashes)
        merged.client_lag_ms.extend(part.client_lag_ms)
    return merged


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


async def _idle() -> None:
    await asyncio.Event().wait()


def _arrived(cfg: RunConfig, t: float) -> float:
    """Players due by time t: a linear ramp to `rate` over `ramp_s`, then steady."""
    if cfg.ramp_s <= 0:
        return cfg.rate * t
    if t < cfg.ramp_s:
        return cfg.rate * t * t / (2 * cfg.ramp_s)
    return cfg.rate * (cfg.ramp_s / 2 + (t - cfg.ramp_s))


def _due_at(cfg: RunConfig, n: int) -> float:
    """When the n-th player is due: the inverse of :func:`_arrived`."""
    if cfg.rate <= 0:
        return cfg.duration_s
    if cfg.ramp_s <= 0:
        return n / cfg.rate
    if n < cfg.rate * cfg.ramp_s / 2:
        return math.sqrt(2 * cfg.ramp_s * n / cfg.rate)
    return cfg.ramp_s + n / cfg.rate - cfg.ramp_s / 2


async def _watch_lag(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        asked = loop.time()
        await asyncio.sleep(LAG_PERIOD_S)
        lags.append(round(max(loop.time() - asked - LAG_PERIOD_S, 0.0) * 1000, 1))


async def _sample(admin: aioredis.Redis, result: RunResult, t0: float, stop: asyncio.Event) -> None:
    """Once a second until ``stop``: worker CPU and memory, and Redis' command rate.

    The loop ends on ``stop``, not only on cancellation: a cancellation that lands inside a
    redis-py call can come out of it as an ordinary error (seen once at the end of a run,
    which then sampled forever instead of reporting)."""
    last: tuple[float, int] | None = None
    while not stop.is_set():
        now = time.monotonic() - t0
        with contextlib.suppress(Exception):
            workers = [str(w) for w in await admin.zrange(keys.workers(), 0, -1)]
            pids = {f"worker {w.rsplit('-', 2)[1]}": int(w.rsplit("-", 2)[1]) for w in workers}
            info = await admin.info("stats")
            result.sampler.sample(pids, now)
            total = int(info["total_commands_processed"])
            # A Redis restart (or CONFIG RESETSTAT) starts the count over: that interval's
            # delta is no rate, and is left out.
            if last is not None and now > last[0] and total >= last[1]:
                result.redis_ops.append((now, (total - last[1]) / (now - last[0])))
            last = (now, total)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await stop.wait()
