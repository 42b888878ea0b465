"""Leases, snapshots and the fenced commit against a real redis-server (DESIGN invariants 2, 3)."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from server.config import RedisConfig
from server.matching.plan import MatchPlan
from server.protocol import notices
from server.protocol.messages import StartLoading
from server.store import keys
from server.store.client import RedisClient
from server.store.matches import MatchStore, _commit_result, lease_token
from server.store.players import PlayerStore
from server.transport import envelope
from tests.helpers import TIMEOUT


@pytest.fixture
async def client(redis_url: str) -> RedisClient:
    c = RedisClient(redis_url, RedisConfig(operation_timeout_s=1.0))
    yield c  # type: ignore[misc]
    await c.close()


async def queue_players(client: RedisClient, mode: str, *players: str, grace_ms: int = 60_000,
                        worker: str = "w1") -> PlayerStore:
    store = PlayerStore(client, worker, grace_ms)
    await store.heartbeat(600_000)  # a live worker holds them: commit skips a dead one's players
    for p in players:
        await store.attach(p, f"{p}-c")
        assert (await store.enqueue(p, f"{p}-c", mode, 1500, {})).outcome == "ok"
    return store


async def test_lease_epochs_and_fencing_tokens(client: RedisClient, admin: aioredis.Redis) -> None:
    m = MatchStore(client)
    a = await m.acquire("1v1", "A", 60_000)
    assert a.held and a.epoch == 1
    assert not (await m.acquire("1v1", "B", 60_000)).held
    assert (await m.acquire("1v1", "A", 60_000)).epoch == 1  # re-acquire by the holder extends
    assert await m.renew("1v1", lease_token("A", 1), 60_000)
    await admin.delete(keys.leader("1v1"))  # the lease expires (A paused past its TTL)
    b = await m.acquire("1v1", "B", 60_000)
    assert b.held and b.epoch == 2
    assert not await m.renew("1v1", lease_token("A", 1), 60_000)
    assert not await m.release("1v1", lease_token("A", 1))
    assert await admin.get(keys.leader("1v1")) == "B|2"
    assert await m.release("1v1", lease_token("B", 2))


async def test_racing_acquirers_get_exactly_one_lease(client: RedisClient) -> None:
    m = MatchStore(client)
    grants = await asyncio.gather(*(m.acquire("5v5", f"w{i}", 60_000) for i in range(20)))
    assert sum(g.held for g in grants) == 1


async def test_deposed_leader_cannot_commit(client: RedisClient, admin: aioredis.Redis) -> None:
    await queue_players(client, "1v1", "a", "b")
    m = MatchStore(client)
    await m.acquire("1v1", "old", 60_000)
    await admin.delete(keys.leader("1v1"))
    await m.acquire("1v1", "new", 60_000)
    result = await m.commit("1v1", lease_token("old", 1), 10_000, [MatchPlan("1.1.0", [["a"], ["b"]])])
    assert result.fenced and not result.committed
    assert await admin.zcard(keys.queue("1v1")) == 2
    assert await admin.exists(keys.match("1v1", "1.1.0")) == 0


async def test_commit_skips_the_players_of_a_worker_whose_heartbeat_lapsed(
    client: RedisClient, admin: aioredis.Redis
) -> None:
    """A dead worker's queued players stay queued until the reaper moves them into the resume
    grace: matched before that, nobody hears the ready check, and they would time out into a
    dodge penalty (and put their opponents through a ready check that cannot pass). The
    leader's own players need no heartbeat entry: it is alive by committing."""
    await queue_players(client, "1v1", "a", "b", worker="dead")
    await queue_players(client, "1v1", "c", "d", worker="live")
    await queue_players(client, "1v1", "e", "f", worker="L")
    await admin.zadd(keys.workers(), {"dead": 1})  # its deadline long past (Redis clock, ms)
    await admin.zrem(keys.workers(), "L")  # the leader's heartbeat need not be there
    m = MatchStore(client)
    grant = await m.acquire("1v1", "L", 60_000)
    plans = [MatchPlan("1.1.0", [["a"], ["c"]]), MatchPlan("1.1.1", [["b"], ["d"]]),
             MatchPlan("1.1.2", [["e"], ["f"]])]
    result = await m.commit("1v1", lease_token("L", grant.epoch), 10_000, plans)
    assert result.skipped == ["1.1.0", "1.1.1"] and result.committed == ["1.1.2"]
    assert result.poisoned == []  # not poison: their tickets and places are kept
    assert sorted(await admin.zrange(keys.queue("1v1"), 0, -1)) == ["a", "b", "c", "d"]
    assert {await admin.hget(keys.player(p), "state") for p in "abcd"} == {"queued"}
    await admin.zadd(keys.workers(), {"dead": 2**50})  # it heartbeats again (was only stalled)
    again = await m.commit("1v1", lease_token("L", grant.epoch), 10_000, plans[:2])
    assert again.committed == ["1.1.0", "1.1.1"]


async def test_commit_skips_a_match_whose_player_left_and_commits_the_rest(
    client: RedisClient, admin: aioredis.Redis
) -> None:
    store = await queue_players(client, "1v1", "a", "b", "c", "d")
    m = MatchStore(client)
    grant = await m.acquire("1v1", "L", 60_000)
    token = lease_token("L", grant.epoch)
    plans = [MatchPlan("1.1.0", [["a"], ["b"]]), MatchPlan("1.1.1", [["c"], ["d"]])]
    assert (await store.dequeue("a", "a-c")).outcome == "ok"  # between snapshot and commit
    listener = admin.pubsub()
    await listener.subscribe(keys.worker_channel("w1"))
    result = await m.commit("1v1", token, 10_000, plans)
    assert result.committed == ["1.1.1"] and result.skipped == ["1.1.0"]
    assert await admin.zrange(keys.queue("1v1"), 0, -1) == ["b"]  # b stays queued, place kept
    match = await admin.hgetall(keys.match("1v1", "1.1.1"))
    assert match["status"] == "loading" and json.loads(match["teams"]) == [["c"], ["d"]]
    assert match["t:c"].startswith("1500.0|")
    assert await admin.hget(keys.player("c"), "state") == "loading"
    assert await admin.hget(keys.player("c"), "match") == "1.1.1"
    assert await admin.zscore(keys.loading("1v1"), "1.1.1") == result.deadline_ms
    # The worker holding both players hears one fact, which becomes their start_loading.
    notice = envelope.decode((await next_message(listener))["data"].encode())
    assert isinstance(notice, envelope.Notices) and len(notice.events) == 1
    told = list(notices.messages(notice.events[0]))
    assert sorted((player, conn) for player, conn, _ in told) == [("c", "c-c"), ("d", "d-c")]
    assert all(msg == StartLoading(loading_session_id="1.1.1", game_mode="1v1", teams=[["c"], ["d"]],
                                   deadline_ms=result.deadline_ms) for _, _, msg in told)

    again = await m.commit("1v1", token, 10_000, plans)  # a retry after a lost reply
    assert again.committed == ["1.1.1"] and again.skipped == ["1.1.0"]
    assert await admin.hget(keys.player("c"), "match") == "1.1.1"
    assert await admin.zrange(keys.queue("1v1"), 0, -1) == ["b"]
    with pytest.raises(TimeoutError):  # the players were told once, not again
        await next_message(listener, 0.2)
    await listener.aclose()


async def next_message(listener: aioredis.client.PubSub, timeout: float = TIMEOUT) -> dict[str, str]:
    async with asyncio.timeout(timeout):
        while True:
            message = await listener.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if message is not None:
                return message  # type: ignore[no-any-return]


async def test_commit_removes_entries_whose_owner_is_gone(client: RedisClient, admin: aioredis.Redis) -> None:
    await queue_players(client, "1v1", "a")
    await admin.zadd(keys.queue("1v1"), {"ghost": 1})
    await admin.hset(keys.tickets("1v1"), "ghost", "1500|1|{}")
    m = MatchStore(client)
    grant = await m.acquire("1v1", "L", 60_000)
    result = await m.commit("1v1", lease_token("L", grant.epoch), 10_000,
                            [MatchPlan("1.1.0", [["a"], ["ghost"]])])
    assert result.poisoned == ["ghost"] and result.skipped == ["1.1.0"]
    assert await admin.zrange(keys.queue("1v1"), 0, -1) == ["a"]
    assert await admin.hget(keys.tickets("1v1"), "ghost") is None


async def test_a_player_named_by_two_matches_of_one_batch_commits_once(
    client: RedisClient, admin: aioredis.Redis
) -> None:
    """The script removes committed players from the queue once, after the batch; a player a
    faulty plan names twice must still not be in two matches."""
    await queue_players(client, "1v1", "a", "b", "c", "d")
    m = MatchStore(client)
    grant = await m.acquire("1v1", "L", 60_000)
    plans = [MatchPlan("1.1.0", [["a"], ["b"]]), MatchPlan("1.1.1", [["b"], ["c"]]),
             MatchPlan("1.1.2", [["c"], ["d"]])]
    result = await m.commit("1v1", lease_token("L", grant.epoch), 10_000, plans)
    assert result.committed == ["1.1.0", "1.1.2"] and result.skipped == ["1.1.1"]
    assert await admin.exists(keys.match("1v1", "1.1.1")) == 0
    assert await admin.hget(keys.player("b"), "match") == "1.1.0"
    assert await admin.hget(keys.player("c"), "match") == "1.1.2"
    assert await admin.zcard(keys.queue("1v1")) == 0 and await admin.hlen(keys.tickets("1v1")) == 0
    loading = await admin.zrange(keys.loading("1v1"), 0, -1, withscores=True)
    assert loading == [("1.1.0", result.deadline_ms), ("1.1.2", result.deadline_ms)]


async def test_a_player_record_that_is_not_a_hash_is_poison_and_the_batch_still_commits(
    client: RedisClient, admin: aioredis.Redis
) -> None:
    await queue_players(client, "1v1", "a", "b", "c", "d")
    await admin.delete(keys.player("d"))
    await admin.set(keys.player("d"), "corrupt")  # WRONGTYPE for the script's HMGET
    m = MatchStore(client)
    grant = await m.acquire("1v1", "L", 60_000)
    result = await m.commit("1v1", lease_token("L", grant.epoch), 10_000, [
        MatchPlan("1.1.0", [["a"], ["b"]]), MatchPlan("1.1.1", [["c"], ["d"]])])
    assert result.committed == ["1.1.0"] and result.skipped == ["1.1.1"]
    assert result.poisoned == ["d"]
    assert await admin.zrange(keys.queue("1v1"), 0, -1) == ["c"]
    assert await admin.get(keys.player("d")) == "corrupt"  # not ours to rewrite
    assert await admin.zrange(keys.loading("1v1"), 0, -1) == ["1.1.0"]


async def test_a_script_error_midway_finishes_the_matches_committed_before_it(
    client: RedisClient, admin: aioredis.Redis
) -> None:
    """Redis keeps a script's writes when it fails: what the script committed before the error
    must still leave the queue, join the loading set and be told, or those players would be
    `loading` in a match nothing ever ends."""
    await queue_players(client, "1v1", "a", "b", "c", "d")
    m = MatchStore(client)
    grant = await m.acquire("1v1", "L", 60_000)
    listener = admin.pubsub()
    await listener.subscribe(keys.worker_channel("w1"))
    # A malformed second match (its player count is not a number): the loop fails there.
    script_keys = [keys.leader("1v1"), *keys.mode_keys("1v1"), keys.loading("1v1"), keys.workers(),
                   keys.match("1v1", "1.1.0"), keys.player("a"), keys.player("b"),
                   keys.match("1v1", "1.1.1"), keys.player("c"), keys.player("d")]
    args = [lease_token("L", grant.epoch), "1v1", 10_000, keys.DELIVERY_PREFIX, 2,
            "1.1.0", 2, json.dumps([["a"], ["b"]]), "a", "b",
            "1.1.1", "two", json.dumps([["c"], ["d"]]), "c", "d"]
    reply = await client.script("commit_matches", script_keys, args)
    result = _commit_result(reply)
    assert result.committed == ["1.1.0"] and "for" in result.failure  # Lua: 'for' limit
    assert await admin.zrange(keys.queue("1v1"), 0, -1) == ["c", "d"]
    assert await admin.hkeys(keys.tickets("1v1")) == ["c", "d"]
    assert await admin.zrange(keys.loading("1v1"), 0, -1) == ["1.1.0"]
    assert await admin.hget(keys.player("a"), "match") == "1.1.0"
    entries = await admin.xrevrange(keys.changes("1v1"), count=1)
    assert entries[0][1] == {"o": "m", "p": "a,b"}
    notice = envelope.decode((await next_message(listener))["data"].encode())
    assert isinstance(notice, envelope.Notices) and len(notice.events) == 1
    await listener.aclose()


async def test_a_failing_write_after_the_loop_does_not_skip_the_others(
    client: RedisClient, admin: aioredis.Redis
) -> None:
    await queue_players(client, "1v1", "a", "b")
    await admin.set(keys.loading("1v1"), "corrupt")  # the loading set's ZADD fails
    m = MatchStore(client)
    grant = await m.acquire("1v1", "L", 60_000)
    result = await m.commit("1v1", lease_token("L", grant.epoch), 10_000,
                            [MatchPlan("1.1.0", [["a"], ["b"]])])
    assert result.committed == ["1.1.0"] and result.failure.startswith("WRONGTYPE")
    assert await admin.zcard(keys.queue("1v1")) == 0  # the steps before and after it ran
    entries = await admin.xrevrange(keys.changes("1v1"), count=1)
    assert entries[0][1] == {"o": "m", "p": "a,b"}


async def test_snapshot_reads_in_chunks_in_queue_order_marking_graced_players(
    client: RedisClient,
) -> None:
    players = [f"p{i:02}" for i in range(10)]
    store = await queue_players(client, "5v5", *players)
    await store.detach("p03", "p03-c")  # disconnected: in grace, kept but not matchable
    snap = await MatchStore(client).snapshot("5v5", chunk=3)
    assert snap.players == players and snap.grace == ["p03"]
    assert all(t is not None and t.startswith(b"1500.0|") for t in snap.tickets)
    assert snap.now_ms > 0 and snap.position
