"""The changes stream of a mode's queue (issue 10) against a real redis-server: every script
that changes a queue appends what it changed, the reader notices a lost position, and a full
snapshot read in chunks misses nobody while the queue changes between its chunks."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from server.config import RedisConfig
from server.matching.changes import Added, Change
from server.matching.plan import MatchPlan
from server.store import keys
from server.store.client import RedisClient
from server.store.matches import HoldTimes, LoadingStore, MatchStore, lease_token
from server.store.players import PlayerStore
from tests.store.test_matches import queue_players

MODE = "1v1"


@pytest.fixture
async def client(redis_url: str) -> RedisClient:
    c = RedisClient(redis_url, RedisConfig(operation_timeout_s=1.0))
    yield c  # type: ignore[misc]
    await c.close()


async def position(client: RedisClient) -> str:
    """A position that follows everything so far (what a load records)."""
    return (await MatchStore(client).snapshot(MODE, chunk=100)).position


async def changes_after(client: RedisClient, pos: str) -> list[Change]:
    batch = await MatchStore(client).changes(MODE, pos, 1000)
    assert batch is not None and batch.complete
    return batch.changes


def ops(changes: list[Change]) -> list[tuple[str, str]]:
    return [(type(c).__name__, c.player) for c in changes]


async def test_player_scripts_append_what_they_change(client: RedisClient) -> None:
    pos = await position(client)
    store = await queue_players(client, MODE, "a", "b")
    await store.detach("a", "a-c")  # resume grace begins
    await store.attach("a", "a-c2")  # back within it
    assert (await store.dequeue("b", "b-c", MODE)).outcome == "ok"
    found = await changes_after(client, pos)
    assert ops(found) == [("Added", "a"), ("Added", "b"), ("GraceOn", "a"), ("GraceOff", "a"),
                          ("Removed", "b")]
    added = found[0]
    assert isinstance(added, Added) and added.ticket is not None
    assert added.ticket.startswith(b"1500.0|")


async def test_grace_expiry_and_poison_removal_are_removals(
    client: RedisClient, admin: aioredis.Redis,
) -> None:
    store = await queue_players(client, MODE, "gone", "poison", grace_ms=1)
    pos = await position(client)
    await store.detach("gone", "gone-c")
    await admin.hset(keys.tickets(MODE), "poison", "not a ticket")
    while not await store.expire_grace("gone", MODE):
        pass  # a 1 ms grace: due at once on the Redis clock
    assert await MatchStore(client).remove_ticket(MODE, "poison")
    assert ops(await changes_after(client, pos)) == [
        ("GraceOn", "gone"), ("Removed", "gone"), ("Removed", "poison")]


async def test_commit_appends_one_match_entry_and_a_failed_handoff_requeues(
    client: RedisClient,
) -> None:
    await queue_players(client, MODE, "a", "b")
    pos = await position(client)
    matches = MatchStore(client)
    grant = await matches.acquire(MODE, "L", 60_000)
    result = await matches.commit(MODE, lease_token("L", grant.epoch), 10_000,
                                  [MatchPlan("1.1.0", [["a"], ["b"]])])
    assert result.committed == ["1.1.0"]
    batch = await matches.changes(MODE, pos, 1000)
    assert batch is not None and ops(batch.changes) == [("Removed", "a"), ("Removed", "b")]
    assert batch.queue_size == 0 and batch.graced == 0
    loading = LoadingStore(client, resume_grace_ms=60_000, penalty_window_ms=60_000,
                           finished_ttl_ms=10_000, hold=HoldTimes(1000, 30_000, 1000))
    ended = await loading.cancel(MODE, "1.1.0", "a", shutdown=True)
    assert {o.what for o in ended.players} == {"requeued"}
    requeued = (await matches.changes(MODE, batch.position, 1000))
    assert requeued is not None
    assert sorted(ops(requeued.changes)) == [("Added", "a"), ("Added", "b")]
    # A requeued player keeps its ticket, and so its queued_at: its place in the queue.
    assert all(isinstance(c, Added) and c.ticket and c.ticket.startswith(b"1500.0|")
               for c in requeued.changes)
    assert requeued.queue_size == 2


async def test_a_batch_of_matches_is_one_entry_naming_every_committed_player(
    client: RedisClient, admin: aioredis.Redis
) -> None:
    await queue_players(client, MODE, "a", "b", "c", "d", "e")
    await admin.zadd(keys.queue(MODE), {"ghost": 1})  # poison: no player record
    pos = await position(client)
    matches = MatchStore(client)
    grant = await matches.acquire(MODE, "L", 60_000)
    result = await matches.commit(MODE, lease_token("L", grant.epoch), 10_000, [
        MatchPlan("1.1.0", [["a"], ["b"]]), MatchPlan("1.1.1", [["e"], ["ghost"]]),
        MatchPlan("1.1.2", [["c"], ["d"]])])
    assert result.committed == ["1.1.0", "1.1.2"] and result.poisoned == ["ghost"]
    entries = await admin.xrange(keys.changes(MODE), "(" + pos)
    assert [(e["o"], e["p"]) for _, e in entries] == [("r", "ghost"), ("m", "a,b,c,d")]
    batch = await matches.changes(MODE, pos, 1000)
    assert batch is not None and batch.queue_size == 1  # e stays queued


async def test_a_lost_position_asks_for_a_reload(client: RedisClient, admin: aioredis.Redis) -> None:
    await queue_players(client, MODE, "a")
    pos = await position(client)
    matches = MatchStore(client)
    assert await matches.changes(MODE, pos, 10) is not None
    await admin.xtrim(keys.changes(MODE), maxlen=0)  # trimmed past the reader
    assert await matches.changes(MODE, pos, 10) is None
    await admin.delete(keys.changes(MODE))  # Redis came back without its data
    assert await matches.changes(MODE, pos, 10) is None
    # A new snapshot of an empty stream leaves a marker, so its position exists.
    fresh = await position(client)
    batch = await matches.changes(MODE, fresh, 10)
    assert batch is not None and batch.changes == [] and batch.queue_size == 1


async def test_changes_come_in_bounded_reads(client: RedisClient) -> None:
    pos = await position(client)
    await queue_players(client, MODE, *(f"p{i}" for i in range(7)))
    matches, seen = MatchStore(client), []
    while True:
        batch = await matches.changes(MODE, pos, 3)
        assert batch is not None and len(batch.changes) <= 3
        seen.extend(c.player for c in batch.changes)
        pos = batch.position
        if batch.complete:
            break
    assert seen == [f"p{i}" for i in range(7)]


async def test_a_big_match_entry_counts_as_several_against_the_read_budget(
    client: RedisClient,
) -> None:
    players = [f"p{i:02}-".ljust(64, "x") for i in range(20)]  # 1.3 KiB as one csv
    await queue_players(client, MODE, *players, "late")
    pos = await position(client)
    matches = MatchStore(client)
    grant = await matches.acquire(MODE, "L", 60_000)
    await matches.commit(MODE, lease_token("L", grant.epoch), 10_000, [
        MatchPlan(f"1.1.{i}", [[players[2 * i]], [players[2 * i + 1]]]) for i in range(10)])
    await PlayerStore(client, "w1", 60_000).dequeue("late", "late-c")
    first = await matches.changes(MODE, pos, 2)  # one entry, counted as two: the budget
    assert first is not None and not first.complete
    assert [c.player for c in first.changes] == players
    rest = await matches.changes(MODE, first.position, 2)
    assert rest is not None and rest.complete and ops(rest.changes) == [("Removed", "late")]
    assert rest.queue_size == 0
    small = await matches.changes(MODE, pos, 4)  # room for both
    assert small is not None and small.complete and len(small.changes) == 21


async def test_snapshot_chunks_keep_ties_together(client: RedisClient, admin: aioredis.Redis) -> None:
    # Five players queued in the same millisecond, read two at a time: a chunk never ends
    # inside a run of equal queued_at, so nobody is read twice or skipped.
    names = [f"t{i}" for i in range(5)] + ["later"]
    for i, name in enumerate(names):
        queued = 1000 if name != "later" else 2000
        await admin.zadd(keys.queue(MODE), {name: queued})
        await admin.hset(keys.tickets(MODE), name, f"{1500 + i}.0|{queued}|{{}}")
    snap = await MatchStore(client).snapshot(MODE, chunk=2)
    assert snap.players == names and snap.grace == []


async def test_snapshot_misses_nobody_when_players_leave_between_chunks(
    client: RedisClient,
) -> None:
    players = [f"p{i:02}" for i in range(9)]
    store = await queue_players(client, MODE, *players)
    # The first chunk by hand, then two players ahead leave, then the rest: reading by rank
    # would now skip the players who moved up into the rows already read.
    script_keys = keys.mode_keys(MODE)
    first = await client.script("snapshot", script_keys, ["-inf", 3])
    assert isinstance(first, list)
    pos, bound = first[1].decode(), first[2].decode()
    read = [p.decode() for p in first[3::3]]
    for p in read[:2]:
        assert (await store.dequeue(p, f"{p}-c", MODE)).outcome == "ok"
    while bound:
        chunk = await client.script("snapshot", script_keys, [bound, 3])
        assert isinstance(chunk, list)
        read.extend(p.decode() for p in chunk[3::3])
        bound = chunk[2].decode()
    assert sorted(read) == players  # nobody skipped, nobody twice
    # ... and the changes after the position remove the two who left.
    assert ops(await changes_after(client, pos)) == [("Removed", read[0]), ("Removed", read[1])]


def test_the_lua_trim_length_is_the_documented_one() -> None:
    from server.store.scripts import read_scripts

    source = read_scripts()["enqueue"]
    assert f"'MAXLEN', '~', {keys.CHANGES_KEPT}," in source
    assert keys.outlives_players(keys.changes(MODE))  # a bounded log, not anyone's record

