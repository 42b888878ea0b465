"""Prometheus metrics (one module so names and label sets stay consistent).

Gauges declare their multiprocess mode on purpose: workers are separate processes and the
supervisor serves one aggregate (prometheus-client multiprocess mode).

The player's path does not touch Prometheus directly: in multiprocess mode every ``inc`` and
``observe`` takes a lock and writes a memory-mapped file (several microseconds, a dozen times
per player). ``inc``, ``observe`` and ``add`` below count in process memory instead, and
``flush`` adds the totals to Prometheus' files; each worker flushes every second and at exit,
so a scrape sees exact counts at most a second late.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

# The edges include the shipped SLOs (30, 60, 90 s): histogram_quantile interpolates inside a
# bucket, so an SLO inside a wide one would be judged on the interpolation, not on the data.
_WAIT_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300)
_RATING_BUCKETS: Final = (0, 10, 25, 50, 100, 200, 300, 500, 800, 1200, 2000)
_TICK_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

MATCHES_CREATED: Final = Counter(
    "fastmatch_matches_created", "Matches committed by TryMatch", ["mode"])
PLAYERS_MATCHED: Final = Counter(
    "fastmatch_players_matched", "Players placed into a match", ["mode"])
MATCH_WAIT: Final = Histogram(
    "fastmatch_match_wait_seconds", "Queue wait of each matched player", ["mode"], buckets=_WAIT_BUCKETS)
MATCH_SPREAD: Final = Histogram(
    "fastmatch_match_rating_spread", "Max minus min rating within a match", ["mode"],
    buckets=_RATING_BUCKETS)
MATCH_TEAM_GAP: Final = Histogram(
    "fastmatch_match_team_gap", "Difference between the teams' rating sums", ["mode"],
    buckets=_RATING_BUCKETS)
TRY_MATCH_SECONDS: Final = Histogram(
    "fastmatch_try_match_seconds", "Duration of one TryMatch tick", ["mode"], buckets=_TICK_BUCKETS)
TRY_MATCH_SKIPPED: Final = Counter(
    "fastmatch_try_match_skipped", "Ticks skipped because the previous one was still running",
    ["mode"])
POISONED: Final = Counter(
    "fastmatch_poisoned_candidates", "Undecodable or ownerless tickets removed", ["mode"])
COMMITS_FENCED: Final = Counter(
    "fastmatch_commits_fenced", "Commits refused because the lease was lost", ["mode"])
QUEUE_SIZE: Final = Gauge(
    "fastmatch_queue_size", "Matchable candidates seen by the leader's last tick", ["mode"],
    multiprocess_mode="livemax")
POOL_LOADS: Final = Counter(
    "fastmatch_pool_loads", "Full reads of a queue by its leader's pool (a new leader, or a "
    "pool that disagreed with the queue)", ["mode"])
LEADER: Final = Gauge(
    "fastmatch_leader", "1 while this process holds the mode's matchmaking lease", ["mode"],
    multiprocess_mode="livesum")

LOADING_SECONDS: Final = Histogram(
    "fastmatch_loading_seconds", "From start_loading until every player was ready", ["mode"],
    buckets=_WAIT_BUCKETS)
MATCHES_ASSIGNED: Final = Counter(
    "fastmatch_matches_assigned", "Matches a game server accepted", ["mode"])
MATCHES_ENDED: Final = Counter(
    "fastmatch_matches_ended", "Matches by final status and reason", ["mode", "status", "reason"])
PLAYERS_REQUEUED: Final = Counter(
    "fastmatch_players_requeued", "Players put back in the queue, by reason", ["mode", "reason"])
PLAYERS_REMOVED: Final = Counter(
    "fastmatch_players_removed", "Players removed by a ready check (left or timed out)",
    ["mode", "reason"])
PLAYERS_BLOCKED: Final = Counter(
    "fastmatch_players_blocked", "Enqueues refused with player_blocked", ["mode"])
GAME_SERVER_MISSES: Final = Counter(
    "fastmatch_game_server_misses", "battle_request published with no game server listening")
MATCHING_HELD: Final = Gauge(
    "fastmatch_matching_held", "1 while the mode's leader forms no matches, by reason: game_server "
    "(nobody listens to battle requests), allocation_failed (back-off after failed handoffs)",
    ["mode", "reason"], multiprocess_mode="livemax")
HOLD_REASONS: Final = ("game_server", "allocation_failed")
GAME_SERVER_AVAILABLE: Final = Gauge(
    "fastmatch_game_server_available", "0 after a battle_request reached no game server",
    multiprocess_mode="livemin")

# -- front end and storage (issue: production server) ------------------------------------------

CONNECTIONS: Final = Gauge(
    "fastmatch_connections", "Open client WebSocket connections", multiprocess_mode="livesum")
MESSAGES_IN: Final = Counter(
    "fastmatch_messages_received", "Client messages by type (invalid: undecodable)", ["type"])
MESSAGES_OUT: Final = Counter(
    "fastmatch_messages_sent", "Server messages by type", ["type"])
ERRORS_SENT: Final = Counter(
    "fastmatch_errors_sent", "error messages sent to clients, by code", ["code"])
RATE_LIMITED: Final = Counter(
    "fastmatch_rate_limited", "Messages or connections refused by a rate limit", ["kind"])
REDIS_SECONDS: Final = Histogram(
    "fastmatch_redis_call_seconds", "Redis call latency by operation", ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0))
REDIS_FAILURES: Final = Counter(
    "fastmatch_redis_failures", "Redis calls that failed, by outcome", ["outcome"])
REDIS_TIMEOUTS: Final = Counter(
    "fastmatch_redis_timeouts", "Redis calls abandoned at the operation timeout")
BREAKER_STATE: Final = Gauge(
    "fastmatch_redis_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
    multiprocess_mode="livemax")
REDIS_WRITES: Final = Counter(
    "fastmatch_redis_writes", "Writes to Redis (round trips: pipelined calls share one)")
WS_FRAMES: Final = Counter(
    "fastmatch_ws_frames", "WebSocket frames, by direction (in, out)", ["direction"])
HANDSHAKES_REFUSED: Final = Counter(
    "fastmatch_handshakes_refused", "New WebSocket handshakes refused at once (HTTP 503) instead "
    "of served, by reason (loop_lag, queued, inflight, max_connections, draining)", ["reason"])
HANDSHAKE_WAIT: Final = Histogram(
    "fastmatch_handshake_wait_seconds", "From a handshake request's arrival in the kernel (the "
    "accept queue included) to its answer, by HTTP status (101 welcomed, 503 refused, ...)",
    ["status"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
PROXY_REJECTED: Final = Counter(
    "fastmatch_proxy_rejected", "Connections closed before a valid PROXY protocol header, by reason "
    "(untrusted, missing, malformed, truncated, timeout)", ["reason"])
TLS_FAILED: Final = Counter(
    "fastmatch_tls_failed", "TLS connections closed on a TLS error (e.g. a plain ws:// client, "
    "no shared cipher, a corrupt record)")
LOOP_LAG: Final = Gauge(
    "fastmatch_event_loop_lag_seconds", "How late the worker's event loop ran a timer (recent max)",
    multiprocess_mode="livemax")
LOOP_ALIVE: Final = Gauge(
    "fastmatch_event_loop_alive_timestamp_seconds", "Unix time a worker's event loop last stamped "
    "it (every second; the oldest of the host's workers): a wedged loop stops it",
    multiprocess_mode="livemin")
# Stamped at the import, the first thing a worker process does (it unpickles its entry point
# from server.app.worker): declared, the gauge reads 0 (1970) in this process's file, and so
# in the host's minimum, until the worker's loop stamps it once started. The supervisor, which
# also imports this module and never stamps it, marks its own live gauges dead.
LOOP_ALIVE.set(time.time())
RETRY_AFTER: Final = Gauge(
    "fastmatch_overload_retry_after_seconds", "The Retry-After of the worker's 503s: "
    "server.overload_retry_after_s, more while it refuses a large share of handshakes",
    multiprocess_mode="livemax")
# Incremented by the supervisor, whose process writes to the same multiprocess directory.
WORKER_RESTARTS: Final = Counter(
    "fastmatch_worker_restarts", "Worker starts after a death (each retry of a failed start counts)")


class RedisMetrics:
    """The store's CallObserver, recording into Prometheus."""

    def call_done(self, op: str, seconds: float, outcome: str) -> None:
        if outcome == "ok":
            observe(REDIS_SECONDS, seconds, op)
            return
        inc(REDIS_FAILURES, outcome)
        if outcome == "timeout":
            inc(REDIS_TIMEOUTS)

    def breaker_changed(self, state: int) -> None:
        BREAKER_STATE.set(int(state))


# -- in-process tallies, flushed into Prometheus -------------------------------------------------

class _Pending:
    """One label set's counts since the last flush (a counter's, a gauge's delta, or a
    histogram's buckets and sum)."""

    __slots__ = ("bounds", "buckets", "child", "total")

    def __init__(self, metric: Any, labels: tuple[str, ...]) -> None:
        self.child = metric.labels(*labels) if labels else metric
        self.total = 0.0
        bounds = getattr(self.child, "_upper_bounds", None)
        self.bounds: list[float] = list(bounds) if bounds else []
        self.buckets = [0] * len(self.bounds)

    def flush(self) -> None:
        child = self.child
        if self.bounds:
            # Histogram internals (stable since prometheus-client 0.4): per-bucket values and
            # the sum; tests/app/test_metrics.py compares the result with plain observe().
            for i, count in enumerate(self.buckets):
                if count:
                    child._buckets[i].inc(count)
                    self.buckets[i] = 0
            if self.total:
                child._sum.inc(self.total)
        elif self.total:
            child.inc(self.total)
        self.total = 0.0


_pending: dict[tuple[Any, tuple[str, ...]], _Pending] = {}


def _entry(metric: Any, labels: tuple[str, ...]) -> _Pending:
    entry = _pending.get((metric, labels))
    if entry is None:
        entry = _pending[(metric, labels)] = _Pending(metric, labels)
    return entry


def inc(metric: Counter, *labels: str, amount: float = 1.0) -> None:
    """``metric.labels(*labels).inc(amount)``, counted in memory until the next ``flush``."""
    _entry(metric, labels).total += amount


def add(metric: Gauge, amount: float, *labels: str) -> None:
    """Move a livesum gauge by ``amount`` (e.g. +1/-1 per connection) at the next ``flush``."""
    _entry(metric, labels).total += amount


def observe(metric: Histogram, value: float, *labels: str) -> None:
    """``metric.labels(*labels).observe(value)``, counted in memory until the next ``flush``."""
    entry = _entry(metric, labels)
    entry.buckets[bisect_left(entry.bounds, value)] += 1
    entry.total += value


def flush() -> None:
    """Add everything counted since the last call to Prometheus (files or registry)."""
    for entry in list(_pending.values()):
        entry.flush()
