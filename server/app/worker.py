"""One worker process: the WebSocket front end, its delivery subscriber and housekeeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from typing import Final, Protocol

from server import logthrottle, metrics
from server.app.handoff import Allocator
from server.app.housekeeping import Housekeeper
from server.app.loading import LoadingEvents, Sweeper
from server.app.matchmaker import Matchmaker
from server.app.outcomes import EndingMetrics
from server.app.trymatch import HoldCheck
from server.config import Config
from server.metrics import RedisMetrics
from server.protocol.auth import TokenVerifier
from server.store import keys
from server.store.client import RedisClient
from server.store.errors import StoreError
from server.store.matches import HoldTimes, LoadingStore, MatchStore
from server.store.players import PlayerStore
from server.transport.frontend import FrontEnd
from server.transport.services import Services
from server.transport.subscriber import Subscriber
from server.transport.wsproto import WebSocketProtocol

log = logging.getLogger(__name__)
_COUNTED: Final = ((metrics.REDIS_WRITES, ()), (metrics.WS_FRAMES, ("in",)),
                   (metrics.WS_FRAMES, ("out",)))


def hold_times(config: Config) -> HoldTimes:
    """Issue 16's holds; the one while no game server listens outlives a few ticks, so one
    late tick does not lift it, and the leader's next tick refreshes or clears it."""
    g = config.gameserver
    return HoldTimes(g.hold_initial_ms, g.hold_max_ms, max(3 * config.matching.tick_ms, 1000))


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    def __init__(self, config: Config, redis_url: str, worker_id: str | None = None) -> None:
        self.config = config
        keys.configure(redis_url)  # the key layout of this deployment (one slot on a cluster)
        self.worker_id = worker_id or new_worker_id()
        self.client = RedisClient(redis_url, config.redis, observer=RedisMetrics())
        grace_ms = config.server.resume_grace_ms
        self.store = PlayerStore(self.client, self.worker_id, grace_ms, config.penalty)
        self.loading = LoadingStore(
            self.client, resume_grace_ms=grace_ms,
            penalty_window_ms=int(config.penalty.window_s * 1000),
            finished_ttl_ms=config.matching.finished_match_ttl_ms, hold=hold_times(config),
            observer=EndingMetrics(),
        )
        self.allocator = Allocator(self.store, self.loading, config.gameserver,
                                   keys.battle_replies(self.worker_id))
        self.events = LoadingEvents(self.loading, self.allocator)
        self.front = FrontEnd(Services(
            config=config.server, modes=config.modes, store=self.store, loading=self.loading,
            events=self.events, verifier=TokenVerifier(config.auth), worker_id=self.worker_id,
            allocation_timeout_ms=config.gameserver.allocation_timeout_ms,
        ))
        self.subscriber = Subscriber(
            redis_url,
            {keys.worker_channel(self.worker_id): self.front.on_delivery,
             keys.battle_replies(self.worker_id): self.allocator.on_reply},
            self._resubscribed, config.redis,
        )
        self.housekeeper = Housekeeper(
            self.store, self.front, self.events, config.modes,
            interval_s=config.server.housekeeping_interval_s,
            heartbeat_ttl_s=config.server.heartbeat_ttl_s,
            heartbeat_interval_s=config.server.heartbeat_interval_s,
            audit_interval_s=config.server.audit_interval_s,
            # The longest a live worker takes to notice Redis is back (its breaker's probe
            # interval) and heartbeat again.
            reap_hold_s=config.server.heartbeat_ttl_s + config.redis.breaker_cooldown_s,
        )
        for name in config.modes:
            # A worker that never led exports a zero: without a series, "no leader" (a sum
            # below 1) could not be seen when nobody ever took the lease.
            metrics.LEADER.labels(name).set(0)
        hold = HoldCheck(config.gameserver.request_channel, hold_times(config).no_server_ms)
        self.matchmakers = {
            name: Matchmaker(name, mode, config.matching, MatchStore(self.client), self.worker_id,
                             Sweeper(name, self.loading), hold)
            for name, mode in config.modes.items()
        } if config.matching.enabled else {}
        self._closed = asyncio.Event()
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._counted = (0, WebSocketProtocol.frames_in, WebSocketProtocol.frames_out)

    async def _resubscribed(self) -> None:
        """After every (re)subscription: Redis answers again, so the store's breaker need not
        wait for its next probe before the resync (README "Deployment: Sentinel")."""
        await self.client.recheck()
        await self.front.resync()

    async def start(self, port: int | None = None, sock: socket.socket | None = None) -> None:
        server = self.config.server
        await self.front.start(server.host, server.port if port is None else port, sock)
        # Registered only once listening: the registry then lists workers that take players.
        try:
            await self.store.heartbeat(int(server.heartbeat_ttl_s * 1000))
            self.front.ready = True
        except StoreError as exc:
            log.warning("storage unreachable at start; will keep trying: %s", exc)
        self.subscriber.start()
        self.housekeeper.start()
        self._flusher = asyncio.create_task(self._flush_metrics(), name="metrics-flush")
        for matchmaker in self.matchmakers.values():
            matchmaker.start()
        log.info("worker %s listening on port %d", self.worker_id, self.front.port)

    async def close(self) -> None:
        """Stop accepting, close clients (1001), release leases and registry entries. Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            # Leases first: another worker takes over matchmaking while this one drains.
            await asyncio.gather(*(m.close() for m in self.matchmakers.values()))
            # Then the clients: once the front end is closed no ready check can complete here,
            # so no handoff can start after the allocator requeues those in flight.
            await self.front.close()
            await self.allocator.close()  # handoffs in flight: requeued (server_shutdown)
            await self.housekeeper.close()
            await self.subscriber.close()
            try:
                await self.store.forget_worker(self.worker_id)
            except StoreError as exc:
                log.warning("could not deregister worker %s: %s", self.worker_id, exc)
            await self.client.close()
            if self._flusher is not None:
                self._flusher.cancel()
                await asyncio.gather(self._flusher, return_exceptions=True)
        finally:
            self.flush_counters()
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def _flush_metrics(self) -> None:
        """The player's path counts in memory (server/metrics.py); /metrics sees it from here."""
        while True:
            await asyncio.sleep(self.config.metrics.flush_interval_s)
            try:
                self.flush_counters()
                logthrottle.flush_due()
            except Exception:  # task boundary: /metrics must not freeze for one failed write
                log.exception("flushing metrics failed")

    def flush_counters(self) -> None:
        """Per-process counters kept as plain integers on the hot path, into Prometheus."""
        seen = self._counted
        now = (self.client.writes, WebSocketProtocol.frames_in, WebSocketProtocol.frames_out)
        for (metric, labels), before, after in zip(_COUNTED, seen, now, strict=True):
            if after > before:
                metrics.inc(metric, *labels, amount=after - before)
        self._counted = now
        metrics.flush()


async def _leave(worker: Worker, delay_s: float, now: asyncio.Event) -> None:
    """Balancers first: /ready answers 503 while players, new ones too, are still served, so
    health checks take this host out before its players are closed (README "Behind a load
    balancer"). SIGINT cuts the delay short."""
    if now.is_set() or delay_s <= 0:
        return
    worker.front.leaving = True
    log.info("worker %s leaving: /ready answers 503; serving %.1fs more before draining",
             worker.worker_id, delay_s)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(now.wait(), delay_s)


class _Ready(Protocol):
    """The write end of the supervisor's readiness pipe."""

    def send_bytes(self, data: bytes) -> None: ...


class _Stamp(Protocol):
    """A float shared with the supervisor (``multiprocessing.Value("d")``)."""

    value: float


def run_worker(config: Config, redis_url: str, index: int, ready: _Ready | None = None,
               alive: _Stamp | None = None) -> None:
    """Entry point of a spawned worker process; sets ``ready`` once it is listening, and
    stamps ``alive`` (shared with the supervisor) every second its event loop runs."""
    from server.app.logs import setup_logging
    from server.osutil import die_with_parent, exit_if_orphaned

    die_with_parent()
    exit_if_orphaned()
    setup_logging(f"worker-{index}")
    import uvloop

    uvloop.run(_serve(config, redis_url, ready, alive))


async def _stamp(alive: _Stamp | None) -> None:
    """Every second the event loop runs: the supervisor's watchdog reads ``alive``
    (server.worker_stall_kill_s; CLOCK_MONOTONIC is one clock for every process of the host),
    and the gauge behind FastmatchWorkerStalled is the same evidence for an operator."""
    while True:
        if alive is not None:
            alive.value = time.monotonic()
        metrics.LOOP_ALIVE.set(time.time())
        await asyncio.sleep(1.0)


async def _serve(config: Config, redis_url: str, ready: _Ready | None, alive: _Stamp | None) -> None:
    worker = Worker(config, redis_url)
    stop = asyncio.Event()  # SIGTERM: leave the balancer's rotation, then drain
    now = asyncio.Event()  # SIGINT (Ctrl-C, a rolling restart): drain at once
    loop = asyncio.get_running_loop()

    def drain_now() -> None:
        stop.set()
        now.set()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, drain_now)
    # A SIGHUP sent to the whole group reaches us too; restarts are the supervisor's to decide.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    try:
        await worker.start()
    except BaseException:
        # Its background tasks are running already; stop them before the exception ends us.
        await worker.close()
        raise
    stamping = asyncio.create_task(_stamp(alive), name="alive")
    if ready is not None:
        # One byte down a pipe: it cannot block on a dead supervisor (a multiprocessing.Event
        # can: its set() waits for the killed waiter's acknowledgement, freezing this loop).
        with contextlib.suppress(OSError):
            ready.send_bytes(b"1")
    await stop.wait()
    # drain_timeout_s bounds everything from the signal on, the delay included.
    deadline = loop.time() + config.server.drain_timeout_s
    await _leave(worker, config.server.drain_delay_s, now)
    log.info("worker %s draining (at most %.1fs)", worker.worker_id, deadline - loop.time())
    try:
        async with asyncio.timeout_at(deadline):
            await worker.close()
    except TimeoutError:
        # Whatever is stuck must not keep the process alive: Redis state left behind is
        # handled like a crash (heartbeat expiry, resume grace, lease TTL).
        log.error("worker %s: drain did not finish in time; exiting", worker.worker_id)
        logging.shutdown()
        os._exit(1)
    stamping.cancel()
