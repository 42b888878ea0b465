"""Redis Sentinel (issue 11): the config, the locator, and a real deployment (1 primary, 1
replica, 3 Sentinels, started once for this module) that the store follows through a failover,
and `fastmatch serve` on it under simulated load while the primary is killed."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator

import pytest

from server.app.gameserver import ReferenceGameServer
from server.app.worker import Worker
from server.config import RedisConfig, load_config
from server.errors import ConfigError
from server.store import keys, sentinel
from server.store.client import RedisClient
from server.store.errors import StoreUnavailable
from server.store.players import PlayerStore
from server.store.resp import RespConnectionError
from tests.app.test_matchmaking import start_loading
from tests.conftest import make_config
from tests.helpers import (
    TIMEOUT,
    closed_code,
    connect_player,
    eventually,
    recv,
    request,
    retry_while_unavailable,
)
from tests.store.failover_load import serve_through_a_failover
from tests.store.sentinel_topology import SERVICE, SentinelTopology


@pytest.fixture(scope="module")
def topology() -> Iterator[SentinelTopology]:
    deployment = SentinelTopology().start()
    try:
        yield deployment
    finally:
        deployment.stop()


# -- the config and the locator (no Redis needed) -------------------------------------------------


def test_sentinels_from_the_environment_build_a_locator() -> None:
    config = load_config(environ={"FASTMATCH_REDIS__SENTINELS": "10.0.0.1:26379, 10.0.0.2:26380",
                                  "FASTMATCH_REDIS__SENTINEL_SERVICE": "fm-main",
                                  "FASTMATCH_REDIS__URL": "redis://:s3cr%40t@ignored:1/2"})
    assert config.redis.sentinels == "10.0.0.1:26379, 10.0.0.2:26380"
    url = sentinel.locator(config.redis)
    assert url == "redis+sentinel://:s3cr%40t@10.0.0.1:26379,10.0.0.2:26380/fm-main/2"
    assert sentinel.parse(url) == sentinel.SentinelSpec(
        (("10.0.0.1", 26379), ("10.0.0.2", 26380)), "fm-main", "", "s3cr@t", 2)
    # Standalone: the URL as it is, and a plain URL is no Sentinel locator.
    plain = load_config(environ={"FASTMATCH_REDIS__URL": "redis://h:1/0"})
    assert sentinel.locator(plain.redis) == "redis://h:1/0"
    assert sentinel.parse("redis://h:1/0") is None
    assert sentinel.locator(RedisConfig(sentinels="a:1", sentinel_service="s")) == \
        "redis+sentinel://a:1/s/0"


@pytest.mark.parametrize(("env", "key"), [
    ({"SENTINELS": "10.0.0.1:26379"}, "redis.sentinel_service"),  # one without the other
    ({"SENTINEL_SERVICE": "fm"}, "redis.sentinel_service"),
    ({"SENTINELS": "10.0.0.1", "SENTINEL_SERVICE": "fm"}, "redis.sentinels"),  # no port
    ({"SENTINELS": "a:1,b:99999", "SENTINEL_SERVICE": "fm"}, "redis.sentinels"),
    ({"SENTINELS": "a:1,", "SENTINEL_SERVICE": "fm"}, "redis.sentinels"),
    ({"SENTINELS": "a:1", "SENTINEL_SERVICE": "bad name"}, "redis.sentinel_service"),
    ({"SENTINELS": "a:1", "SENTINEL_SERVICE": "fm", "URL": "unix:///tmp/r.sock"}, "redis.url"),
    ({"SENTINELS": "a:1", "SENTINEL_SERVICE": "fm", "URL": "rediss://h:1"}, "redis.url"),
])
def test_bad_sentinel_settings_stop_start_up_naming_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load_config(environ={f"FASTMATCH_REDIS__{k}": v for k, v in env.items()})


@pytest.mark.parametrize("bad", ["redis+sentinel://a:1", "redis+sentinel://a/s",
                                 "redis+sentinel://a:1/s/x"])
def test_a_bad_locator_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        sentinel.parse(bad)


# -- against the real deployment --------------------------------------------------------------------


@pytest.fixture
async def client(topology: SentinelTopology) -> AsyncIterator[RedisClient]:
    redis_client = RedisClient(topology.locator, RedisConfig(operation_timeout_s=TIMEOUT / 2))
    yield redis_client
    await redis_client.close()


async def test_the_client_finds_the_primary_through_the_sentinels_and_runs_scripts(
    topology: SentinelTopology, client: RedisClient
) -> None:
    store = PlayerStore(client, "w-sentinel", resume_grace_ms=1000)
    attached = await store.attach("sentinel-alice", "c1")  # a script: loaded on NOSCRIPT
    assert attached.player.state == "idle"
    assert client.locator.primary == ("127.0.0.1", topology.primary())
    with topology.node(topology.primary()) as primary:
        assert primary.hget(keys.player("sentinel-alice"), "conn") == "c1"
        primary.delete(keys.player("sentinel-alice"), keys.worker_players("w-sentinel"))


async def test_a_dead_sentinel_is_skipped(topology: SentinelTopology) -> None:
    dead = sentinel.SentinelSpec((("127.0.0.1", _closed_port()), *sentinel.parse(topology.locator).sentinels),  # type: ignore[union-attr]
                                 SERVICE)
    locator = sentinel.Locator(topology.locator, TIMEOUT)
    assert await locator.ask(dead) == (("127.0.0.1", topology.primary()), 1)
    with pytest.raises(RespConnectionError, match="no sentinel named the primary"):
        await locator.ask(sentinel.SentinelSpec((("127.0.0.1", _closed_port()),), SERVICE))
    with pytest.raises(RespConnectionError, match="no sentinel named the primary"):
        await locator.ask(sentinel.SentinelSpec(dead.sentinels, "no-such-service"))


async def test_a_node_that_answers_as_a_replica_is_not_used(topology: SentinelTopology) -> None:
    """A Sentinel that still names a demoted primary (here: a stand-in Sentinel that names the
    replica) gets its answer checked with ROLE: the client never writes to a replica."""
    replica = next(port for port in topology.nodes if port != topology.primary())
    stand_in = await _StandInSentinel.start(replica)
    try:
        locator = sentinel.Locator(f"redis+sentinel://127.0.0.1:{stand_in.port}/{SERVICE}", 0.5)
        with pytest.raises(RespConnectionError, match="no redis primary found"):
            await locator.connect()
        assert stand_in.asked >= 2  # asked again after each replica, until the timeout
    finally:
        await stand_in.close()


async def test_a_sentinel_that_names_a_replica_is_passed_over_for_the_next(
    topology: SentinelTopology,
) -> None:
    """A Sentinel cut off from the others may name the old primary, demoted since: its answer
    fails the ROLE check, and the next Sentinel is asked (which names the real primary), not
    the same one again until the timeout."""
    replica = next(port for port in topology.nodes if port != topology.primary())
    stand_in = await _StandInSentinel.start(replica)
    real = ",".join(f"{h}:{p}" for h, p in sentinel.parse(topology.locator).sentinels)  # type: ignore[union-attr]
    try:
        locator = sentinel.Locator(f"redis+sentinel://127.0.0.1:{stand_in.port},{real}/{SERVICE}", TIMEOUT)
        conn = await locator.connect()
        conn.close()
        assert locator.primary == ("127.0.0.1", topology.primary())
        assert stand_in.asked == 1
    finally:
        await stand_in.close()


async def test_a_write_refused_as_readonly_drops_the_connection(topology: SentinelTopology) -> None:
    """A connection left on a node that became a replica: READONLY is `unavailable` (it did not
    run), and the connection is dropped so the next call finds the primary again."""
    replica = next(port for port in topology.nodes if port != topology.primary())
    client = RedisClient(f"redis://127.0.0.1:{replica}/0", RedisConfig(operation_timeout_s=TIMEOUT))
    try:
        with pytest.raises(StoreUnavailable, match="READONLY") as refused:
            await client.command("SET", "sentinel-readonly", "x")
        assert not refused.value.maybe_ran
        first = client._conn
        assert first is not None and first.broken
        assert await client.command("GET", "sentinel-readonly") is None  # a new connection
        assert client._conn is not first
    finally:
        await client.close()


async def test_a_killed_primary_is_followed_to_the_new_one(
    topology: SentinelTopology, client: RedisClient
) -> None:
    """The store's connection dies with the primary; once the Sentinels promote the replica,
    the next call reaches it (scripts loaded again, since a replica's script cache is empty)."""
    store = PlayerStore(client, "w-failover", resume_grace_ms=1000)
    await store.attach("sentinel-bob", "c1")
    old = topology.kill_primary()
    try:
        new = await asyncio.to_thread(topology.wait_failover, old, TIMEOUT * 6)
        async with asyncio.timeout(TIMEOUT * 2):
            while True:
                with contextlib.suppress(StoreUnavailable):
                    attached = await store.attach("sentinel-bob", "c2")
                    break
                await asyncio.sleep(0.1)
        assert client.locator.primary == ("127.0.0.1", new)
        assert client.locator.failovers == 1
        assert attached.previous_conn in ("c1", "")  # "" only if the attach was not replicated
    finally:
        topology.restore(old)
    with topology.node(topology.primary()) as primary:
        primary.delete(keys.player("sentinel-bob"), keys.worker_players("w-failover"))


async def test_players_whose_last_writes_the_failover_lost_are_told(
    topology: SentinelTopology,
) -> None:
    """Writes the replica never received are lost with the primary (asynchronous replication).
    The replica is cut off while one player's enqueue and the match it made are written, then
    the primary is killed: after the failover, the player whose enqueue was lost is told
    `dequeued{removed}`, the one whose match was lost (its ticket was replicated) is told
    `requeued`, so neither waits for a ready check that no longer exists."""
    config = make_config()
    game = ReferenceGameServer(topology.locator)
    await game.start()
    worker = Worker(config, topology.locator)
    await worker.start(port=0)
    port = worker.front.port
    old, replica = 0, 0
    try:
        async with asyncio.timeout(TIMEOUT):
            await worker.subscriber.wait_subscribed()
        kept, _ = await connect_player(port, "sentinel-kept", 1500)
        lost, _ = await connect_player(port, "sentinel-lost", 1500)
        assert (await request(kept, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
        primary = topology.primary()
        with topology.node(primary) as node:
            assert node.execute_command("WAIT", 1, 5000) == 1  # all of that is on the replica
        replica = next(p for p in topology.nodes if p != primary)
        # Frozen, then cut off: what the primary writes from now on never reaches the replica
        # (bytes already sent would still wait in the frozen replica's socket buffer).
        topology.nodes[replica].send_signal(signal.SIGSTOP)
        try:
            with topology.node(primary) as node:
                assert node.execute_command("CLIENT", "KILL", "TYPE", "replica") == 1
            assert (await request(lost, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
            sessions = [(await start_loading(ws, TIMEOUT * 2))["loading_session_id"] for ws in (kept, lost)]
            assert sessions[0] == sessions[1]
            old = topology.kill_primary()
        finally:
            topology.nodes[replica].send_signal(signal.SIGCONT)
        await asyncio.to_thread(topology.wait_failover, old, TIMEOUT * 6)
        told_kept = await recv(kept, TIMEOUT * 3)
        assert told_kept["type"] == "requeued", told_kept
        told_lost = await recv(lost, TIMEOUT * 3)
        assert told_lost == {"type": "dequeued", "game_mode": "1v1", "reason": "removed"}, told_lost
        status = await request(kept, {"type": "status"})
        assert status["state"] == "queued", status
        await kept.close()
        await lost.close()
    finally:
        await worker.close()
        await game.close()
        if old:
            topology.restore(old)


async def test_a_reconnect_whose_attach_the_failover_lost_is_kept(
    topology: SentinelTopology,
) -> None:
    """A player reconnects (the new connection replaces the old one, 4009) just before the
    primary dies and its attach is lost: Redis names the old connection again. The worker
    knows that one is gone, so the new one is attached again, not closed as replaced."""
    worker = Worker(make_config(), topology.locator)
    await worker.start(port=0)
    port = worker.front.port
    old, replica = 0, 0
    try:
        async with asyncio.timeout(TIMEOUT):
            await worker.subscriber.wait_subscribed()
        first, _ = await connect_player(port, "sentinel-again", 1500)
        assert (await request(first, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
        primary = topology.primary()
        with topology.node(primary) as node:
            assert node.execute_command("WAIT", 1, 5000) == 1
        replica = next(p for p in topology.nodes if p != primary)
        topology.nodes[replica].send_signal(signal.SIGSTOP)
        try:
            with topology.node(primary) as node:
                assert node.execute_command("CLIENT", "KILL", "TYPE", "replica") == 1
            second, welcome = await connect_player(port, "sentinel-again", 1500)
            assert welcome["state"] == "queued"
            assert await closed_code(first) == 4009
            old = topology.kill_primary()
        finally:
            topology.nodes[replica].send_signal(signal.SIGCONT)
        await asyncio.to_thread(topology.wait_failover, old, TIMEOUT * 6)
        await eventually(lambda: _ready(worker), TIMEOUT * 2)
        await worker.subscriber.wait_subscribed(after_generation=1)
        await worker.front.resync()  # what the resubscription runs, awaited here
        status = await retry_while_unavailable(second, {"type": "status"})
        assert status["type"] == "queue_status" and status["state"] == "queued", status
        await second.close()
    finally:
        await worker.close()
        if old:
            topology.restore(old)


async def test_a_failover_longer_than_the_heartbeat_ttl_reaps_no_live_worker(
    topology: SentinelTopology,
) -> None:
    """Every heartbeat stops while no primary answers, so every deadline in the registry is
    past when the new one does: a worker must give the others the time to notice and
    heartbeat again before it reaps anyone, or it would put their players in the resume grace
    (README "Deployment: Sentinel"). The second worker asks a stand-in Sentinel that names the
    dead primary until half a second after the first worker is back."""
    config = make_config(**{"redis.breaker_cooldown_s": 2.0})
    hold_s = config.server.heartbeat_ttl_s + config.redis.breaker_cooldown_s
    stand_in = await _StandInSentinel.start(topology.primary())
    workers = [Worker(config, topology.locator),
               Worker(config, f"redis+sentinel://127.0.0.1:{stand_in.port}/{SERVICE}")]
    admin = sentinel.async_client(topology.locator, decode_responses=True)
    players, old = [], 0
    try:
        for w in workers:
            await w.start(port=0)
            async with asyncio.timeout(TIMEOUT):
                await w.subscriber.wait_subscribed()
        for i in range(4):
            ws, _ = await connect_player(workers[i % 2].front.port, f"sentinel-kept{i}", 1000 + 400 * i)
            assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
            players.append(ws)
        old = topology.kill_primary()
        new = await asyncio.to_thread(topology.wait_failover, old, TIMEOUT * 6)
        await eventually(lambda: _ready(workers[0]), TIMEOUT * 2)
        await asyncio.sleep(0.5)  # the first worker reaps, if it does, meanwhile
        assert not workers[1].front.ready
        stand_in.named = new
        await eventually(lambda: _ready(workers[1]), TIMEOUT * 2)
        await asyncio.sleep(hold_s)  # past the hold: a reap would have happened by now
        for i in range(4):
            worker = await admin.hget(keys.player(f"sentinel-kept{i}"), "worker")
            assert worker == workers[i % 2].worker_id, i
        assert await admin.zcard(keys.grace("1v1")) == 0
        for ws in players:
            status = await request(ws, {"type": "status"})
            assert status["type"] == "queue_status" and status["state"] == "queued", status
            await ws.close()
    finally:
        for w in workers:
            await w.close()
        await admin.aclose()
        await stand_in.close()
        if old:
            topology.restore(old)


async def _ready(worker: Worker) -> bool:
    return worker.front.ready


def _closed_port() -> int:
    from tests.store.sentinel_topology import free_port

    return free_port()  # bound and closed again: nothing listens there


class _StandInSentinel:
    """A tiny real server speaking just enough RESP: names ``port`` as the primary."""

    def __init__(self, port: int) -> None:
        self.named = port
        self.asked = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    @classmethod
    async def start(cls, named: int) -> _StandInSentinel:
        stand_in = cls(named)
        stand_in.server = await asyncio.start_server(stand_in._serve, "127.0.0.1", 0)
        stand_in.port = stand_in.server.sockets[0].getsockname()[1]
        return stand_in

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"get-master-addr-by-name\r\n")
            await reader.readline()
            await reader.readline()
            self.asked += 1
            port = str(self.named).encode()
            writer.write(b"*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%s\r\n" % (len(port), port))
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# -- `fastmatch serve` on the deployment, under simulated load, through a failover -------------------

@pytest.mark.slow
async def test_a_primary_killed_under_load_fails_over_without_a_restart(
    topology: SentinelTopology,
) -> None:
    """~150 players/s with the whole behaviour mix; the primary is SIGKILLed mid-run
    (tests/store/failover_load.py): matching resumes within the failover time + 5 s, no
    player matched twice or stuck, nothing left behind."""
    killed: list[int] = []
    try:
        failed = await serve_through_a_failover(
            topology.locator, topology.sentinel_env, lambda: killed.append(topology.kill_primary()),
            lambda: topology.wait_failover(killed[0], TIMEOUT * 6))
        print(f"failover {failed.failover_s:.1f}s, matching resumed {failed.resumed_s:.1f}s after the kill")
    finally:
        if killed:
            topology.restore(killed[0])
