"""``fastmatch bench-tick``: what one mode's TryMatch tick costs on a big pool (issue 10).

A private Redis is filled with N waiting players, then a leader ticks while players join and
leave through the real scripts between ticks, as they would in production. Two shapes:

- steady (default): ratings spread so that nobody in the pool is matchable; each tick a
  FRACTION of the pool changes (half joins, half leaves), and one joiner in ten takes the
  rating of a waiting player, so a few matches form. Prints tick p50/p99 and the first tick
  (a new leader's full load).
- ``--matchable``: everyone has the same rating; ticks run back to back until the pool is
  empty. Prints how long committing everyone took and the players committed per second.

Every Redis call after the fill that takes over 0.1 ms is timed by Redis itself (SLOWLOG); the
longest is reported with its script. With ``--probe``, a separate process times another
client's small reads meanwhile (``other_client``): what a player's script waits behind the
leader's work. One JSON line on stdout, with the machine and the date.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.app.lease import Lease
from server.app.trymatch import TryMatch
from server.config import Config, RedisConfig
from server.matching import kernel, tickets
from server.matching.tickets import Ticket
from server.osutil import machine
from server.quantile import nearest_rank
from server.store import keys
from server.store.client import RedisClient, as_str, to_int
from server.store.embedded import EmbeddedRedis
from server.store.matches import MatchStore
from server.store.players import PlayerStore

_FILL_BATCH = 5000  # players per pipelined fill call
_WORKER = "bench"  # the players' worker: nobody listens, as when a worker is busy elsewhere


@dataclass(frozen=True, slots=True)
class TickBench:
    players: int
    churn: float  # share of the pool that joins or leaves per tick (steady shape)
    mode: str = "1v1"
    ticks: int = 50  # measured ticks (steady shape)
    matchable: bool = False
    probe: bool = False  # time another client's reads meanwhile (server/app/benchprobe.py)
    id_length: int = 0  # pad player ids to this many characters (0: short ids like pool123)
    seed: int = 7


async def run_bench(config: Config, bench: TickBench) -> dict[str, Any]:
    mode = config.modes[bench.mode]
    # Far enough apart that no window ever spans two of them (the pool stays unmatchable).
    spacing = 2 * mode.window_max + 1
    with EmbeddedRedis() as server:
        client = RedisClient(server.url, RedisConfig(operation_timeout_s=30))
        try:
            now = await _redis_ms(client)
            ratings = ([mode.default_rating] * bench.players if bench.matchable
                       else [spacing * i for i in range(bench.players)])
            await _fill(client, bench.mode, ratings, now, mode.max_wait_ms // 2, bench.id_length)
            # Calls over 0.1 ms are kept (the commands inside scripts are logged too: keeping
            # every one would cost Redis gigabytes on a big run).
            await client.command("CONFIG", "SET", "slowlog-log-slower-than", 100)
            await client.command("CONFIG", "SET", "slowlog-max-len", 100_000)
            await client.command("SLOWLOG", "RESET")
            matches = MatchStore(client)
            lease = Lease(matches, bench.mode, "bench", 60_000)
            if not await lease.acquire():
                raise RuntimeError("bench: no lease on a private Redis")
            trymatch = TryMatch(bench.mode, mode, config.matching, matches, lease)
            other: dict[str, Any] = {}
            async with _probe(server.url if bench.probe else None, other):
                if bench.matchable:
                    out = await _drain(trymatch, lease.token or "", bench.players)
                else:
                    out = await _steady(client, trymatch, lease.token or "", bench, ratings)
            if bench.probe:
                out["other_client"] = other
            longest_ms, longest = await _longest_call(client)
        finally:
            await client.close()
    return {
        "players": bench.players, **out,
        "longest_redis_call_ms": longest_ms, "longest_redis_call": longest,
        "mode": bench.mode, "id_length": bench.id_length or None,
        "churn": bench.churn if not bench.matchable else None,
        "pool": "compiled" if kernel.compiled_pool is not None else "python",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }


async def _steady(
    client: RedisClient, trymatch: TryMatch, token: str, bench: TickBench, ratings: list[float],
) -> dict[str, Any]:
    rng = random.Random(bench.seed)
    store = PlayerStore(client, _WORKER, 60_000)
    waiting = [_player("pool", i, bench.id_length) for i in range(bench.players)]
    rating_of = dict(zip(waiting, ratings, strict=True))
    started = time.perf_counter()
    committed = await trymatch.run(token)  # a new leader: the full load
    first_ms = (time.perf_counter() - started) * 1000
    per_side = max(int(bench.players * bench.churn / 2), 1)
    fresh = max(ratings, default=0.0) + 10_000
    ticks: list[float] = []
    serial = 0
    for _ in range(bench.ticks):
        leaving = [waiting.pop(rng.randrange(len(waiting))) for _ in range(min(per_side, len(waiting)))]
        joining = []
        for _ in range(per_side):
            serial += 1
            name = _player("join", serial, bench.id_length)
            if waiting and rng.random() < 0.1:  # a partner for someone waiting: a match forms
                rating_of[name] = rating_of[rng.choice(waiting)]
            else:
                fresh += 2 * trymatch.mode.window_max + 1
                rating_of[name] = fresh
            joining.append(name)
        await asyncio.gather(*(store.dequeue(p, f"{p}-c", bench.mode) for p in leaving),
                             *(_join(store, p, bench.mode, rating_of[p]) for p in joining))
        waiting.extend(joining)
        started = time.perf_counter()
        committed += await trymatch.run(token)
        ticks.append((time.perf_counter() - started) * 1000)
    players_committed = committed * trymatch.mode.match_size
    return {
        "tick_p50_ms": round(statistics.median(ticks), 2),
        "tick_p99_ms": round(_percentile(ticks, 0.99), 2),
        "first_tick_ms": round(first_ms, 1),
        "commits_per_s": round(players_committed / (sum(ticks) / 1000), 1) if ticks else 0.0,
        "ticks": len(ticks), "changes_per_tick": 2 * per_side, "matches": committed,
        "pool_loads": trymatch.loads,
    }


async def _drain(trymatch: TryMatch, token: str, players: int) -> dict[str, Any]:
    """Ticks back to back until every player is committed (at most a minute)."""
    ticks: list[float] = []
    committed = 0
    started = time.perf_counter()
    size = trymatch.mode.match_size
    while committed * size <= players - size and time.perf_counter() - started < 60:
        tick_started = time.perf_counter()
        committed += await trymatch.run(token)
        ticks.append((time.perf_counter() - tick_started) * 1000)
    elapsed = time.perf_counter() - started
    players_committed = committed * trymatch.mode.match_size
    return {
        "tick_p50_ms": round(statistics.median(ticks), 2),
        "tick_p99_ms": round(_percentile(ticks, 0.99), 2),
        "first_tick_ms": round(ticks[0], 1),
        "commits_per_s": round(players_committed / elapsed, 1),
        "all_committed_ms": round(elapsed * 1000, 1),
        "ticks": len(ticks), "matches": committed, "players_committed": players_committed,
        "pool_loads": trymatch.loads,
    }


async def _join(store: PlayerStore, player: str, mode: str, rating: float) -> None:
    await store.attach(player, f"{player}-c")
    await store.enqueue(player, f"{player}-c", mode, rating, {})


async def _fill(
    client: RedisClient, mode: str, ratings: list[float], now: int, span_ms: int, id_length: int,
) -> None:
    """Queued players as attach + enqueue leave them, written in bulk (set-up only: the first
    tick is a full load, which is what a new leader meets). They queued over the last
    ``span_ms``, in order, as if they had arrived at an even rate; half the longest wait, so
    that nobody's window opens to everyone during the bench."""
    for start in range(0, len(ratings), _FILL_BATCH):
        commands: list[list[str | bytes | int | float]] = []
        for i in range(start, min(start + _FILL_BATCH, len(ratings))):
            player = _player("pool", i, id_length)
            queued = now - span_ms + span_ms * i // len(ratings)
            commands.append(["HSET", keys.player(player), "state", "queued", "mode", mode,
                             "queued_at", queued, "worker", _WORKER, "conn", f"{player}-c"])
            commands.append(["SADD", keys.worker_players(_WORKER), player])
            commands.append(["ZADD", keys.queue(mode), queued, player])
            commands.append(["HSET", keys.tickets(mode), player,
                             tickets.encode(Ticket(ratings[i], queued))])
        await client.pipeline("fill", commands)


@contextlib.asynccontextmanager
async def _probe(url: str | None, into: dict[str, Any]) -> AsyncIterator[None]:
    """Another client reading from ``url`` while the block runs; its waits land in ``into``."""
    if url is None:
        yield
        return
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.app.benchprobe", url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() != b"ready":
            raise RuntimeError("bench probe did not start")
        yield
        proc.stdin.close()
        line = await asyncio.wait_for(proc.stdout.readline(), 60)  # it stalls 30 s at most
        if not line:
            raise RuntimeError(f"bench probe failed (exit {await proc.wait()}); see its stderr")
        into.update(json.loads(line))
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


def _player(prefix: str, serial: int, length: int) -> str:
    """A player id; padded to ``length`` (ids may be up to 64 characters) to see what long ids
    cost the scripts and the changes reads."""
    name = f"{prefix}{serial}"
    return f"{name}-".ljust(length, "x") if length else name


async def _redis_ms(client: RedisClient) -> int:
    reply = await client.command("TIME")
    if not isinstance(reply, list) or len(reply) != 2:
        raise RuntimeError(f"TIME replied {reply!r}")
    return to_int(reply[0]) * 1000 + to_int(reply[1]) // 1000


async def _longest_call(client: RedisClient) -> tuple[float, str]:
    """The longest call in SLOWLOG (microseconds as Redis measured them) and what it was."""
    entries = await client.command("SLOWLOG", "GET", 100_000)
    if not isinstance(entries, list) or not entries:
        return 0.0, ""
    worst = max((e for e in entries if as_str(e[3][0]).upper() != "SLOWLOG"),
                key=lambda e: to_int(e[2]), default=None)
    if worst is None:
        return 0.0, ""
    args = worst[3]
    name = as_str(args[0]).upper()
    if name == "EVALSHA" and len(args) > 1:
        name = client.script_names().get(as_str(args[1]), name)
    return round(to_int(worst[2]) / 1000, 2), name


def _percentile(values: list[float], q: float) -> float:
    return nearest_rank(sorted(values), q) if values else 0.0
