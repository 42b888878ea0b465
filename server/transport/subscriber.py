"""One self-healing pub/sub subscriber per worker (DESIGN requirement 2).

A dropped connection never leaves the worker deaf: it reconnects with exponential backoff and
full jitter, logs each attempt, resubscribes, then calls ``on_subscribed`` so the worker can
resync whatever it may have missed while it was away. A silent connection (Redis frozen, a
half-open socket) is caught by a periodic PING that must be answered in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping

from server.aio import raise_if_cancelling
from server.config import RedisConfig
from server.logthrottle import Throttled
from server.store.resp import Reply, RespConnectionError, RespProtocol, pack
from server.store.sentinel import Locator

log = logging.getLogger(__name__)
_resync_failed = Throttled(log, "resync after subscribe failed")

OnMessage = Callable[[bytes], None]
OnSubscribed = Callable[[], Awaitable[None]]


class Subscriber:
    def __init__(
        self, url: str, handlers: Mapping[str, OnMessage], on_subscribed: OnSubscribed,
        config: RedisConfig | None = None, *, ping_interval_s: float = 5.0,
    ) -> None:
        """``config``: the operation timeout and the reconnect backoff (its defaults when None)."""
        config = config or RedisConfig()
        self.url = url
        self.locator = Locator(url, config.operation_timeout_s)  # a Redis URL or a Sentinel locator
        self.handlers = dict(handlers)
        self._by_channel = {name.encode(): handler for name, handler in self.handlers.items()}
        self.channel = next(iter(self.handlers))
        self._on_subscribed = on_subscribed
        self._timeout = config.operation_timeout_s
        self._base = config.reconnect_base_s
        self._max = config.reconnect_max_s
        self._ping_interval = ping_interval_s
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.generation = 0  # incremented on every successful (re)subscription
        self.connected = False
        self._closing = False
        self._confirmed = 0
        self._all_confirmed: asyncio.Future[None] | None = None
        self._last_heard = 0.0
        # Failed (re)connections in a row, and when the last subscription was made: the
        # backoff starts over after one that held (_run).
        self._attempt = 0
        self._up_since: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # its session's (see _on_push)

    def start(self) -> None:
        self._closing = False
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"subscriber:{self.channel}")

    async def close(self) -> None:
        self._closing = True  # ends the loop even if a library swallowed the cancellation
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_subscribed(self, after_generation: int = 0) -> int:
        """Wait until subscribed with a generation above ``after_generation``; return it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation > after_generation)
            return self.generation

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # task boundary: any failure means "reconnect"
                raise_if_cancelling()
                self.connected = False
                loop = asyncio.get_running_loop()
                if self._up_since is not None and loop.time() - self._up_since >= self._max:
                    # It held a while: a new loss (the next failover), not the same outage
                    # going on, whose backoff would be waited out again. One that drops as soon
                    # as it is made (a flapping connection) keeps backing off.
                    self._attempt = 0
                self._up_since = None
                self._attempt += 1
                delay = random.uniform(0, min(self._max, self._base * 2 ** min(self._attempt, 16)))
                log.warning(
                    "delivery subscriber for %s lost (%s: %s); reconnect attempt %d in %.2fs",
                    self.channel, type(exc).__name__, exc, self._attempt, delay,
                )
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._confirmed = 0
        self._all_confirmed = loop.create_future()
        async with asyncio.timeout(self._timeout):
            conn = await self.locator.connect(on_push=self._on_push)
        try:
            async with asyncio.timeout(self._timeout):
                # Count as subscribed only once Redis confirms: a publish after this is heard.
                conn.write(pack("SUBSCRIBE", *self.handlers))
                await self._all_confirmed
            await self._subscribed()
            resync = loop.create_task(self._resync(), name="resync")
            try:
                await self._listen(conn)
            finally:
                resync.cancel()  # a new subscription runs its own
                await asyncio.gather(resync, return_exceptions=True)
        finally:
            self.connected = False
            conn.close()

    async def _subscribed(self) -> None:
        self.connected = True
        self._up_since = asyncio.get_running_loop().time()
        async with self._changed:
            self.generation += 1
            self._changed.notify_all()
        log.info("delivery subscriber on %s (generation %d)", self.channel, self.generation)

    async def _resync(self) -> None:
        """What was missed while deaf is caught up after every (re)subscription, retried until
        it succeeds: right after a Redis restart the store may still refuse (issue 17: a resync
        dropped on the first refusal left players untold for good)."""
        attempt = 0
        while True:
            try:
                await self._on_subscribed()
                if attempt:
                    log.info("resync after subscribe done (attempt %d)", attempt + 1)
                return
            except Exception as exc:  # task boundary: retried, never dropped
                raise_if_cancelling()
                attempt += 1
                delay = random.uniform(self._base, min(self._max, self._base * 2 ** min(attempt, 16)))
                _resync_failed("attempt %d, next in %.2fs: %s", attempt, delay, exc)
                await asyncio.sleep(delay)

    async def _listen(self, conn: RespProtocol) -> None:
        """Messages are dispatched by ``_on_push`` as they arrive; this only watches the line:
        a silent connection (Redis frozen, a half-open socket) must answer a PING in time."""
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        ping_sent = False
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, self._ping_interval)):
                    await asyncio.shield(conn.closed)
            if conn.closed.done():
                raise RespConnectionError("subscriber connection closed")
            silent = loop.time() - self._last_heard
            if silent < self._ping_interval:
                ping_sent = False
            elif not ping_sent:
                conn.write(pack("PING"))
                ping_sent = True
            elif silent > self._ping_interval + self._timeout:
                raise RespConnectionError("no answer to PING on the subscriber connection")

    def _on_push(self, reply: Reply) -> None:
        # Every push: asyncio.get_running_loop() would make a getpid() system call each time
        # (Python 3.11).
        self._last_heard = (self._loop or asyncio.get_running_loop()).time()
        if not isinstance(reply, list) or not reply:
            return
        kind = reply[0]
        if kind == b"message" and len(reply) == 3:
            self._dispatch(reply[1], reply[2])
        elif kind == b"subscribe":
            self._confirmed += 1
            done = self._all_confirmed
            if self._confirmed >= len(self.handlers) and done is not None and not done.done():
                done.set_result(None)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        handler = self._by_channel.get(channel)
        if handler is None or not isinstance(data, bytes):
            return
        try:
            handler(data)
        except Exception:
            log.exception("delivery handler failed on %r", data[:200])
