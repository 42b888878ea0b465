"""The one door to Redis: every call passes through :meth:`RedisClient.call` or :meth:`script`.

It bounds each call with the operation timeout (DESIGN safety device P0; the old server waited
10 s, we default to 2 s), turns every redis-py failure into :class:`StoreUnavailable` or
:class:`StoreError`, and reloads scripts after NOSCRIPT (a restarted Redis lost them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex

from server.aio import raise_if_cancelling
from server.store.breaker import BreakerState, CircuitBreaker
from server.store.errors import ProtocolViolation, StoreError, StoreUnavailable
from server.store.scripts import read_scripts

log = logging.getLogger(__name__)
T = TypeVar("T")
Reply = Any  # a raw RESP reply: bytes, int, list of those, or None


class CallObserver(Protocol):
    """Hooks for metrics (the store layer itself knows no Prometheus)."""

    def call_done(self, op: str, seconds: float, outcome: str) -> None:
        """outcome: "ok", "timeout", "unavailable", "error" or "refused" (breaker open)."""

    def breaker_changed(self, state: BreakerState) -> None:
        """The breaker moved to ``state``."""


class _NoObserver:
    def call_done(self, op: str, seconds: float, outcome: str) -> None:
        pass

    def breaker_changed(self, state: BreakerState) -> None:
        pass


class RedisClient:
    def __init__(
        self, url: str, operation_timeout_s: float = 2.0, *, breaker_threshold: int = 5,
        breaker_cooldown_s: float = 60.0, observer: CallObserver | None = None,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.timeout = operation_timeout_s
        # At most this many calls in flight: the pool never runs dry, and waiting for a slot
        # is local back-pressure that must not trip the breaker as if Redis had failed.
        self._slots = asyncio.Semaphore(max_connections)
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown_s)
        self.observer: CallObserver = observer or _NoObserver()
        # The socket timeout backs up asyncio.timeout: a stuck read is abandoned either way.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=operation_timeout_s,
            socket_connect_timeout=operation_timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
            max_connections=max_connections,
        )
        self._scripts = {name: self.redis.register_script(src) for name, src in read_scripts().items()}

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis round trip through the breaker, under the timeout; classify failures."""
        started = time.monotonic()
        if not self.breaker.allow(started):
            self.observer.call_done(op, 0.0, "refused")
            retry_ms = max(int(self.breaker.retry_after_s(started) * 1000), 100)
            raise StoreUnavailable(f"redis {op} refused: circuit open", retry_after_ms=retry_ms)
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except BaseException as exc:
            self.breaker.abandon()
            if not isinstance(exc, TimeoutError):
                raise
            raise_if_cancelling()
            self.observer.call_done(op, time.monotonic() - started, "overloaded")
            raise StoreUnavailable(f"redis {op}: every connection busy for {self.timeout:g}s") from exc
        before = self.breaker.state
        outcome = "error"
        try:
            result = await self._call(op, fn, started)
            outcome = "ok"
            self.breaker.success()
            return result
        except StoreUnavailable as exc:
            outcome = "timeout" if isinstance(exc.__cause__, TimeoutError) else "unavailable"
            self.breaker.failure(time.monotonic())
            exc.retry_after_ms = max(int(self.breaker.retry_after_s(time.monotonic()) * 1000), 1000)
            raise
        except StoreError:
            # Redis answered (a script error): the connection is fine as far as the breaker goes.
            self.breaker.success()
            raise
        except BaseException:  # cancelled: no verdict on Redis either way
            self.breaker.abandon()
            raise
        finally:
            self._slots.release()
            self.observer.call_done(op, time.monotonic() - started, outcome)
            if self.breaker.state is not before:
                log.warning("redis circuit breaker %s -> %s", before.name, self.breaker.state.name)
                self.observer.breaker_changed(self.breaker.state)

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]], started: float) -> T:
        try:
            # The slot wait counts: a call never takes longer than the operation timeout.
            async with asyncio.timeout(max(self.timeout - (time.monotonic() - started), 0.001)):
                return await fn()
        except TimeoutError as exc:
            # Python 3.11: a cancel that lands as the timeout expires surfaces as TimeoutError.
            # Swallowing it would keep a closing loop alive forever, so cancellation wins.
            raise_if_cancelling()
            raise StoreUnavailable(f"redis {op} timed out after {self.timeout:g}s") from exc
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis {op} failed: {exc}") from exc
        except rex.ResponseError as exc:
            if _is_transient(exc):
                raise StoreUnavailable(f"redis {op} refused: {exc}") from exc
            raise StoreError(f"redis {op} error: {exc}") from exc
        except rex.RedisError as exc:
            raise StoreError(f"redis {op} error: {exc}") from exc

    async def script(self, name: str, keys: Sequence[str], args: Sequence[str | int | float]) -> Reply:
        """EVALSHA the named script; redis-py's Script reloads it on NOSCRIPT."""
        script = self._scripts[name]
        return await self.call(name, lambda: script(keys=list(keys), args=list(args)))

    def script_names(self) -> dict[str, str]:
        """SHA -> script name, to read SLOWLOG and MONITOR output."""
        return {script.sha: name for name, script in self._scripts.items()}

    async def close(self) -> None:
        await self.redis.aclose()


def _is_transient(exc: rex.ResponseError) -> bool:
    text = str(exc)
    return text.startswith(("LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN"))


def as_str(value: Reply) -> str:
    """Decode one bulk-string reply; a missing value is the empty string."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def to_int(value: Reply) -> int:
    """An integer reply (or its decimal string); anything else is a ProtocolViolation."""
    try:
        return int(as_str(value))
    except (TypeError, ValueError) as exc:
        raise ProtocolViolation(f"expected an integer, got {value!r}") from exc


def as_list(value: Reply, op: str) -> list[str]:
    """A script's list reply as strings; anything else is a ProtocolViolation, never an IndexError."""
    if not isinstance(value, list) or not value:
        raise _violation(op, value)
    return [as_str(item) for item in value]


def _violation(op: str, value: Reply) -> ProtocolViolation:
    return ProtocolViolation(f"script {op} replied {value!r}")
