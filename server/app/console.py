"""``/console/state``: what the live console shows, from one Redis round trip and the aggregate.

Runs in the supervisor, off the players' path: the workers do nothing for it. Redis gives the
cluster-wide view (queues, ready checks, leases, the worker registry, game servers listening),
read with one pipelined request (no MULTI); the multiprocess metrics give this host's view
(matches, waits, connections and breaker state per local worker). A state is reused for
``max_age_s``, so any number of open consoles costs at most one read per interval.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import redis
import redis.cluster
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.app.procstats import Processes
from server.store import keys, sentinel

WINDOW_S: Final = 60.0  # matches per minute and wait percentiles cover this much history
SHOWN: Final = 5  # longest-waiting players and ready checks listed per mode
BREAKER: Final = {0: "closed", 1: "half-open", 2: "open"}
_PERCENTILES: Final = (0.5, 0.95, 0.99)


class Waiting(msgspec.Struct, frozen=True):
    player: str
    waited_ms: int


class ReadyCheck(msgspec.Struct, frozen=True):
    match: str
    deadline_in_ms: int


class ModeMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """From this host's metrics: its leaders' matches since start and within the window."""

    matches_total: float = 0.0
    matches_window: float = 0.0
    wait_s: list[float | None] = []  # p50, p95, p99 of players matched within the window
    ticks_skipped_total: float = 0.0


class ModeState(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    local: ModeMetrics
    queued: int | None = None  # Redis: every ticket, cluster-wide
    disconnected: int | None = None  # of those, in their resume grace (not matchable)
    longest_waiting: list[Waiting] = []
    ready_checks: int | None = None  # matches in their ready check or handoff
    ready_check_list: list[ReadyCheck] = []
    leader: str | None = None  # worker id holding the lease
    lease_ms: int | None = None  # its remaining TTL
    epoch: int | None = None


class WorkerState(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # "" for a local worker not (yet) in the registry
    host: str
    pid: int | None
    process: str | None = None  # local role (worker-0, ...); None on another host
    heartbeat_in_ms: int | None = None
    players: int | None = None  # Redis: players whose connection it holds
    connections: float | None = None  # metrics, local workers only
    breaker: str | None = None
    leads: list[str] = []


class GameServers(msgspec.Struct, frozen=True, kw_only=True):
    channel: str
    listening: int | None = None  # subscribers of the request channel right now
    available: bool | None = None  # this host's health monitor (last battle request)
    misses_total: float = 0.0


class State(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    redis_error: str | None
    window_s: float
    breaker: str
    connections: float  # this host's workers only (metrics), labelled so on the page
    worker_restarts_total: float
    handshakes_refused_total: float
    game_servers: GameServers
    modes: list[ModeState]
    workers: list[WorkerState]


@dataclass(frozen=True)
class Observed:
    """What the supervisor lets its metrics port see."""

    redis_url: str
    modes: tuple[str, ...]
    request_channel: str
    timeout_s: float
    multiproc_dir: str
    processes: Processes  # local role -> pid
    # Held while the directory is read, and by the supervisor while it folds a dead worker's
    # files (server/app/metricfiles.py).
    files_lock: threading.Lock = field(default_factory=threading.Lock)


Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(families: Iterable[Any]) -> Samples:
    out: Samples = {}
    for family in families:
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(data: Samples, name: str, **match: str) -> float:
    return sum(v for labels, v in data.get(name, ()) if all(labels.get(k) == w for k, w in match.items()))


def buckets(data: Samples, name: str, mode: str) -> list[tuple[float, float]]:
    found = [(float(labels["le"]), v) for labels, v in data.get(name, ()) if labels.get("mode") == mode]
    return sorted(found)


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the rank."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if math.isinf(le):
                return lower  # above the highest finite bound: its value is all we know
            return lower + (le - lower) * (rank - below) / (count - below) if count > below else le
        lower, below = le, count
    return lower


def _numsub_everywhere(cluster: redis.cluster.RedisCluster, channel: str) -> list[tuple[str, int]]:
    """PUBSUB NUMSUB of every node of a cluster, summed. A node that does not answer (one
    being failed over) counts as none, as the server's own count does, instead of failing
    the whole view."""
    total = 0
    for node in cluster.get_nodes():  # type: ignore[no-untyped-call, unused-ignore]
        try:
            reply: Any = cluster.pubsub_numsub(channel, target_nodes=node)
        except (redis.RedisError, OSError):
            continue
        total += sum(int(count) for _, count in reply)
    return [(channel, total)]


class Console:
    def __init__(self, source: Observed, registry: CollectorRegistry, max_age_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.registry = registry
        self.max_age_s = max_age_s
        self.clock = clock
        self.host = socket.gethostname()
        keys.configure(source.redis_url)
        # One immediate retry: a pooled connection may be stale after a Redis restart.
        self.redis = sentinel.sync_client(
            source.redis_url, decode_responses=True, socket_timeout=source.timeout_s,
            socket_connect_timeout=source.timeout_s, retry=Retry(NoBackoff(), 1))
        self._lock = threading.Lock()
        self._cached: tuple[float, bytes] | None = None
        self._known_workers: list[str] = []  # from the previous read: whose sets to count
        self._history: deque[tuple[float, dict[str, float], dict[str, list[tuple[float, float]]]]] = deque()

    def state_json(self) -> bytes:
        with self._lock:
            if self._cached is None or self.clock() - self._cached[0] >= self.max_age_s:
                body = msgspec.json.encode(self.state())
                # Aged from when the read ended: stamped before it, a read slower than
                # max_age_s would leave every later request a miss and a read of its own.
                self._cached = (self.clock(), body)
            return self._cached[1]

    def close(self) -> None:
        self.redis.close()

    # -- Redis: one round trip -----------------------------------------------------------------

    def read_redis(self) -> list[Any]:
        """Everything the console shows from Redis, in one pipelined request (no MULTI).

        The per-worker player sets are those of the workers the previous read found: their ids
        are only known from the registry, and a second round trip is not worth a newcomer's
        count one refresh earlier."""
        cluster = self.redis if isinstance(self.redis, redis.cluster.RedisCluster) else None
        pipe = self.redis.pipeline(transaction=False)
        if cluster is None:
            pipe.time()
        pipe.zrange(keys.workers(), 0, -1, withscores=True)
        if cluster is None:
            pipe.pubsub_numsub(self.source.request_channel)
        for worker in self._known_workers:
            pipe.scard(keys.worker_players(worker))
        for mode in self.source.modes:
            pipe.zcard(keys.queue(mode))
            pipe.zcard(keys.grace(mode))
            pipe.zrange(keys.queue(mode), 0, SHOWN - 1, withscores=True)
            pipe.zcard(keys.loading(mode))
            pipe.zrange(keys.loading(mode), 0, SHOWN - 1, withscores=True)
            pipe.get(keys.leader(mode))
            pipe.pttl(keys.leader(mode))
            pipe.get(keys.epoch(mode))
        replies = list(pipe.execute())
        if cluster is not None:
            # A cluster pipeline carries keyed commands only. The clock is that of fastmatch's
            # node; a node counts its own subscribers only, and a game server may listen on any.
            home = cluster.get_node_from_key(keys.workers())
            replies.insert(0, cluster.execute_command("TIME", target_nodes=home))  # type: ignore[no-untyped-call, unused-ignore]
            replies.insert(2, _numsub_everywhere(cluster, self.source.request_channel))
        return replies

    # -- assembly ------------------------------------------------------------------------------

    def state(self) -> State:
        data = samples(self.registry.collect())
        local = self._local_workers()
        windowed = self._windowed(data)
        try:
            replies: list[Any] | None = self.read_redis()
            error = None
        except (redis.RedisError, OSError) as exc:
            replies, error = None, f"{type(exc).__name__}: {exc}"
        modes, workers, listening = self._from_redis(replies, data, windowed, local)
        available = [v for _, v in data.get("fastmatch_game_server_available", ())]
        return State(
            host=self.host, redis_error=error, window_s=windowed[0],
            breaker=BREAKER.get(int(max((v for _, v in data.get("fastmatch_redis_breaker_state", ())),
                                        default=0)), "?"),
            connections=total(data, "fastmatch_connections"),
            worker_restarts_total=total(data, "fastmatch_worker_restarts_total"),
            handshakes_refused_total=total(data, "fastmatch_handshakes_refused_total"),
            game_servers=GameServers(
                channel=self.source.request_channel, listening=listening,
                available=bool(min(available)) if available else None,
                misses_total=total(data, "fastmatch_game_server_misses_total")),
            modes=modes, workers=workers)

    def _windowed(self, data: Samples) -> tuple[float, dict[str, float], dict[str, list[float | None]]]:
        """Matches and wait percentiles over the last WINDOW_S, from the history of reads: this
        host's (its metrics count the matches its own leaders formed), labelled so on the page."""
        now = self.clock()
        matches = {m: total(data, "fastmatch_matches_created_total", mode=m) for m in self.source.modes}
        waits = {m: buckets(data, "fastmatch_match_wait_seconds_bucket", m) for m in self.source.modes}
        self._history.append((now, matches, waits))
        # The baseline is the oldest read within the window; after a pause in viewing, the
        # window starts again from the reads that follow instead of spanning the pause.
        while now - self._history[0][0] > WINDOW_S:
            self._history.popleft()
        then, old_matches, old_waits = self._history[0]
        window_matches = {m: matches[m] - old_matches.get(m, 0.0) for m in matches}
        percentiles: dict[str, list[float | None]] = {}
        for m, current in waits.items():
            before = dict(old_waits.get(m, []))
            delta = [(le, count - before.get(le, 0.0)) for le, count in current]
            percentiles[m] = [quantile(q, delta) for q in _PERCENTILES]
        return now - then, window_matches, percentiles

    def _local_workers(self) -> dict[int, tuple[str, Samples]]:
        """pid -> (role, that process's own live gauges), read from its files alone."""
        out: dict[int, tuple[str, Samples]] = {}
        for role, pid in self.source.processes().items():
            if not role.startswith("worker-"):
                continue
            files = [path for kind in ("livesum", "livemax", "livemin")
                     if os.path.exists(path := os.path.join(self.source.multiproc_dir,
                                                            f"gauge_{kind}_{pid}.db"))]
            merged = MultiProcessCollector.merge(files, accumulate=False) if files else []  # type: ignore[no-untyped-call]
            out[pid] = (role, samples(merged))
        return out

    def _from_redis(
        self, replies: list[Any] | None, data: Samples,
        windowed: tuple[float, dict[str, float], dict[str, list[float | None]]],
        local: Mapping[int, tuple[str, Samples]],
    ) -> tuple[list[ModeState], list[WorkerState], int | None]:
        _, window_matches, waits = windowed
        seen = {m: ModeMetrics(
            matches_total=total(data, "fastmatch_matches_created_total", mode=m),
            matches_window=window_matches[m], wait_s=waits[m],
            ticks_skipped_total=total(data, "fastmatch_try_match_skipped_total", mode=m),
        ) for m in self.source.modes}
        if replies is None:
            modes = [ModeState(name=m, local=seen[m]) for m in self.source.modes]
            return modes, [self._local_worker("", pid, local[pid]) for pid in sorted(local)], None
        it = iter(replies)
        seconds, micros = next(it)
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        registry: list[tuple[str, float]] = next(it)
        listening = int(dict(next(it)).get(self.source.request_channel, 0))
        players = {w: int(next(it)) for w in self._known_workers}
        self._known_workers = [w for w, _ in registry]
        modes = []
        for m in self.source.modes:
            queued, disconnected, oldest, loading, checks, leader, pttl, epoch = (
                next(it) for _ in range(8))
            modes.append(ModeState(
                name=m, local=seen[m], queued=int(queued), disconnected=int(disconnected),
                longest_waiting=[Waiting(p, now_ms - int(at)) for p, at in oldest],
                ready_checks=int(loading),
                ready_check_list=[ReadyCheck(mid, int(deadline) - now_ms) for mid, deadline in checks],
                leader=leader.rsplit("|", 1)[0] if leader else None,
                lease_ms=int(pttl) if leader else None, epoch=int(epoch) if epoch else None))
        leads: dict[str, list[str]] = {}
        for mode in modes:
            if mode.leader:
                leads.setdefault(mode.leader, []).append(mode.name)
        workers, matched = [], set()
        for worker, deadline in registry:
            host, pid = _host_pid(worker)
            mine = local.get(pid) if host == self.host and pid is not None else None
            if mine is not None and pid is not None:
                matched.add(pid)
                base = self._local_worker(worker, pid, mine)
            else:
                base = WorkerState(id=worker, host=host, pid=pid)
            workers.append(msgspec.structs.replace(
                base, heartbeat_in_ms=int(deadline) - now_ms, players=players.get(worker),
                leads=leads.get(worker, [])))
        workers += [self._local_worker("", pid, local[pid]) for pid in sorted(local) if pid not in matched]
        return modes, workers, listening

    def _local_worker(self, worker_id: str, pid: int, mine: tuple[str, Samples]) -> WorkerState:
        role, own = mine
        breaker = [v for _, v in own.get("fastmatch_redis_breaker_state", ())]
        return WorkerState(
            id=worker_id, host=self.host, pid=pid, process=role,
            connections=total(own, "fastmatch_connections"),
            breaker=BREAKER.get(int(breaker[0]), "?") if breaker else None)


def _host_pid(worker_id: str) -> tuple[str, int | None]:
    """Worker ids are ``<host>-<pid>-<random>`` (server/app/worker.py); hosts may hold dashes."""
    parts = worker_id.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return worker_id, None
    return parts[0], int(parts[1])
