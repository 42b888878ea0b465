"""The simulator's leftover check (DESIGN invariant 6) against a real Redis: a worker that is
gone may not leave its registry entry or its player set behind."""

from __future__ import annotations

import redis.asyncio as aioredis

from server.sim.runner import leftover_keys
from server.store import keys


async def test_a_dead_workers_entry_and_player_set_are_leftovers(admin: aioredis.Redis) -> None:
    seconds, _ = await admin.time()
    now_ms = seconds * 1000
    await admin.zadd(keys.workers(), {"w-live": now_ms + 60_000, "w-dead": now_ms - 1_000})
    for worker in ("w-live", "w-dead", "w-forgotten"):
        await admin.sadd(keys.worker_players(worker), "p")
    assert await leftover_keys(admin, 0) == [
        f"{keys.workers()} entry w-dead (past its heartbeat deadline)",
        keys.worker_players("w-dead"), keys.worker_players("w-forgotten")]
    await admin.zrem(keys.workers(), "w-dead")
    await admin.delete(keys.worker_players("w-dead"), keys.worker_players("w-forgotten"))
    assert await leftover_keys(admin, 0) == []  # a live worker's entry and set may stay
    assert keys.players_worker(keys.worker_players("w-live")) == "w-live"
    assert keys.players_worker(keys.player("w-live")) is None
