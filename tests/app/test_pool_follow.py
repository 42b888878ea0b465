"""The leader's pool follows the queue through the changes stream (issue 10), against a real
redis-server and the real scripts: it loads once, then applies what changed; a lost position or
a disagreement with the queue's size loads it again; and at every tick it holds exactly what a
full re-read of the queue holds, so pairing it gives the same matches."""

from __future__ import annotations

import asyncio
import itertools
import time

import redis.asyncio as aioredis
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.app.lease import Lease
from server.app.trymatch import TryMatch
from server.config import RedisConfig
from server.matching.plan import plan_matches
from server.store import keys
from server.store.client import RedisClient
from server.store.embedded import EmbeddedRedis
from server.store.matches import HoldTimes, LoadingStore, MatchStore
from server.store.players import PlayerStore
from tests.conftest import make_config

CONFIG = make_config()
MODE_CONFIG = CONFIG.modes["1v1"]
_modes = itertools.count()


async def leader(client: RedisClient, mode: str) -> TryMatch:
    store = MatchStore(client)
    lease = Lease(store, mode, "test-leader", 60_000)
    assert await lease.acquire()
    return TryMatch(mode, MODE_CONFIG, CONFIG.matching, store, lease)


def view(trymatch: TryMatch) -> tuple[list[str], list[float], list[int]]:
    """The matchable players in queue order, with their ratings and queued_at."""
    assert trymatch.pool is not None
    c = trymatch.pool.candidates()
    return [c.players[i] for i in c.index], list(c.ratings), list(c.queued)


async def enqueue(store: PlayerStore, mode: str, player: str, rating: float) -> None:
    await store.attach(player, f"{player}-c")
    assert (await store.enqueue(player, f"{player}-c", mode, rating, {})).outcome == "ok"


async def test_the_pool_loads_once_then_follows(redis_url: str, admin: aioredis.Redis) -> None:
    client = RedisClient(redis_url, RedisConfig())
    try:
        store = PlayerStore(client, "w1", 60_000)
        await store.heartbeat(600_000)  # alive: commit skips a dead worker's players
        for i, rating in enumerate((1500, 1900, 2300)):
            await enqueue(store, "1v1", f"p{i}", rating)
        tm = await leader(client, "1v1")
        await tm.sync()
        assert tm.loads == 1 and view(tm)[0] == ["p0", "p1", "p2"]
        await enqueue(store, "1v1", "p3", 1505)  # added
        await store.detach("p1", "p1-c")  # grace: kept, not matchable
        assert (await store.dequeue("p2", "p2-c", "1v1")).outcome == "ok"  # removed
        await tm.sync()
        assert view(tm)[0] == ["p0", "p3"]
        await store.attach("p1", "p1-again")  # back: matchable at its old place
        await tm.sync()
        assert view(tm)[0] == ["p0", "p1", "p3"]
        assert await tm.run(tm.lease.token or "") == 1  # p0 and p3 (1500, 1505)
        await tm.sync()
        assert view(tm)[0] == ["p1"] and tm.loads == 1  # followed, never re-read
    finally:
        await client.close()


async def test_a_lost_position_or_a_hand_edit_loads_again(redis_url: str, admin: aioredis.Redis) -> None:
    client = RedisClient(redis_url, RedisConfig())
    try:
        store = PlayerStore(client, "w1", 60_000)
        await store.heartbeat(600_000)  # alive: commit skips a dead worker's players
        await enqueue(store, "1v1", "a", 1500)
        tm = await leader(client, "1v1")
        await tm.sync()
        await admin.xtrim(keys.changes("1v1"), maxlen=0)  # trimmed past the leader
        await enqueue(store, "1v1", "b", 1800)
        await tm.sync()
        assert tm.loads == 2 and view(tm)[0] == ["a", "b"]
        # A queue entry written behind the scripts' back: the sizes disagree, so it is read.
        await admin.zadd(keys.queue("1v1"), {"hand": 5})
        await admin.hset(keys.tickets("1v1"), "hand", "1700.0|5|{}")
        await tm.sync()
        assert tm.loads == 3 and view(tm)[0] == ["hand", "a", "b"]
    finally:
        await client.close()


async def test_a_disagreement_a_load_does_not_cure_is_not_read_every_tick(
    redis_url: str, admin: aioredis.Redis,
) -> None:
    """A resume-grace entry for a player who is not queued (left behind by hand, or by an older
    release) keeps the sizes apart however often the queue is read: after one load that still
    disagrees, loads back off (1 s, doubling) instead of reading the whole queue every tick."""
    client = RedisClient(redis_url, RedisConfig())
    try:
        store = PlayerStore(client, "w1", 60_000)
        await enqueue(store, "1v1", "a", 1500)
        tm = await leader(client, "1v1")
        await tm.sync()
        assert tm.loads == 1
        await admin.zadd(keys.grace("1v1"), {"ghost": 2**50})
        for _ in range(20):
            await tm.sync()
        # One load found it; the ticks after it wait 1 s, 2 s, 4 s... (every tick would be 21
        # loads; 6 would take 20 ticks spread over 15 s even on a crawling machine).
        assert 2 <= tm.loads < 6
        assert view(tm)[0] == ["a"]
        # A new difference is read at once, back-off or not.
        await admin.zadd(keys.queue("1v1"), {"hand": 5})
        await admin.hset(keys.tickets("1v1"), "hand", "1700.0|5|{}")
        loads = tm.loads
        await tm.sync()
        assert tm.loads == loads + 1 and view(tm)[0] == ["hand", "a"]
    finally:
        await admin.zrem(keys.grace("1v1"), "ghost")
        await client.close()


async def test_a_new_leader_loads_while_the_queue_changes(redis_url: str) -> None:
    """A load in chunks while players come and go between the chunks ends up exact."""
    client = RedisClient(redis_url, RedisConfig())
    try:
        store = PlayerStore(client, "w1", 60_000)
        await store.heartbeat(600_000)  # alive: commit skips a dead worker's players
        for i in range(300):
            await enqueue(store, "1v1", f"p{i:03}", 1000 + 10 * i)
        tm = await leader(client, "1v1")
        tm.config = make_config(**{"matching.snapshot_chunk": 7}).matching

        async def churn() -> None:
            for i in range(0, 300, 3):
                assert (await store.dequeue(f"p{i:03}", f"p{i:03}-c", "1v1")).outcome == "ok"
                await enqueue(store, "1v1", f"n{i:03}", 5000 + i)
                await asyncio.sleep(0)

        await asyncio.gather(tm.sync(), churn())
        await tm.sync()
        fresh = await leader(client, "1v1")
        await fresh.sync()
        assert view(tm) == view(fresh) and len(view(tm)[0]) == 300
    finally:
        await client.close()


# -- the pool equals a full re-read, whatever happens -----------------------------------------

PLAYERS = [f"p{i}" for i in range(4)]  # few: steps keep meeting the same players
enqueue_op = st.tuples(st.just("enqueue"), st.sampled_from(PLAYERS),
                       st.sampled_from([1500.0, 1510.0, 2500.0]))
op = st.one_of(
    enqueue_op, enqueue_op, enqueue_op,  # weighted: most steps put someone in the queue
    st.tuples(st.just("dequeue"), st.sampled_from(PLAYERS), st.just(0.0)),
    st.tuples(st.just("disconnect"), st.sampled_from(PLAYERS), st.just(0.0)),
    st.tuples(st.just("reconnect"), st.sampled_from(PLAYERS), st.just(0.0)),
    st.tuples(st.just("expire"), st.sampled_from(PLAYERS), st.just(0.0)),
    st.tuples(st.just("tick"), st.just(""), st.just(0.0)),
    st.tuples(st.just("cancel"), st.just(""), st.just(0.0)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(op, min_size=4, max_size=40))
@example([("enqueue", "p1", 1500.0), ("enqueue", "p2", 1500.0), ("disconnect", "p2", 0.0),
          ("reconnect", "p2", 0.0), ("tick", "", 0.0), ("disconnect", "p1", 0.0),
          ("tick", "", 0.0), ("cancel", "", 0.0)])
@example([("enqueue", "p0", 1500.0), ("enqueue", "p1", 2500.0), ("dequeue", "p0", 0.0),
          ("disconnect", "p1", 0.0), ("expire", "p1", 0.0), ("enqueue", "p2", 1500.0),
          ("disconnect", "p2", 0.0), ("reconnect", "p2", 0.0), ("tick", "", 0.0)])
def test_the_pool_equals_a_full_re_read(
    shared_redis: EmbeddedRedis, ops: list[tuple[str, str, float]],
) -> None:
    asyncio.run(_equivalence(shared_redis.url, f"prop{next(_modes)}", ops))


async def _equivalence(url: str, mode: str, ops: list[tuple[str, str, float]]) -> None:
    client = RedisClient(url, RedisConfig())
    try:
        store = PlayerStore(client, "w1", resume_grace_ms=0)  # a disconnect is due at once
        await store.heartbeat(600_000)  # alive: commit skips a dead worker's players
        loading = LoadingStore(client, resume_grace_ms=0, penalty_window_ms=60_000,
                               finished_ttl_ms=10_000, hold=HoldTimes(1000, 30_000, 1000))
        follower = await leader(client, mode)
        conns: dict[str, str] = {}
        committed: list[str] = []
        for step, (what, name, rating) in enumerate(ops):
            p = f"{mode}.{name}"  # player records are global: each example has its own players
            if what == "enqueue" and p in conns:
                await store.enqueue(p, conns[p], mode, rating, {})
            elif what == "enqueue":
                conns[p] = f"{p}-{step}"
                await store.attach(p, conns[p])
                await store.enqueue(p, conns[p], mode, rating, {})
            elif what == "dequeue" and p in conns:
                await store.dequeue(p, conns[p], mode)
            elif what == "disconnect" and p in conns:
                # Left in a ready check, the match stays until a "cancel" step ends it (as
                # if its worker died before cancelling): its requeue then finds it gone.
                await store.detach(p, conns.pop(p), mode_guess=mode)
            elif what == "reconnect" and p not in conns:
                conns[p] = f"{p}-{step}"
                await store.attach(p, conns[p])
            elif what == "expire":
                await store.expire_grace(p, mode)
            elif what == "tick":
                plans, poison = await follower.plan()
                assert poison == []
                if plans:
                    token = follower.lease.token or ""
                    await follower.commit(token, plans, time.monotonic())
                    committed.extend(plan.match_id for plan in plans)
            elif what == "cancel" and committed:
                await loading.cancel(mode, committed.pop(), "", shutdown=True)
            # After every step: the pool must agree at every point.
            await follower.sync()
            fresh = await leader(client, mode)
            await fresh.sync()
            assert view(follower) == view(fresh), f"after step {step} ({what} {name})"
            assert follower.pool is not None and fresh.pool is not None
            now = 2_000_000_000_000
            ours = plan_matches(follower.pool.candidates(), MODE_CONFIG, now, "x")
            assert ours == plan_matches(fresh.pool.candidates(), MODE_CONFIG, now, "x")
        assert follower.loads == 1  # followed the stream the whole way
    finally:
        await client.close()
