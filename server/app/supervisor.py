"""``fastmatch serve``: the supervisor of the worker processes (DESIGN "Shape").

Workers are started with ``spawn`` (no inherited event loop or sockets) and each binds the
public port with SO_REUSEPORT. Signal handlers only record the signal; the main loop acts:
SIGTERM/SIGINT drain everything within the drain timeout (passed on to the workers: SIGTERM
first takes the host out of the balancer's rotation for the drain delay, SIGINT drains at once),
SIGHUP restarts the workers one by one, each replacement listening before its predecessor
drains, so the port always has a listener. TLS files are checked before any worker starts, and
again before a rolling restart, which is how a renewed certificate goes live.
A worker that dies is restarted with backoff, without blocking the signal loop: the loop
watches the replacement's readiness, and a replacement that fails is tried again after the
backoff (the other workers keep serving meanwhile). Only at first start does a worker that
dies before it is ready (a bad port, a config it cannot use) stop the supervisor. A second
SIGTERM/SIGINT during the drain kills what is left at once. The embedded Redis (development)
runs in a session of its own, out of reach of a terminal's Ctrl-C, and is started again if it
exits.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any, Final

from prometheus_client import multiprocess

from server import metrics
from server.app.console import Observed
from server.app.gameserver import Behaviour, run_gameserver
from server.app.metricfiles import MetricFiles
from server.app.metrics_http import MetricsServer
from server.app.worker import run_worker
from server.config import DEV_SECRET, Config
from server.errors import ConfigError
from server.store import sentinel
from server.store.embedded import EmbeddedRedis
from server.store.errors import StoreError
from server.transport.tls import load_context

log = logging.getLogger(__name__)
_ctx: Final = mp.get_context("spawn")
_STARTUP_S: Final = 60.0  # a worker must be listening within this
_STABLE_S: Final = 30.0  # alive this long: its slot's restart backoff resets
_REDIS_RESTART_EVERY_S: Final = 1.0  # the embedded Redis is started again at most this often
_BACKOFF_MAX_S: Final = 30.0
# A SIGKILLed process is waited for this long at most: one in uninterruptible sleep (a hung
# disk or NFS read) dies only when that ends, and the supervisor must go on watching the rest.
_KILLED_WAIT_S: Final = 5.0


def _backoff(failures: int) -> float:
    """0.5 s doubling to 30 s after repeated failures of one slot; 0 for the first death."""
    return min(0.5 * 2 ** max(failures - 1, 0), _BACKOFF_MAX_S) if failures else 0.0


def _readable(conn: Connection, timeout_s: float) -> bool:
    """Has the worker written its ready byte? (EOF without it means it died first.)"""
    try:
        return conn.poll(timeout_s) and bool(conn.recv_bytes())
    except (EOFError, OSError):
        return False


class StartupFailed(Exception):
    """A worker exited (or hung) before it was ready."""


class Interrupted(Exception):
    """A stop signal arrived while a rolling restart waited for a replacement."""


@dataclass
class Slot:
    index: int
    process: SpawnProcess | None = None
    ready: Connection | None = None  # read end of the worker's readiness pipe
    started: float = 0.0
    failures: int = 0
    restart_at: float = field(default=0.0)
    starting: bool = False  # a restart is running and the worker is not ready yet
    # When the worker's event loop last ran (time.monotonic(), written by the worker every
    # second): the stall watchdog's evidence (server.worker_stall_kill_s).
    alive: Any = None
    seen: float = 0.0  # the stamp at the last look
    stalled_s: float = 0.0  # supervisor time the stamp has not moved


class Supervisor:
    def __init__(self, config: Config, workers: int, multiproc_dir: str | None = None) -> None:
        self.config = config
        self.slots = [Slot(i) for i in range(workers or os.cpu_count() or 1)]
        self.multiproc_dir = multiproc_dir
        # Dead workers' metric files folded as they go (server/app/metricfiles.py).
        self.files = MetricFiles(multiproc_dir) if multiproc_dir else None
        self.redis: EmbeddedRedis | None = None
        self.url = sentinel.locator(config.redis)  # a URL, a Sentinel locator, or "": embedded
        self.gameserver: SpawnProcess | None = None
        self.metrics: MetricsServer | None = None
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._redis_restart_at = 0.0
        self._last_turn = 0.0  # when _reap_and_restart last ran (the stall watchdog's clock)
        self._turn_s = 0.0
        self._hurry = False  # a second stop signal came: whatever is left is killed at once
        self._stop_signal = signal.SIGTERM  # what the workers get at shutdown: the one we got

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        self.check_files()  # before anything starts: a bad file is a ConfigError naming its key
        if self.config.auth.algorithm.startswith("HS") and self.config.auth.secret == DEV_SECRET:
            log.warning("*** using the PUBLIC development auth secret: anyone can mint tokens. "
                        "Set auth.secret (FASTMATCH_AUTH__SECRET) before exposing this server ***")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: self._signals.put(signum))
        try:
            self._start_services()
            for slot in self.slots:
                self._start(slot)
            for slot in self.slots:
                self._wait_ready(slot)
            log.info("supervisor pid %d: %d workers on port %d",
                     os.getpid(), len(self.slots), self.config.server.port)
            return self._loop()
        except StartupFailed as exc:
            log.error("%s; stopping", exc)
            return 1
        finally:
            self._shutdown()

    def check_files(self) -> None:
        """Read the TLS files the workers will read, so a bad one stops us with its key named."""
        server = self.config.server
        if server.tls_cert_file:
            load_context(server.tls_cert_file, server.tls_key_file)

    def _start_services(self) -> None:
        if not self.url:
            self.redis = EmbeddedRedis().start()
            self.url = self.redis.url
            log.info("no redis.url or redis.sentinels configured: using embedded redis at %s", self.url)
        if self.multiproc_dir:
            # This process declares every metric (it imports their module) but sets no gauge;
            # its zero-valued live gauges would win every livemin (game_server_available).
            multiprocess.mark_process_dead(os.getpid(), self.multiproc_dir)  # type: ignore[no-untyped-call]
        if self.files is not None and self.config.metrics.port:  # (files: a metrics directory)
            observed = Observed(
                redis_url=self.url, modes=tuple(self.config.modes),
                request_channel=self.config.gameserver.request_channel,
                timeout_s=self.config.redis.operation_timeout_s,
                multiproc_dir=self.files.path, processes=self.processes,
                files_lock=self.files.lock)
            self.metrics = MetricsServer(self.config.metrics.host or self.config.server.host,
                                         self.config.metrics.port, observed, self.config.metrics.token)
            self.metrics.start()
        if self.config.gameserver.embedded:
            # Dev only (refused with production = true): the whole lifecycle out of the box.
            self.gameserver = _ctx.Process(target=run_gameserver, name="gameserver", args=(
                self.url, self.config.gameserver.request_channel, Behaviour(), True))
            self.gameserver.start()

    def _loop(self) -> int:
        while True:
            try:
                signum = self._signals.get(timeout=0.2)
            except queue.Empty:
                self._reap_and_restart()
                continue
            if signum == signal.SIGHUP:
                self._rolling_restart()
                continue
            log.info("received %s: draining", signal.Signals(signum).name)
            self._stop_signal = signal.Signals(signum)
            return 0

    # -- workers ----------------------------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        """Spawn the slot's worker (raises OSError when the process cannot even be created)."""
        slot.ready, writer = _ctx.Pipe(duplex=False)
        slot.alive = _ctx.Value("d", time.monotonic(), lock=False)
        slot.seen, slot.stalled_s = slot.alive.value, 0.0
        slot.process = _ctx.Process(
            target=run_worker, name=f"worker-{slot.index}",
            args=(self.config, self.url, slot.index, writer, slot.alive),
        )
        slot.process.start()
        writer.close()  # the worker holds the only write end now
        slot.started = time.monotonic()

    def _wait_ready(self, slot: Slot, interruptible: bool = False) -> None:
        assert slot.process is not None and slot.ready is not None
        deadline = time.monotonic() + _STARTUP_S
        while not _readable(slot.ready, 0.1):
            if interruptible and not self._signals.empty():
                raise Interrupted
            if not slot.process.is_alive():
                raise StartupFailed(f"worker-{slot.index} exited with {slot.process.exitcode} "
                                    "before it was ready")
            if time.monotonic() > deadline:
                slot.process.kill()
                raise StartupFailed(f"worker-{slot.index} was not ready within {_STARTUP_S:.0f}s")

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        # Time the watchdog counts in this turn: at most a second, so that a freeze of the whole
        # host (Ctrl-Z, docker pause, a VM paused), the supervisor included, is not counted
        # against workers that had no chance to stamp yet.
        self._turn_s = min(max(now - self._last_turn, 0.0), 1.0) if self._last_turn else 0.0
        self._last_turn = now
        self._watch_redis(now)
        for slot in self.slots:
            process = slot.process
            if process is not None and slot.starting:
                self._check_restart(slot, process, now)
                continue
            killed = process is not None and process.is_alive() and self._kill_if_stalled(slot, process)
            if process is not None and (killed or not process.is_alive()):
                # (Killed, it may linger in uninterruptible sleep a while: it is in no slot
                # any more, its slot gets a new worker, and multiprocessing reaps it later.)
                self._forget(process)
                lived = now - slot.started
                slot.failures = 0 if lived > _STABLE_S else slot.failures + 1
                delay = _backoff(slot.failures)
                log.error("worker-%d (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                          slot.index, process.pid, process.exitcode, lived, delay)
                slot.process, slot.restart_at = None, now + delay
            if slot.process is None and now >= slot.restart_at:
                metrics.WORKER_RESTARTS.inc()
                try:
                    self._start(slot)
                except OSError as exc:  # no process could be made (fds, memory): later
                    slot.failures += 1
                    slot.process, slot.restart_at = None, now + _backoff(slot.failures)
                    log.error("worker-%d could not be started (%s); next try in %.1fs",
                              slot.index, exc, slot.restart_at - now)
                    continue
                slot.starting = True

    def _kill_if_stalled(self, slot: Slot, process: SpawnProcess) -> bool:
        """A worker whose event loop stopped running (a busy loop, a blocking call, a stopped
        process) still holds its listening socket: the kernel keeps handing it new players,
        who hang. Killed, it is restarted like any worker that died, and its players
        reconnect (Redis already counted it dead: its heartbeat has lapsed)."""
        limit = self.config.server.worker_stall_kill_s
        if not limit or slot.alive is None:
            return False
        stamp = slot.alive.value
        if stamp != slot.seen:
            slot.seen, slot.stalled_s = stamp, 0.0
            return False
        slot.stalled_s += self._turn_s
        if slot.stalled_s <= limit:
            return False
        log.error("worker-%d (pid %s): its event loop has not run for %.0fs "
                  "(server.worker_stall_kill_s = %g); killing it", slot.index, process.pid,
                  slot.stalled_s, limit)
        _killed(process)
        return True

    def _check_restart(self, slot: Slot, process: SpawnProcess, now: float) -> None:
        """A restarted worker is watched here, one look per loop turn, never waited on."""
        assert slot.ready is not None
        if _readable(slot.ready, 0):
            slot.starting = False
            log.info("worker-%d restarted (pid %s)", slot.index, process.pid)
            return
        if process.is_alive() and now - slot.started < _STARTUP_S:
            return
        _killed(process)
        self._forget(process)
        slot.failures += 1
        slot.process, slot.starting = None, False
        slot.restart_at = now + _backoff(slot.failures)
        log.error("worker-%d failed to start again (exit %s); next try in %.1fs", slot.index,
                  process.exitcode, slot.restart_at - now)

    def _rolling_restart(self) -> None:
        log.info("SIGHUP: rolling restart of %d workers", len(self.slots))
        try:
            self.check_files()
        except ConfigError as exc:
            log.error("rolling restart refused, old workers kept: %s", exc)
            return
        for i, slot in enumerate(self.slots):
            old = slot.process
            replacement = Slot(slot.index, failures=slot.failures)
            try:
                self._start(replacement)
                self._wait_ready(replacement, interruptible=True)
            except (StartupFailed, OSError, Interrupted) as exc:
                if replacement.process is not None:
                    _killed(replacement.process)
                    # Dead either way: its live gauges (a 0 for game_server_available, an open
                    # breaker) must leave the host's aggregate, as every dead worker's do.
                    self._forget(replacement.process)
                why = "a stop signal came" if isinstance(exc, Interrupted) else str(exc)
                log.error("rolling restart stopped, old workers kept: %s", why)
                return
            self.slots[i] = replacement
            if old is not None:
                # SIGINT: no drain delay; the host stays in rotation, and a 503 from /ready
                # while the old worker still shares the port could take it out. The drain
                # may take drain_timeout_s: meanwhile the other workers are still watched
                # (restarted if they die, killed if they stall); the old one is in no slot.
                self._stop([old], signal.SIGINT, tick=self._reap_and_restart)
            if not self._signals.empty():
                log.error("rolling restart stopped after worker-%d: a signal came", slot.index)
                return
        log.info("rolling restart done")

    def _watch_redis(self, now: float) -> None:
        """The embedded Redis (development) exited: start it again on the same socket. Its
        data is gone; the workers reconnect, re-attach their players and tell them (as after
        any Redis restart without persistence)."""
        redis = self.redis
        # No process while the loop runs: the last restart failed (tried again below).
        if redis is None or (redis.process is not None and redis.process.poll() is None):
            return
        if now < self._redis_restart_at:
            return
        self._redis_restart_at = now + _REDIS_RESTART_EVERY_S
        if redis.process is not None:
            log.error("the embedded redis (pid %d) exited with %s; starting it again (its data "
                      "is lost)", redis.process.pid, redis.process.returncode)
        try:
            redis.restart()
        except StoreError as exc:
            log.error("the embedded redis did not start again: %s", exc)

    def _stop(self, processes: list[SpawnProcess], sig: int = signal.SIGTERM,
              hurried_by_signal: bool = False, tick: Callable[[], None] | None = None) -> None:
        """``sig`` (a graceful drain), then SIGKILL what outlives the drain timeout, or, with
        ``hurried_by_signal`` (the final shutdown), at once on a second stop signal: an
        operator who will not wait. ``tick`` runs every 0.1 s of the wait."""
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, sig)
        deadline = time.monotonic() + self.config.server.drain_timeout_s + 2.0
        for process in processes:
            while process.is_alive() and not self._hurry and time.monotonic() < deadline:
                process.join(0.1)
                self._hurry = hurried_by_signal and self._second_signal()
                if tick is not None:
                    tick()
            if process.is_alive():
                if self._hurry:
                    log.warning("a second stop signal: killing %s", process.name)
                else:
                    log.error("%s did not drain in time; killing it", process.name)
                _killed(process)
            self._forget(process)

    def _second_signal(self) -> bool:
        """A stop signal came while stopping (a SIGHUP there means nothing)."""
        try:
            while (signum := self._signals.get_nowait()) == signal.SIGHUP:
                pass
        except queue.Empty:
            return False
        return signum in (signal.SIGTERM, signal.SIGINT)

    def processes(self) -> dict[str, int]:
        """Local processes by role, for /metrics and the console (read from the HTTP thread)."""
        found = {"supervisor": os.getpid()}
        for slot in list(self.slots):
            # Read once: the main loop may set it to None between two reads (a worker reaped).
            process = slot.process
            if process is not None and process.pid is not None:
                found[f"worker-{slot.index}"] = process.pid
        if self.gameserver is not None and self.gameserver.pid is not None:
            found["gameserver"] = self.gameserver.pid
        redis = self.redis.process if self.redis is not None else None
        if redis is not None:
            found["redis"] = redis.pid
        return found

    def _forget(self, process: SpawnProcess) -> None:
        """Drop a dead worker's live gauges from the aggregate, fold its counters and
        histograms into the archive (prometheus multiprocess; server/app/metricfiles.py)."""
        if self.files is not None and process.pid is not None:
            try:
                self.files.retire(process.pid)
            except OSError as exc:  # e.g. a full disk: its files stay, each still counted once
                log.warning("could not fold worker pid %s's metric files: %s", process.pid, exc)

    def _shutdown(self) -> None:
        self._stop([s.process for s in self.slots if s.process is not None], self._stop_signal,
                   hurried_by_signal=True)
        if self.gameserver is not None:
            self._stop([self.gameserver], hurried_by_signal=True)
        if self.metrics is not None:
            self.metrics.close()
        if self.redis is not None:
            self.redis.stop()


def _killed(process: SpawnProcess) -> None:
    """SIGKILL and wait, within _KILLED_WAIT_S (a process that outlives it is reaped later)."""
    if process.is_alive():
        process.kill()
    process.join(_KILLED_WAIT_S)
    if process.is_alive():
        log.error("%s (pid %s) is still there %.0fs after SIGKILL (uninterruptible sleep?); "
                  "going on without it", process.name, process.pid, _KILLED_WAIT_S)
