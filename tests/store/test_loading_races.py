"""Every race of PROTOCOL 4 resolves to exactly one outcome, run deterministically in each order.

The scripts are called directly in both orders (the "concurrency" of two workers is the order
in which Redis runs their scripts); the end states are then checked player by player.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from server.config import RedisConfig
from server.matching.plan import MatchPlan
from server.store import keys
from server.store.client import RedisClient
from server.store.matches import HoldTimes, LoadingStore, MatchStore, lease_token
from server.store.players import PlayerStore
from tests.helpers import TIMEOUT

# Run again against a Redis Cluster by `make test` (tests/conftest.py, --redis-topology).
pytestmark = pytest.mark.conformance

MODE = "1v1"
MATCH = "1.1.0"


@pytest.fixture
async def env(redis_url: str) -> tuple[PlayerStore, LoadingStore, MatchStore]:
    client = RedisClient(redis_url, RedisConfig(operation_timeout_s=1.0))
    players = PlayerStore(client, "w1", resume_grace_ms=60_000)
    loading = LoadingStore(client, resume_grace_ms=60_000, penalty_window_ms=60_000,
                           finished_ttl_ms=60_000, hold=HoldTimes(1000, 30_000, 1000))
    yield players, loading, MatchStore(client)  # type: ignore[misc]
    await client.close()


async def make_match(
    env: tuple[PlayerStore, LoadingStore, MatchStore], ready_timeout_ms: int
) -> dict[str, int]:
    players, _, matches = env
    queued_at = {}
    for p in ("a", "b"):
        await players.attach(p, f"{p}-c")
        queued_at[p] = (await players.enqueue(p, f"{p}-c", MODE, 1500, {})).queued_at_ms
    grant = await matches.acquire(MODE, "L", 60_000)
    result = await matches.commit(MODE, lease_token("L", grant.epoch), ready_timeout_ms,
                                  [MatchPlan(MATCH, [["a"], ["b"]])])
    assert result.committed == [MATCH]
    return queued_at


async def wait_due(loading: LoadingStore) -> None:
    async with asyncio.timeout(TIMEOUT):
        while MATCH not in await loading.due(MODE):
            await asyncio.sleep(0.002)


async def requeued_with_place(admin: aioredis.Redis, player: str, queued_at: int) -> bool:
    return (await admin.zscore(keys.queue(MODE), player) == queued_at
            and await admin.hget(keys.player(player), "state") == "queued"
            and await admin.hget(keys.tickets(MODE), player) is not None)


async def status(admin: aioredis.Redis) -> str | None:
    return await admin.hget(keys.match(MODE, MATCH), "status")


async def ready(env, player: str):  # type: ignore[no-untyped-def]
    return await env[1].ready(MODE, MATCH, player, f"{player}-c", 60_000, "w1")


async def leave(env, player: str):  # type: ignore[no-untyped-def]
    detached = await env[0].detach(player, f"{player}-c")
    assert detached.outcome == "loading" and detached.match_id == MATCH
    return await env[1].cancel(MODE, MATCH, player)


@pytest.mark.parametrize("ready_first", [True, False], ids=["ready-then-cancel", "cancel-then-ready"])
async def test_ready_vs_cancel_the_ghost_player_case(env, admin: aioredis.Redis, ready_first: bool) -> None:  # type: ignore[no-untyped-def]
    """b sends loading_complete while a disconnects: b is requeued in both orders, never stuck."""
    queued_at = await make_match(env, 60_000)
    if ready_first:
        assert (await ready(env, "b")).outcome == "ready"
        done = await leave(env, "a")
    else:
        done = await leave(env, "a")
        late = await ready(env, "b")
        assert late.outcome == "final" and late.status == "cancelled"
    assert done.outcome == "done" and done.status == "cancelled" and done.reason == "player_left"
    told = {p.player: p.what for p in done.players}
    assert told == {"a": "removed", "b": "requeued"}
    assert await status(admin) == "cancelled"
    assert await requeued_with_place(admin, "b", queued_at["b"])
    assert await admin.exists(keys.player("a")) == 0  # gone: disconnected and out of the match
    assert await admin.zcard(keys.penalty("a")) == 1


@pytest.mark.parametrize("expire_first", [True, False], ids=["timeout-then-ready", "ready-then-timeout"])
async def test_ready_vs_timeout(env, admin: aioredis.Redis, expire_first: bool) -> None:  # type: ignore[no-untyped-def]
    queued_at = await make_match(env, 1)
    await wait_due(env[1])
    assert (await ready(env, "a")).outcome == "ready"
    if expire_first:
        done = await env[1].expire(MODE, MATCH)
        assert (await ready(env, "b")).status == "timed_out"
        assert done.status == "timed_out" and {p.player: p.what for p in done.players} == {
            "a": "requeued", "b": "timed_out"}
        assert await requeued_with_place(admin, "a", queued_at["a"])
        assert await admin.hget(keys.player("b"), "state") == "idle"
        assert await admin.zcard(keys.penalty("b")) == 1 and await admin.zcard(keys.penalty("a")) == 0
    else:
        last = await ready(env, "b")
        assert last.outcome == "allocating" and sorted(last.tickets) == ["a", "b"]
        assert (await env[1].expire(MODE, MATCH)).outcome == "not_due"
        assert await status(admin) == "allocating"


@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-then-timeout", "timeout-then-cancel"])
async def test_cancel_vs_timeout(env, admin: aioredis.Redis, cancel_first: bool) -> None:  # type: ignore[no-untyped-def]
    queued_at = await make_match(env, 1)
    await wait_due(env[1])
    if cancel_first:
        assert (await leave(env, "a")).status == "cancelled"
        late = await env[1].expire(MODE, MATCH)
        assert late.outcome == "final" and late.status == "cancelled"
        assert await requeued_with_place(admin, "b", queued_at["b"])
    else:
        assert (await env[1].expire(MODE, MATCH)).status == "timed_out"
        detached = await env[0].detach("a", "a-c")
        assert detached.outcome in ("removed", "stale")  # a is already out of the match
        late = await env[1].cancel(MODE, MATCH, "a")
        assert late.outcome == "final" and late.status == "timed_out"
        assert await admin.hget(keys.player("b"), "state") == "idle"  # timed out, not requeued
    assert await admin.zscore(keys.loading(MODE), MATCH) is None


@pytest.mark.parametrize("assign_first", [True, False], ids=["assign-then-timeout", "timeout-then-assign"])
async def test_assignment_vs_timeout(env, admin: aioredis.Redis, assign_first: bool) -> None:  # type: ignore[no-untyped-def]
    queued_at = await make_match(env, 60_000)
    assert (await ready(env, "a")).outcome == "ready"
    last = await env[1].ready(MODE, MATCH, "b", "b-c", 1, "w1")  # a 1 ms allocation deadline
    assert last.outcome == "allocating"
    await wait_due(env[1])
    if assign_first:
        done = await env[1].assign(MODE, MATCH, "gs:1", "s-1")
        assert done.status == "assigned" and {p.what for p in done.players} == {"matched"}
        assert (await env[1].expire(MODE, MATCH)).status == "assigned"
        for p in ("a", "b"):
            assert await admin.hget(keys.player(p), "state") == "idle"
        assert await admin.zcard(keys.queue(MODE)) == 0
    else:
        done = await env[1].expire(MODE, MATCH)
        assert done.status == "failed" and done.reason == "allocation_failed"
        late = await env[1].assign(MODE, MATCH, "gs:1", "s-1")
        assert late.outcome == "final" and late.status == "failed"
        for p in ("a", "b"):
            assert await requeued_with_place(admin, p, queued_at[p])
    assert await admin.pttl(keys.match(MODE, MATCH)) > 0  # the record expires by itself


async def test_ready_checks_membership_and_session(env, admin: aioredis.Redis) -> None:  # type: ignore[no-untyped-def]
    await make_match(env, 60_000)
    players, loading, _ = env
    await players.attach("x", "x-c")
    assert (await loading.ready(MODE, MATCH, "x", "x-c", 1000, "w1")).outcome == "wrong_session"
    assert (await loading.ready(MODE, "9.9.9", "a", "a-c", 1000, "w1")).outcome == "unknown"
    assert (await loading.ready(MODE, MATCH, "a", "stale-conn", 1000, "w1")).outcome == "replaced"
    assert (await ready(env, "a")).outcome == "ready"
    assert (await ready(env, "a")).outcome == "ready"  # twice is harmless
    assert await admin.hget(keys.match(MODE, MATCH), "ready") == "1"


async def test_a_leaver_who_reconnected_before_the_cancel_stays_in_the_match(  # type: ignore[no-untyped-def]
    env, admin: aioredis.Redis
) -> None:
    await make_match(env, 60_000)
    players, loading, _ = env
    detached = await players.detach("a", "a-c")
    assert detached.outcome == "loading"
    back = await players.attach("a", "a-c2")  # reconnected: welcomed as loading
    assert back.player.state == "loading" and back.player.match_id == MATCH
    late = await loading.cancel(MODE, MATCH, "a")
    assert late.outcome == "final" and late.status == "loading"  # the ready check goes on
    assert await admin.zcard(keys.penalty("a")) == 0
    assert (await loading.ready(MODE, MATCH, "a", "a-c2", 60_000, "w1")).outcome == "ready"
    assert (await ready(env, "b")).outcome == "allocating"


async def test_a_match_record_gone_without_an_outcome_leaves_the_loading_set(  # type: ignore[no-untyped-def]
    env, admin: aioredis.Redis
) -> None:
    """A match hash that vanished (evicted under a maxmemory policy, deleted by hand) comes
    back from the loading set at every sweep unless its expiry takes it out (invariant 6)."""
    await make_match(env, 1)
    _, loading, _ = env
    await wait_due(loading)
    await admin.delete(keys.match(MODE, MATCH))
    assert (await loading.expire(MODE, MATCH)).outcome == "absent"
    assert await admin.zscore(keys.loading(MODE), MATCH) is None
    assert MATCH not in await loading.due(MODE)
