"""Per game mode: run for the lease, and while leading, tick TryMatch (DESIGN P0 devices).

Every worker runs one Matchmaker per mode; the lease makes exactly one of them act. Losing the
lease (refused renew, failed renew past the validity deadline, fenced commit) stops the ticker
at once. A tick that would overlap the previous one is skipped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from server import metrics
from server.aio import raise_if_cancelling
from server.app.lease import Lease
from server.app.loading import Sweeper
from server.app.trymatch import HoldCheck, TryMatch
from server.config import MatchingConfig, ModeConfig
from server.logthrottle import Throttled
from server.store.errors import StoreError
from server.store.matches import MatchStore

log = logging.getLogger(__name__)
_tick_failed = Throttled(log, "TryMatch failed")
_lease_failed = Throttled(log, "lease call failed")


class Matchmaker:
    def __init__(
        self, name: str, mode: ModeConfig, config: MatchingConfig, matches: MatchStore,
        holder: str, sweeper: Sweeper, hold: HoldCheck | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.lease = Lease(matches, name, holder, config.lease_ttl_ms)
        self.trymatch = TryMatch(name, mode, config, matches, self.lease, hold)
        self.sweeper = sweeper
        self.trymatch.export_held("")  # a zero from the start: every mode has its series
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        self._leading = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lease:{self.name}")

    async def close(self) -> None:
        """Stop ticking, hand the lease back so another worker takes over at once."""
        self._closing = True
        for task in (self._task, self._ticker):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._task, self._ticker) if t), return_exceptions=True)
        self._task = self._ticker = None
        try:
            await self.lease.release()
        except StoreError as exc:
            log.warning("%s: could not release the lease (it will expire): %s", self.name, exc)
        metrics.LEADER.labels(self.name).set(0)
        self.trymatch.step_down()

    async def wait_leading(self) -> None:
        await self._leading.wait()

    @property
    def leading(self) -> bool:
        return self.lease.holds()

    async def _run(self) -> None:
        interval = self.config.lease_ttl_ms / 3000
        while not self._closing:
            try:
                await self._step()
            except StoreError as exc:
                raise_if_cancelling()
                _lease_failed("%s: %s", self.name, exc)
            except Exception:  # task boundary: keep competing for the lease
                raise_if_cancelling()
                log.exception("%s: lease loop error", self.name)
            if not self.lease.holds():
                await self._stop_ticking()
            elif self._ticker is not None and self._ticker.done() and self.lease.token:
                # The ticker ended while the lease is still ours (a bug in the loop itself): a
                # leader that renews its lease but does not tick would stop the mode for good.
                failed = None if self._ticker.cancelled() else self._ticker.exception()
                log.error("%s: the ticker stopped while leading (%r); starting it again",
                          self.name, failed)
                await self._start_ticking(self.lease.token)
            await asyncio.sleep(interval)

    async def _step(self) -> None:
        if self.lease.holds():
            if not await self.lease.renew():
                log.warning("%s: lease renewal refused; stepping down", self.name)
            return
        if await self.lease.acquire():
            assert self.lease.token is not None
            log.info("%s: leading with epoch %d", self.name, self.lease.epoch)
            await self._start_ticking(self.lease.token)

    async def _start_ticking(self, token: str) -> None:
        await self._stop_ticking()
        metrics.LEADER.labels(self.name).set(1)
        self._leading.set()
        self._ticker = asyncio.create_task(self._tick_loop(token), name=f"trymatch:{self.name}")

    async def _stop_ticking(self) -> None:
        """Stop the ticker and wait for it: a tick of the old epoch never overlaps the new."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            self._leading.clear()
            metrics.LEADER.labels(self.name).set(0)
            metrics.QUEUE_SIZE.labels(self.name).set(0)
            self.trymatch.step_down()

    async def _tick_loop(self, token: str) -> None:
        loop = asyncio.get_running_loop()
        period = self.config.tick_ms / 1000
        next_at = loop.time()
        running: asyncio.Task[int] | None = None
        try:
            while self.lease.holds(token):
                if running is not None and not running.done():
                    metrics.inc(metrics.TRY_MATCH_SKIPPED, self.name)
                else:
                    running = asyncio.create_task(self._tick(token))
                next_at += period
                await asyncio.sleep(max(next_at - loop.time(), 0))
                next_at = max(next_at, loop.time() - period)  # after a stall, don't burst
        finally:
            if running is not None:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        log.info("%s: stopped ticking (lease epoch %d gone)", self.name, self.lease.epoch)

    async def _tick(self, token: str) -> int:
        # Each step on its own: a sweep that fails (one bad record) must not stop matching, nor
        # a failing TryMatch the ready checks' deadlines.
        await self._guarded("the sweeper", self.sweeper.run())
        return await self._guarded("TryMatch", self.trymatch.run(token))

    async def _guarded(self, what: str, step: Awaitable[int]) -> int:
        try:
            return await step
        except StoreError as exc:
            raise_if_cancelling()
            _tick_failed("%s: %s: %s", self.name, what, exc)
        except Exception:  # task boundary: one bad tick must not end matchmaking
            raise_if_cancelling()
            log.exception("%s: %s crashed", self.name, what)
        return 0
