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
import time
from collections.abc import Awaitable, Callable, Mapping

import redis.asyncio as aioredis
from redis import exceptions as rex

from server.aio import raise_if_cancelling

log = logging.getLogger(__name__)

OnMessage = Callable[[bytes], None]
OnSubscribed = Callable[[], Awaitable[None]]


class Subscriber:
    def __init__(
        self, url: str, handlers: Mapping[str, OnMessage], on_subscribed: OnSubscribed,
        *, timeout_s: float = 2.0, base_delay_s: float = 0.1, max_delay_s: float = 5.0,
        ping_interval_s: float = 5.0,
    ) -> None:
        self.url = url
        self.handlers = dict(handlers)
        self.channel = next(iter(self.handlers))
        self._on_subscribed = on_subscribed
        self._timeout = timeout_s
        self._base = base_delay_s
        self._max = max_delay_s
        self._ping_interval = ping_interval_s
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.generation = 0  # incremented on every successful (re)subscription
        self.connected = False
        self._closing = False

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
        attempt = 0
        while not self._closing:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # task boundary: any failure means "reconnect"
                raise_if_cancelling()
                self.connected = False
                attempt += 1
                delay = random.uniform(0, min(self._max, self._base * 2 ** min(attempt, 16)))
                log.warning(
                    "delivery subscriber for %s lost (%s: %s); reconnect attempt %d in %.2fs",
                    self.channel, type(exc).__name__, exc, attempt, delay,
                )
                await asyncio.sleep(delay)
            else:
                attempt = 0

    async def _session(self) -> None:
        client = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=self._timeout, socket_timeout=None,
        )
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(self._timeout):
                await pubsub.subscribe(*self.handlers)
                # Count as subscribed only once Redis confirms: a publish after this is heard.
                confirmed = 0
                while confirmed < len(self.handlers):
                    reply = await pubsub.get_message(timeout=self._timeout)
                    if reply is not None and reply.get("type") == "subscribe":
                        confirmed += 1
            await self._subscribed()
            await self._listen(pubsub)
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _subscribed(self) -> None:
        self.connected = True
        async with self._changed:
            self.generation += 1
            self._changed.notify_all()
        log.info("delivery subscriber on %s (generation %d)", self.channel, self.generation)
        try:
            await self._on_subscribed()
        except Exception:
            # A failed resync is retried at the next reconnect; listening matters more.
            log.warning("resync after subscribe failed", exc_info=True)

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        last_heard = time.monotonic()
        ping_sent = False
        while not self._closing:
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=min(1.0, self._ping_interval)
            )
            now = time.monotonic()
            if message is not None:
                last_heard = now
                ping_sent = False
                if message.get("type") == "message":
                    self._dispatch(message["channel"], message["data"])
                continue
            if not ping_sent and now - last_heard > self._ping_interval:
                await pubsub.ping()
                ping_sent = True
            elif ping_sent and now - last_heard > self._ping_interval + self._timeout:
                raise rex.ConnectionError("no answer to PING on the subscriber connection")

    def _dispatch(self, channel: object, data: object) -> None:
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        handler = self.handlers.get(name)
        if handler is None or not isinstance(data, bytes):
            return
        try:
            handler(data)
        except Exception:
            log.exception("delivery handler failed on %r", data[:200])
