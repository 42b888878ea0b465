"""Drive a run: arrivals at a rate or ramp, live progress, sampling, the invariant checks."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from server.sim.checker import cross_check
from server.sim.player import PlayerResult, SimSettings, play
from server.sim.stats import Sampler
from server.sim.tokens import TokenMinter
from server.store import keys


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


@dataclass
class RunResult:
    config: RunConfig
    players: list[PlayerResult] = field(default_factory=list)
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


Progress = Callable[[RunResult, int, float], None]


async def run(cfg: RunConfig, progress: Progress | None = None) -> RunResult:
    result = RunResult(cfg)
    rng = random.Random(cfg.seed)
    names, weights = list(cfg.mix), list(cfg.mix.values())
    admin = aioredis.Redis.from_url(cfg.redis_url, decode_responses=True)
    t0 = time.monotonic()
    tasks: set[asyncio.Task[PlayerResult]] = set()
    tokens = TokenMinter(cfg.settings.secret)
    steady_from, cpu_at_steady = cfg.duration_s * 0.1, -1.0
    sampling = asyncio.create_task(_sample(admin, result, t0) if cfg.sample else _idle())

    def finished(task: asyncio.Task[PlayerResult]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is None:
            result.players.append(task.result())

    spawned = 0
    try:
        while (elapsed := time.monotonic() - t0) < cfg.duration_s:
            due = int(_arrived(cfg, elapsed))
            while spawned < due:
                behaviour = rng.choices(names, weights)[0]
                task = asyncio.create_task(play(cfg.settings, tokens, f"sim{cfg.seed}-{spawned}",
                                                behaviour, random.Random(rng.random()), t0))
                task.add_done_callback(finished)
                tasks.add(task)
                spawned += 1
            if progress is not None:
                progress(result, len(tasks), elapsed)
            if cpu_at_steady < 0 and elapsed >= steady_from:
                steady_from, cpu_at_steady = elapsed, _cpu_s()
            # Sleep until the next arrival is due, but release arrivals at most once a tick:
            # on a VM each wake-up of an idle process costs ~0.1 ms of CPU, and players that
            # arrive together share the wake-ups of their handshakes and answers.
            await asyncio.sleep(min(max(_due_at(cfg, spawned + 1) - elapsed, cfg.arrival_tick_s), 0.25))
        result.arrivals_s = time.monotonic() - t0
        if cpu_at_steady >= 0:
            result.client_cpu_s = _cpu_s() - cpu_at_steady
        while tasks:  # every player ends by itself within its lifetime
            if progress is not None:
                progress(result, len(tasks), time.monotonic() - t0)
            await asyncio.wait(tasks, timeout=0.5)
        result.elapsed_s = time.monotonic() - t0
        if cpu_at_steady >= 0:
            result.client_lifecycles = sum(
                1 for p in result.players
                if p.t_match_found is not None and steady_from <= p.t_match_found <= result.arrivals_s)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    await admin.aclose()
    if cfg.check_leftovers:
        await check(result)
    return result


async def check(result: RunResult) -> None:
    """Every invariant over the whole run (after merging the processes of a --procs run)."""
    result.violations = [v for p in result.players for v in p.violations]
    result.violations += cross_check((p.player, p.sessions) for p in result.players)
    admin = aioredis.Redis.from_url(result.config.redis_url, decode_responses=True)
    try:
        result.leftover_keys = await _leftovers(admin, result.config.leftover_wait_s)
    finally:
        await admin.aclose()
    result.violations += [f"leftover key {k}" for k in result.leftover_keys]


def merge(parts: list[RunResult]) -> RunResult:
    """One result from the processes of a run; sampling came from the first one."""
    merged = parts[0]
    for part in parts[1:]:
        merged.players.extend(part.players)
        merged.elapsed_s = max(merged.elapsed_s, part.elapsed_s)
        merged.arrivals_s = max(merged.arrivals_s, part.arrivals_s)
        merged.client_cpu_s += part.client_cpu_s
        merged.client_lifecycles += part.client_lifecycles
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


async def _sample(admin: aioredis.Redis, result: RunResult, t0: float) -> None:
    last: tuple[float, int] | None = None
    while True:
        now = time.monotonic() - t0
        with contextlib.suppress(Exception):
            workers = [str(w) for w in await admin.zrange(keys.WORKERS, 0, -1)]
            pids = {f"worker {w.rsplit('-', 2)[1]}": int(w.rsplit("-", 2)[1]) for w in workers}
            info = await admin.info("stats")
            result.sampler.sample(pids, now)
            total = int(info["total_commands_processed"])
            if last is not None and now > last[0]:
                result.redis_ops.append((now, (total - last[1]) / (now - last[0])))
            last = (now, total)
        await asyncio.sleep(1.0)


async def _leftovers(admin: aioredis.Redis, wait_s: float) -> list[str]:
    """DESIGN invariant 6: once every player left and the timeouts passed, nothing remains."""
    deadline = time.monotonic() + wait_s
    while True:
        names = [str(k) for k in await admin.keys("*")]
        found = sorted(k for k in names if not keys.outlives_players(k))
        if not found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.25)
