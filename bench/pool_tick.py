"""One TryMatch tick over a pool of waiting players, with the longest Redis call (SLOWLOG)."""

from __future__ import annotations

import random
import time
from typing import Any

from server.app.lease import Lease
from server.app.trymatch import TryMatch
from server.config import RedisConfig, load_config
from server.matching import tickets
from server.matching.tickets import Ticket
from server.store import keys
from server.store.client import RedisClient
from server.store.embedded import EmbeddedRedis
from server.store.matches import MatchStore

MODE = "1v1"


async def fill(client: RedisClient, size: int, seed: int = 3) -> None:
    """Queued players as enqueue.lua leaves them, written in bulk (bench set-up only)."""
    rng = random.Random(seed)
    redis = client.redis
    now_s, _ = await redis.time()
    now = int(now_s) * 1000
    for start in range(0, size, 5000):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, min(start + 5000, size)):
            player, queued = f"pool{i}", now - rng.randint(0, 60_000)
            pipe.hset(keys.player(player), mapping={"state": "queued", "mode": MODE,
                      "queued_at": queued, "worker": "bench", "conn": f"c{i}"})
            pipe.zadd(keys.queue(MODE), {player: queued})
            pipe.hset(keys.tickets(MODE), player, tickets.encode(Ticket(round(rng.gauss(1500, 300)), queued)))
        await pipe.execute()


async def measure(size: int) -> dict[str, Any]:
    config = load_config(environ={})
    with EmbeddedRedis() as server:
        client = RedisClient(server.url, RedisConfig(operation_timeout_s=10))
        await fill(client, size)
        matches = MatchStore(client)
        lease = Lease(matches, MODE, "bench", 60_000)
        assert await lease.acquire()
        trymatch = TryMatch(MODE, config.modes[MODE], config.matching, matches, lease)
        await client.redis.config_set("slowlog-log-slower-than", 0)
        await client.redis.config_set("slowlog-max-len", 100_000)
        await client.redis.slowlog_reset()
        started = time.perf_counter()
        plans, _ = await trymatch.plan()
        planned = time.perf_counter()
        committed = await trymatch.commit(lease.token or "", plans, time.monotonic())
        finished = time.perf_counter()
        log = await client.redis.slowlog_get(100_000)
        by_sha = client.script_names()
        longest = max(log, key=lambda e: e["duration"])
        cmd = longest["command"].split()
        name = by_sha.get(cmd[1].decode() if isinstance(cmd[1], bytes) else str(cmd[1]), cmd[0]) \
            if len(cmd) > 1 else cmd[0]
        await client.close()
    return {
        "pool": size,
        "plan_ms": round((planned - started) * 1000, 1),
        "tick_ms": round((finished - started) * 1000, 1),
        "matches": committed,
        "planned_matches": len(plans),
        "redis_calls": len(log),
        "longest_call_ms": round(longest["duration"] / 1000, 2),
        "longest_call": str(name),
    }
