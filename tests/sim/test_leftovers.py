"""The simulator's leftover check (DESIGN invariant 6) against a real Redis: a worker that is
gone may not leave its registry entry or its player set behind."""

from __future__ import annotations

import redis.asyncio as aioredis

from server.sim.leftovers import leftover_keys
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


async def test_a_simulated_player_left_in_a_live_workers_set_is_a_leftover(admin: aioredis.Redis) -> None:
    """Redis deletes an empty set: once every simulated player left, a live worker's set that
    still names one of them leaked it. A real player on a shared server is not judged."""
    seconds, _ = await admin.time()
    await admin.zadd(keys.workers(), {"w-live": seconds * 1000 + 60_000})
    await admin.sadd(keys.worker_players("w-live"), "sim1-3", "someone-real")
    simulated = {"sim1-3", "sim1-4"}
    assert await leftover_keys(admin, 0, simulated) == [
        f"{keys.worker_players('w-live')} member sim1-3 (a simulated player, after every one left)"]
    await admin.srem(keys.worker_players("w-live"), "sim1-3")
    assert await leftover_keys(admin, 0, simulated) == []  # the real player may stay


async def test_a_key_that_may_stay_because_it_expires_must_have_a_ttl(admin: aioredis.Redis) -> None:
    penalty, hold, fails = keys.penalty("sim1-3"), keys.hold("1v1"), keys.hold_failures("1v1")
    await admin.zadd(penalty, {"m1": 1})
    await admin.set(hold, "allocation_failed")
    await admin.set(fails, 1, px=60_000)  # this one expires: it may stay
    assert await leftover_keys(admin, 0) == [f"{k} (no TTL: it would never expire)"
                                             for k in sorted((penalty, hold))]
    await admin.pexpire(penalty, 60_000)
    await admin.pexpire(hold, 60_000)
    assert await leftover_keys(admin, 0) == []
