"""fastmatch behind a real L4 balancer: HAProxy (Debian's package) in TCP mode with
``send-proxy-v2`` and ``/ready`` health checks, in front of two ``fastmatch serve`` instances
(separate supervisors and ports, as two hosts would be) sharing one Redis, TLS passed through to
fastmatch. The HAProxy config is README's "Behind a load balancer" block, rendered here with only
the addresses, the CA file and the check interval replaced (README issue 12)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.store import keys
from tests.app.served import Served, alive, free_port, wait_workers
from tests.conftest import GameServerFactory
from tests.edge.certs import client_context, make_cert
from tests.helpers import TIMEOUT, player_and_queue_keys, recv, request, send, token

HAPROXY = shutil.which("haproxy")
if HAPROXY is None and not os.environ.get("CI"):
    pytest.skip("haproxy is not installed (Debian package `haproxy`; .ci/run installs it)",
                allow_module_level=True)

README = Path(__file__).resolve().parents[2] / "README.md"
DRAIN_DELAY_S = 1.5  # > HAProxy's inter (100 ms here) x fall (2) plus a check's duration
FAR = 10_000  # ratings this far apart never meet a 1v1 window within a test


def readme_haproxy_config() -> str:
    section = README.read_text().split("\n## Behind a load balancer\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```haproxy\n", 1)[1].split("```", 1)[0]


def render(config: str, swaps: dict[str, str]) -> str:
    for old, new in swaps.items():
        assert config.count(old) == 1, f"README's HAProxy config no longer has {old!r}"
        config = config.replace(old, new)
    return config


class HAProxy:
    """HAProxy in the foreground; its log lines are awaited, not polled."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        assert HAPROXY, "CI must have haproxy: .ci/run installs it"
        self._proc = await asyncio.create_subprocess_exec(
            HAPROXY, "-db", "-f", str(self.config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            async with self._changed:
                self.lines.append(line.decode(errors="replace").rstrip())
                self._changed.notify_all()

    async def logged(self, text: str, timeout: float = TIMEOUT) -> str:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: any(text in line for line in self.lines))
        return next(line for line in self.lines if text in line)

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()
        if self._reader is not None:
            await self._reader


@dataclass
class Edge:
    port: int  # HAProxy's frontend
    tls: ssl.SSLContext
    hosts: dict[str, Served]  # "a", "b"
    haproxy: HAProxy
    admin: aioredis.Redis
    workers: dict[str, str] = field(default_factory=dict)  # worker id -> host name

    async def open(self, player: str, mmr: float | None = None, source: str = "127.0.0.1",
                   ) -> ClientConnection:
        return await connect(f"wss://127.0.0.1:{self.port}/ws", ssl=self.tls,
                             local_addr=(source, 0), open_timeout=TIMEOUT,
                             additional_headers={"Authorization": f"Bearer {token(player, mmr)}"})

    async def player(self, player: str, mmr: float | None = None, source: str = "127.0.0.1",
                     ) -> tuple[ClientConnection, dict[str, Any]]:
        ws = await self.open(player, mmr, source)
        return ws, await recv(ws)

    async def host_of(self, player: str) -> str:
        return self.workers[await self.admin.hget(keys.player(player), "worker")]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


EdgeFactory = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def edge(tmp_path: Path, redis_url: str, admin: aioredis.Redis) -> AsyncIterator[EdgeFactory]:
    hosts_started: list[Served] = []
    proxies_started: list[HAProxy] = []

    async def start(**env: str) -> Edge:
        cert = make_cert(tmp_path, "server")
        env = {"FASTMATCH_SERVER__TLS_CERT_FILE": str(cert.cert_file),
               "FASTMATCH_SERVER__TLS_KEY_FILE": str(cert.key_file),
               "FASTMATCH_SERVER__PROXY_PROTOCOL": "true",
               "FASTMATCH_SERVER__PROXY_TRUSTED": '["127.0.0.1/32"]',
               "FASTMATCH_SERVER__DRAIN_DELAY_S": str(DRAIN_DELAY_S),
               "FASTMATCH_SERVER__DRAIN_TIMEOUT_S": "6",
               "FASTMATCH_MATCHING__FINISHED_MATCH_TTL_MS": "300", **env}
        hosts = {name: Served(redis_url, 1, **env).start() for name in ("a", "b")}
        hosts_started.extend(hosts.values())
        pids = await wait_workers(admin, 2)
        by_supervisor = {served.proc.pid: name for name, served in hosts.items() if served.proc}
        config = tmp_path / "haproxy.cfg"
        port = free_port()
        config.write_text(render(readme_haproxy_config(), {
            "bind :443": f"bind 127.0.0.1:{port}",
            "10.0.0.11:8080": f"127.0.0.1:{hosts['a'].port}",
            "10.0.0.12:8080": f"127.0.0.1:{hosts['b'].port}",
            "/etc/haproxy/fastmatch-ca.pem": str(cert.cert_file),
            "inter 1s": "inter 100ms",
        }))
        haproxy = HAProxy(config)
        proxies_started.append(haproxy)
        await haproxy.start()
        found = Edge(port, client_context(cert), hosts, haproxy, admin,
                     {wid: by_supervisor[_parent(pid)] for wid, pid in pids.items()})
        async with asyncio.timeout(TIMEOUT):
            while True:  # HAProxy starts listening on its own time; nothing to wait on but that
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                await asyncio.sleep(0.05)
        return found

    yield start
    for haproxy in proxies_started:
        await haproxy.stop()
    for served in hosts_started:
        if served.proc is not None and served.proc.poll() is None:
            served.signal(signal.SIGINT)  # drain at once
        await asyncio.to_thread(served.stop)


async def no_keys_left(admin: aioredis.Redis) -> None:
    """Invariant 6, once the resume graces have run out."""
    left = await player_and_queue_keys(admin)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(TIMEOUT * 2):
            while left:
                await asyncio.sleep(0.1)  # expiry runs on housekeeping ticks: nothing to await
                left = await player_and_queue_keys(admin)
    assert not left, left


async def until_closed(ws: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await recv(ws, TIMEOUT * 2)
    return ws.close_code


# -- conformance through the balancer ---------------------------------------------------------------

async def test_conformance_through_the_balancer_over_tls(
    edge: EdgeFactory, admin: aioredis.Redis, start_game_server: GameServerFactory,
) -> None:
    e = await edge()
    await start_game_server()
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"wss://127.0.0.1:{e.port}/ws?token=not-a-jwt", ssl=e.tls, open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 401

    solo, welcome = await e.player("solo")
    assert welcome == {"type": "welcome", "player_id": "solo", "state": "idle", "protocol": 1}
    enqueued = await request(solo, {"type": "enqueue", "game_mode": "1v1", "request_id": "r"})
    assert enqueued["type"] == "enqueued" and enqueued["request_id"] == "r"
    assert (await request(solo, {"type": "status"}))["state"] == "queued"
    assert (await request(solo, {"type": "dequeue"}))["type"] == "dequeued"
    assert (await request(solo, {"type": "enqueue", "game_mode": "9v9"}))["code"] == "unsupported_game_mode"
    assert (await request(solo, {"type": "nope"}))["code"] == "invalid_message"
    await solo.close()

    # Two players, one on each host, matched and handed to the game server.
    ann, _ = await e.player("ann", 1500)
    bob, _ = await e.player("bob", 1510)
    assert {await e.host_of("ann"), await e.host_of("bob")} == {"a", "b"}
    for ws in (ann, bob):
        assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    for ws in (ann, bob):
        loading = await recv(ws)
        assert loading["type"] == "start_loading"
        await send(ws, {"type": "loading_complete", "loading_session_id": loading["loading_session_id"]})
    found = [await recv(ws) for ws in (ann, bob)]
    assert [m["type"] for m in found] == ["match_found"] * 2
    assert found[0]["loading_session_id"] == found[1]["loading_session_id"]
    for ws in (ann, bob):
        await ws.close()

    # One connection per player across hosts: the newer one, on the other host, wins (4009).
    first, _ = await e.player("rex", 2000)
    queued = await request(first, {"type": "enqueue", "game_mode": "1v1"})
    before = await e.host_of("rex")
    second, welcome = await e.player("rex", 2000)  # leastconn: the host without a connection
    assert await e.host_of("rex") != before
    assert welcome["state"] == "queued" and welcome["queued_at_ms"] == queued["queued_at_ms"]
    assert await until_closed(first) == 4009
    await second.close()
    await no_keys_left(admin)


# -- per-address limits see the clients, not the balancer -------------------------------------------

async def test_each_client_address_has_its_own_connection_budget(edge: EdgeFactory) -> None:
    burst = 2
    e = await edge(FASTMATCH_SERVER__CONNECT_RATE_PER_IP="0.01",
                   FASTMATCH_SERVER__CONNECT_BURST_PER_IP=str(burst))
    outcomes: Counter[str] = Counter()
    held = []
    for i in range(burst * 2 + 2):  # the budget is per worker: two hosts of one worker each
        ws, first = await e.player(f"x{i}", source="127.0.0.2")
        held.append(ws)
        outcomes[first.get("code", first["type"])] += 1
    assert outcomes["welcome"] <= burst * 2 and outcomes["rate_limited"] >= 2, outcomes
    # 127.0.0.2 has spent its budget on both hosts; 127.0.0.3, behind the same balancer, has not.
    other, welcome = await e.player("y0", source="127.0.0.3")
    assert welcome["type"] == "welcome"
    for ws in [*held, other]:
        await ws.close()


# -- a host taken out: SIGTERM ----------------------------------------------------------------------

async def test_sigterm_takes_the_host_out_then_its_players_resume_on_the_other(
    edge: EdgeFactory, admin: aioredis.Redis,
) -> None:
    e = await edge()
    stayers = {}
    for i in range(6):
        ws, _ = await e.player(f"s{i}", FAR * (i + 1))
        stayers[f"s{i}"] = (ws, (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["queued_at_ms"])
    on_a = [p for p in stayers if await e.host_of(p) == "a"]
    assert 0 < len(on_a) < len(stayers)

    # New players keep arriving the whole time; none may be refused.
    out_of_rotation, done = asyncio.Event(), asyncio.Event()
    arrivals: list[tuple[bool, str]] = []  # (started after HAProxy took a out, host or error)

    async def keep_arriving() -> None:
        i = 0
        while not done.is_set():
            after = out_of_rotation.is_set()
            try:
                ws, welcome = await e.player(f"n{i}")
                arrivals.append((after, await e.host_of(f"n{i}") if welcome["type"] == "welcome"
                                 else f"refused: {welcome}"))
                await ws.close()
            except (OSError, InvalidStatus, ConnectionClosed) as exc:
                arrivals.append((after, f"refused: {exc!r}"))
            i += 1
            await asyncio.sleep(0.05)

    arriving = asyncio.create_task(keep_arriving())
    e.hosts["a"].signal(signal.SIGTERM)
    down = await e.haproxy.logged("Server fastmatch/host-a is DOWN")
    out_of_rotation.set()
    assert "code: 503" in down  # taken out by /ready, while host a still serves (the delay)
    for p in on_a:
        assert await until_closed(stayers[p][0]) == 1001
    # Through the balancer again: the other host, same place in the queue.
    for p in on_a:
        ws, welcome = await e.player(p, FAR * (int(p[1:]) + 1))
        assert welcome["state"] == "queued" and welcome["queued_at_ms"] == stayers[p][1], welcome
        assert await e.host_of(p) == "b"
        stayers[p] = (ws, stayers[p][1])
    assert await asyncio.to_thread(e.hosts["a"].wait, TIMEOUT) == 0
    done.set()  # not cancel(): a cancellation landing inside a client library may be swallowed
    async with asyncio.timeout(TIMEOUT):
        await arriving
    refused = [host for _, host in arrivals if host.startswith("refused")]
    assert not refused and len(arrivals) > 10, refused[:3]
    assert {host for after, host in arrivals if after} == {"b"}
    for ws, _ in stayers.values():
        await ws.close()
    await no_keys_left(admin)


# -- a host lost: SIGKILL ---------------------------------------------------------------------------

@dataclass
class Matcher:
    """A client that wants one match: it answers ready checks, and when its connection ends
    unexpectedly it reconnects through the balancer and carries on from what ``welcome`` says."""

    name: str
    mmr: float
    edge: Edge
    found: list[dict[str, Any]] = field(default_factory=list)
    told: list[dict[str, Any]] = field(default_factory=list)  # errors and removals
    reconnects: int = 0

    async def run(self, loading: asyncio.Event, go: asyncio.Event) -> None:
        ws = await self._connect(enqueue=True)
        while not self.found:
            try:
                message = await recv(ws, TIMEOUT * 2)
            except ConnectionClosed:
                self.reconnects += 1
                ws = await self._connect(enqueue=False)
                continue
            match message["type"]:
                case "start_loading":
                    loading.set()
                    await go.wait()  # the ready check is open while the host goes down
                    await self._ready(ws, message["loading_session_id"])
                case "match_found":
                    self.found.append(message)
                case "dequeued" | "error":
                    self.told.append(message)
                    if message.get("reason") == "removed" or message.get("code") == "loading_timeout":
                        await send(ws, {"type": "enqueue", "game_mode": "1v1"})  # out: queue again
        await ws.close()

    async def _connect(self, enqueue: bool) -> ClientConnection:
        async with asyncio.timeout(TIMEOUT * 2):
            while True:
                try:
                    ws, welcome = await self.edge.player(self.name, self.mmr)
                    break
                except (OSError, InvalidStatus, ConnectionClosed):
                    await asyncio.sleep(0.1)  # a real client's backoff while the host is lost
        if enqueue or welcome["state"] == "idle":
            await send(ws, {"type": "enqueue", "game_mode": "1v1"})
        elif welcome["state"] == "loading":
            await self._ready(ws, welcome["loading_session_id"])
        return ws

    @staticmethod
    async def _ready(ws: ClientConnection, session: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await send(ws, {"type": "loading_complete", "loading_session_id": session})


@pytest.mark.parametrize("lost", ["supervisor", "host"])
async def test_sigkill_players_reconnect_and_resume_and_nobody_is_matched_twice(
    edge: EdgeFactory, admin: aioredis.Redis, start_game_server: GameServerFactory, lost: str,
) -> None:
    """``supervisor``: SIGKILL to host a's supervisor (its worker is told by the kernel and
    drains on its own). ``host``: its worker is SIGKILLed too, as if the machine died."""
    e = await edge()
    await start_game_server()
    stayers = {}
    for i in range(4):
        ws, _ = await e.player(f"s{i}", FAR * (i + 1))
        stayers[f"s{i}"] = (ws, (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["queued_at_ms"])
    pairs = [(1500.0, 1501.0), (3000.0, 3001.0), (4500.0, 4501.0)]
    matchers = [Matcher(f"m{i}{j}", mmr, e) for i, pair in enumerate(pairs) for j, mmr in enumerate(pair)]
    go = asyncio.Event()
    loading = [asyncio.Event() for _ in matchers]
    running = [asyncio.create_task(m.run(flag, go)) for m, flag in zip(matchers, loading, strict=True)]
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(flag.wait() for flag in loading))  # every match is in its ready check
    hosts = {m.name: await e.host_of(m.name) for m in matchers}
    assert set(hosts.values()) == {"a", "b"}
    on_a = [p for p in stayers if await e.host_of(p) == "a"]
    a = e.hosts["a"]
    assert a.proc is not None
    victims = [pid for wid, pid in (await wait_workers(admin, 2)).items() if e.workers[wid] == "a"]
    a.proc.kill()
    if lost == "host":
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(TIMEOUT * 2):
        while any(alive(pid) for pid in victims):
            await asyncio.sleep(0.05)  # a process's end: nothing to await from here
    go.set()  # the ready checks are answered only now: host a's players must come back first

    async with asyncio.timeout(TIMEOUT * 4):
        await asyncio.gather(*running)
    for p in on_a:  # queued players of the lost host come back to their place
        assert await until_closed(stayers[p][0]) in (1001, 1006)
        ws, welcome = await e.player(p, FAR * (int(p[1:]) + 1))
        assert welcome["state"] == "queued" and welcome["queued_at_ms"] == stayers[p][1], welcome
        stayers[p] = (ws, stayers[p][1])
    # Everyone was matched exactly once, and every match is the one its players were told of.
    assert all(len(m.found) == 1 for m in matchers)
    teams: dict[str, list[list[str]]] = {}
    for m in matchers:
        message = m.found[0]
        assert teams.setdefault(message["loading_session_id"], message["teams"]) == message["teams"]
    players = sorted(p for match in teams.values() for team in match for p in team)
    assert players == sorted(m.name for m in matchers)
    assert all(m.reconnects for m in matchers if hosts[m.name] == "a")
    for ws, _ in stayers.values():
        await ws.close()
    await no_keys_left(admin)
