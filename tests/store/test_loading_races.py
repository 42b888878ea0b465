"""Every race of PROTOCOL 4 resolves to exactly one outcome, run deterministically in each order.

The scripts are called directly in both orders (the "concurrency" of two workers is the order
in which Redis runs their scripts); the end states are then checked player by player.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from server.app.loading import Sweeper
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
    await players.heartbeat(600_000)  # a live worker holds the players (commit skips a dead one's)
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


async def test_the_last_ready_said_again_on_its_worker_hands_the_match_off_again(
    env, admin: aioredis.Redis,
) -> None:  # type: ignore[no-untyped-def]
    """The reply to the last `ready` can be lost after the script ran (a timeout): the match is
    `allocating`, but no worker publishes its battle request. The player's retried ready on
    the same worker gets the same answer as the first time, so the handoff starts (the
    allocator ignores a match it already hands off); another worker's gets the status."""
    await make_match(env, 60_000)
    assert (await ready(env, "a")).outcome == "ready"
    first = await ready(env, "b")
    assert first.outcome == "allocating"
    again = await ready(env, "b")
    assert again.outcome == "allocating" and again.deadline_ms == first.deadline_ms
    assert again.teams == first.teams and again.tickets == first.tickets
    assert (await ready(env, "a")).outcome == "allocating"  # an earlier ready said again: same
    elsewhere = await env[1].ready(MODE, MATCH, "b", "b-c", 60_000, "w2")
    assert elsewhere.outcome == "final" and elsewhere.status == "allocating"
    assert await admin.hget(keys.match(MODE, MATCH), "ready") == "2"


async def test_a_repeated_ready_after_the_handoff_deadline_starts_nothing(
    env, admin: aioredis.Redis,
) -> None:  # type: ignore[no-untyped-def]
    """Past its deadline the handoff is the sweeper's to fail: a repeated ready then only hears
    the status, so no second battle request can go out for a match being ended."""
    await make_match(env, 60_000)
    assert (await ready(env, "a")).outcome == "ready"
    assert (await env[1].ready(MODE, MATCH, "b", "b-c", 1, "w1")).outcome == "allocating"
    await asyncio.sleep(0.01)  # the 1 ms handoff deadline has passed (Redis clock)
    late = await env[1].ready(MODE, MATCH, "b", "b-c", 1, "w1")
    assert late.outcome == "final" and late.status == "allocating"


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


async def test_a_leaver_whose_record_moved_on_is_not_penalised_by_the_old_ready_check(  # type: ignore[no-untyped-def]
    env, admin: aioredis.Redis
) -> None:
    """The leaver's record no longer names the match when its cancel runs (Redis lost it, or
    it moved on): that ready check has nothing left to remove, and no dodge to count."""
    await make_match(env, 60_000)
    players, loading, _ = env
    assert (await players.detach("a", "a-c")).outcome == "loading"
    await admin.delete(keys.player("a"))
    done = await loading.cancel(MODE, MATCH, "a")
    assert done.status == "cancelled" and [p.what for p in done.players] == ["requeued"]
    assert await admin.exists(keys.penalty("a")) == 0


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


async def test_one_bad_match_record_does_not_stop_the_sweep(
    env: tuple[PlayerStore, LoadingStore, MatchStore], admin: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DESIGN P1, one poison item never blocks the rest: a match record the scripts cannot end
    (written by hand, or by an older release during a rolling deploy) is due first every tick;
    the sweeper logs it and still ends the ready checks behind it."""
    await make_match(env, ready_timeout_ms=1)
    bad = "0.0.0"
    await admin.hset(keys.match(MODE, bad), mapping={"status": "loading", "mode": MODE})
    await admin.zadd(keys.loading(MODE), {bad: 0})  # due before the real one
    await wait_due(env[1])
    with caplog.at_level(logging.ERROR, logger="server.app.loading"):
        assert await Sweeper(MODE, env[1]).run() == 1
    assert await status(admin) == "timed_out"
    assert await admin.hget(keys.player("a"), "state") != "loading"
    assert any(bad in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    await admin.delete(keys.match(MODE, bad))
    await admin.zrem(keys.loading(MODE), bad)


async def test_a_failure_back_off_is_neither_cut_short_nor_jumped_to_its_longest(
    env: tuple[PlayerStore, LoadingStore, MatchStore], admin: aioredis.Redis,
) -> None:
    """Issue 16's hold after failed handoffs: matches that fail together are one step of the
    back-off (not one doubling each), and neither the game servers vanishing (hold.lua) nor
    a `no_game_server` ending replaces the longer back-off with a hold of a few ticks."""
    players, loading, matches = env
    ids = ["2.1.0", "2.1.1"]
    for p in "abcd":
        await players.attach(p, f"{p}-c")
        await players.enqueue(p, f"{p}-c", MODE, 1500, {})
    grant = await matches.acquire(MODE, "L", 60_000)
    committed = await matches.commit(MODE, lease_token("L", grant.epoch), 60_000,
                                     [MatchPlan(ids[0], [["a"], ["b"]]), MatchPlan(ids[1], [["c"], ["d"]])])
    assert committed.committed == ids
    for match_id, pair in zip(ids, ("ab", "cd"), strict=True):
        for p in pair:
            await loading.ready(MODE, match_id, p, f"{p}-c", 60_000, "w1")
    for match_id, pair in zip(ids, ("ab", "cd"), strict=True):  # rejected together
        assert (await loading.fail(MODE, match_id, "allocation_failed", list(pair))).outcome == "done"
    assert await admin.get(keys.hold_failures(MODE)) == "1"  # one step, 1 s (HoldTimes(1000, ...))
    await admin.pexpire(keys.hold(MODE), 20_000)  # as if it had doubled a few times already
    assert await matches.hold(MODE, "nobody-listens-here", 1000) == "game_server"
    assert await admin.get(keys.hold(MODE)) == "allocation_failed"
    assert await admin.pttl(keys.hold(MODE)) > 15_000
    await admin.delete(keys.hold(MODE), keys.hold_failures(MODE))
    await admin.delete(*(keys.match(MODE, m) for m in ids))


@pytest.mark.parametrize("allocator", ["w1", "w-gone"], ids=["its-worker-alive", "its-worker-dead"])
async def test_a_handoff_past_its_deadline_holds_the_mode_only_when_its_worker_lives(  # type: ignore[no-untyped-def]
    env, admin: aioredis.Redis, allocator: str
) -> None:
    """A handoff that ran out its deadline on a live worker is the fleet's failure: the mode
    holds (issue 16). One whose worker died (it crashed mid-handoff) is not: its players are
    requeued as a drain would (server_shutdown), and the mode goes on matching."""
    queued_at = await make_match(env, 60_000)
    _, loading, _ = env
    await loading.ready(MODE, MATCH, "a", "a-c", 1, allocator)
    assert (await loading.ready(MODE, MATCH, "b", "b-c", 1, allocator)).outcome == "allocating"
    await wait_due(loading)
    done = await loading.expire(MODE, MATCH)
    dead = allocator == "w-gone"
    assert done.status == "failed"
    assert done.reason == ("server_shutdown" if dead else "allocation_failed")
    assert (await admin.get(keys.hold(MODE))) == (None if dead else "allocation_failed")
    for p in "ab":
        assert await requeued_with_place(admin, p, queued_at[p])
    await admin.delete(keys.hold(MODE), keys.hold_failures(MODE))


async def assigned_while_a_is_away(env) -> None:  # type: ignore[no-untyped-def]
    """Both ready; a's connection ends (its detach ran, its cancel not yet) as the game server's
    answer lands: the match is assigned with no connection of a's to tell."""
    await make_match(env, 60_000)
    players, loading, _ = env
    await ready(env, "b")
    assert (await ready(env, "a")).outcome == "allocating"
    assert (await players.detach("a", "a-c")).outcome == "loading"
    assert (await loading.assign(MODE, MATCH, "gs:1", "s-1")).status == "assigned"


async def test_a_match_found_while_away_waits_for_a_connection_that_tells_it(  # type: ignore[no-untyped-def]
    env, admin: aioredis.Redis
) -> None:
    """Assigned while the player had no connection: its record keeps the match for the grace.
    A connection that ends before telling it (refused by a draining worker, replaced before its
    welcome) leaves it for the next; once told, it is forgotten."""
    await assigned_while_a_is_away(env)
    players = env[0]
    record = keys.player("a")
    assert 0 < await admin.pttl(record) <= 60_000
    first = await players.attach("a", "a-c2")
    assert first.player.state == "idle" and first.found == (MODE, MATCH)
    assert await admin.pttl(record) == -1  # connected: no expiry
    assert (await players.detach("a", "a-c2")).outcome == "removed"  # ended before telling it
    assert 0 < await admin.pttl(record) <= 60_000 and await admin.hget(record, "found") == MATCH
    second = await players.attach("a", "a-c3")
    assert second.found == (MODE, MATCH)
    await players.found_told("a", "another-match")  # not the one it names: kept
    assert await admin.hget(record, "found") == MATCH
    await players.found_told("a", MATCH)
    assert not await admin.hexists(record, "found") and not await admin.hexists(record, "found_mode")
    assert (await players.detach("a", "a-c3")).outcome == "removed"
    assert await admin.exists(record) == 0  # nothing left to tell: an idle player's record goes


async def test_an_enqueue_forgets_a_match_found_while_away_that_was_not_forgotten(  # type: ignore[no-untyped-def]
    env, admin: aioredis.Redis
) -> None:
    """The connection that heard the match_found could not forget it (its found_told
    failed), and the player queues again: the old match is not told to a later connection."""
    await assigned_while_a_is_away(env)
    players = env[0]
    assert (await players.attach("a", "a-c2")).found == (MODE, MATCH)  # told, not forgotten
    assert (await players.enqueue("a", "a-c2", MODE, 1500, {})).queued_at_ms > 0
    record = keys.player("a")
    assert not await admin.hexists(record, "found") and not await admin.hexists(record, "found_mode")
    assert (await players.detach("a", "a-c2")).outcome == "grace"
    assert (await players.attach("a", "a-c3")).found is None
    assert (await players.dequeue("a", "a-c3")).outcome == "ok"
    await players.detach("a", "a-c3")
    await players.detach("b", "b-c")
    assert await admin.exists(record) == 0


async def test_two_players_leaving_one_ready_check_are_both_leavers(  # type: ignore[no-untyped-def]
    env, admin: aioredis.Redis
) -> None:
    """Both leave before either cancel runs: the first cancel ends the match, and the second
    leaver is not requeued into a grace with its dodge uncounted (PROTOCOL 4: a leaver ends
    idle, with a penalty); its own cancel then finds the match ended."""
    await make_match(env, 60_000)
    players, loading, _ = env
    for p in "ab":
        assert (await players.detach(p, f"{p}-c")).outcome == "loading"
    done = await loading.cancel(MODE, MATCH, "a")
    assert done.status == "cancelled" and {p.player: p.what for p in done.players} == {
        "a": "removed", "b": "removed"}
    for p in "ab":
        assert await admin.exists(keys.player(p)) == 0
        assert await admin.zcard(keys.penalty(p)) == 1
    assert await admin.zcard(keys.queue(MODE)) == 0 and await admin.zcard(keys.left(MODE)) == 0
    assert (await loading.cancel(MODE, MATCH, "b")).outcome == "final"
    assert await admin.zcard(keys.penalty("b")) == 1


async def test_a_released_record_whose_match_was_told_meanwhile_does_not_expire_under_a_connection(  # type: ignore[no-untyped-def]
    env, admin: aioredis.Redis
) -> None:
    """A told connection ends and its detach reaches Redis before its found_told: the record is
    kept for another grace, then found_told forgets the match. The next connection must make
    the record lasting all the same, or it would expire under a live player."""
    await assigned_while_a_is_away(env)
    players = env[0]
    await players.attach("a", "a-c2")
    assert (await players.detach("a", "a-c2")).outcome == "removed"  # before its found_told
    await players.found_told("a", MATCH)
    record = keys.player("a")
    assert await admin.pttl(record) > 0 and not await admin.hexists(record, "found")
    back = await players.attach("a", "a-c3")
    assert back.found is None and back.player.state == "idle"
    assert await admin.pttl(record) == -1
    await players.detach("a", "a-c3")
    assert await admin.exists(record) == 0
