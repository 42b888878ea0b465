"""``fastmatch serve``: an embedded Redis when none is configured, and the worker processes.

Workers are started with ``spawn`` (never fork: no inherited event loop or Redis sockets) and
each binds the public port with SO_REUSEPORT. Signal handlers only record the signal; the main
loop acts on it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
from multiprocessing.process import BaseProcess

from server.app.gameserver import Behaviour, run_gameserver
from server.app.worker import run_worker
from server.config import DEV_SECRET, Config
from server.store.embedded import EmbeddedRedis

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.count = workers or os.cpu_count() or 1
        self.redis: EmbeddedRedis | None = None
        self.processes: list[BaseProcess] = []
        self._signal = threading.Event()
        self._received: list[int] = []

    def run(self) -> int:
        if self.config.auth.algorithm.startswith("HS") and self.config.auth.secret == DEV_SECRET:
            log.warning("*** using the PUBLIC development auth secret: anyone can mint tokens. "
                        "Set auth.secret (FASTMATCH_AUTH__SECRET) before exposing this server ***")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            url = self.config.redis.url
            if not url:
                self.redis = EmbeddedRedis().start()
                url = self.redis.url
                log.info("no redis.url configured: using embedded redis at %s", url)
            ctx = mp.get_context("spawn")
            if self.config.gameserver.embedded:
                # Dev only (refused with production = true): the whole lifecycle out of the box.
                game = ctx.Process(target=run_gameserver, name="gameserver", args=(
                    url, self.config.gameserver.request_channel, Behaviour()))
                game.start()
                self.processes.append(game)
            for index in range(self.count):
                process = ctx.Process(
                    target=run_worker, args=(self.config, url, index), name=f"worker-{index}"
                )
                process.start()
                self.processes.append(process)
            log.info("supervisor pid %d started %d workers on port %d",
                     os.getpid(), self.count, self.config.server.port)
            return self._watch()
        finally:
            self._stop_workers()
            if self.redis is not None:
                self.redis.stop()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._received.append(signum)
        self._signal.set()

    def _watch(self) -> int:
        while not self._signal.wait(0.5):
            dead = [p for p in self.processes if not p.is_alive()]
            if dead:
                for process in dead:
                    log.error("%s exited with code %s; shutting down", process.name, process.exitcode)
                return 1
        log.info("received %s: draining", signal.Signals(self._received[0]).name)
        return 0

    def _stop_workers(self, timeout_s: float = 15.0) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                log.error("%s did not stop in %.0fs; killing it", process.name, timeout_s)
                process.kill()
                process.join()
