"""The one door to Redis: every call passes through :meth:`RedisClient.command` or :meth:`script`.

It bounds each call with the operation timeout (DESIGN safety device P0; the old server waited
10 s, we default to 2 s), turns every failure into :class:`StoreUnavailable` or
:class:`StoreError`, keeps the circuit breaker, and reloads scripts after NOSCRIPT (a restarted
Redis lost them). Calls share one pipelined connection (``resp.py``): whatever the worker asks
within one event-loop iteration leaves in one write.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import hiredis

from server.config import RedisConfig
from server.store.breaker import BreakerState, CircuitBreaker
from server.store.errors import ProtocolViolation, StoreError, StoreUnavailable
from server.store.resp import Reply, RespConnectionError, RespProtocol, RespTimeout, pack
from server.store.scripts import read_scripts
from server.store.sentinel import Locator

log = logging.getLogger(__name__)
_TRANSIENT: Final = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN",
                     "NOREPLICAS")  # a primary under min-replicas-to-write that lost its replicas
# Replies of a node that is not (or no longer) a writable primary: its connection is dropped.
_NOT_PRIMARY: Final = ("READONLY", "MASTERDOWN")


class CallObserver(Protocol):
    """Hooks for metrics (the store layer itself knows no Prometheus)."""

    def call_done(self, op: str, seconds: float, outcome: str) -> None:
        """outcome: "ok", "timeout", "unavailable", "error", "overloaded" or "refused"."""

    def breaker_changed(self, state: BreakerState) -> None:
        """The breaker moved to ``state``."""


class _NoObserver:
    def call_done(self, op: str, seconds: float, outcome: str) -> None:
        pass

    def breaker_changed(self, state: BreakerState) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    sha: str
    source: str


class RedisClient:
    def __init__(
        self, url: str, config: RedisConfig | None = None, observer: CallObserver | None = None,
    ) -> None:
        """``url``: a Redis URL or a Sentinel locator (``sentinel.locator``); ``config``: the
        timeouts, breaker and pipelining settings (its defaults when None; ``config.url`` is
        not used: the caller resolved it, e.g. to an embedded Redis)."""
        config = config or RedisConfig()
        operation_timeout_s = config.operation_timeout_s
        self.url = url
        self.locator = Locator(url, operation_timeout_s)
        self.timeout = operation_timeout_s
        # Past this many calls awaiting replies, new calls fail at once: local back-pressure
        # that must not trip the breaker as if Redis had failed.
        self.max_inflight = config.max_inflight
        # Calls wait this long for company before their write leaves (0: the end of the loop
        # iteration): each write wakes Redis, the most expensive thing a call does here.
        self.pipeline_window_s = config.pipeline_window_ms / 1000
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown_s,
                                      config.breaker_probe_s)
        self._prober: asyncio.Task[None] | None = None
        self.observer: CallObserver = observer or _NoObserver()
        self._scripts = {
            name: Script(name, hashlib.sha1(src.encode()).hexdigest(), src)  # the SHA Redis knows it by
            for name, src in read_scripts().items()
        }
        self._conn: RespProtocol | None = None
        self._connecting: asyncio.Task[RespProtocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # The watchdog looks at the oldest call this often: a call waits at most the timeout
        # plus one period before its connection is dropped.
        self._period = min(max(operation_timeout_s / 8, 0.01), 0.25)
        self._closed = False
        self.calls = 0
        self._past_writes = 0  # of connections that are gone

    # -- calls ----------------------------------------------------------------------------------

    async def command(self, *args: str | bytes | int | float) -> Reply:
        """One Redis command, e.g. ``command("PUBLISH", channel, data)``."""
        return await self._call(str(args[0]).lower(), pack(*args))

    async def script(self, name: str, keys: Sequence[str], args: Sequence[str | int | float]) -> Reply:
        """EVALSHA the named script from ``lua/``; loaded again if Redis lost it (NOSCRIPT)."""
        script = self._scripts[name]
        return await self._call(name, pack("EVALSHA", script.sha, len(keys), *keys, *args), script)

    async def pipeline(self, op: str, commands: Sequence[Sequence[str | bytes | int | float]]) -> list[Reply]:
        """Several commands sent together, as one call for the breaker and the timeout."""
        if not commands:
            return []
        return await self._call(op, [pack(*c) for c in commands])  # type: ignore[no-any-return]

    @property
    def writes(self) -> int:
        """Writes to Redis so far (round trips: calls of one pipeline window share one)."""
        return self._past_writes + (self._conn.writes if self._conn is not None else 0)

    def script_names(self) -> dict[str, str]:
        """SHA -> script name, to read SLOWLOG and MONITOR output."""
        return {script.sha: name for name, script in self._scripts.items()}

    async def _call(self, op: str, packed: bytes | list[bytes], script: Script | None = None) -> Reply:
        loop = asyncio.get_running_loop()
        started = loop.time()
        breaker = self.breaker
        self.calls += 1
        if not breaker.allow(started):
            self.observer.call_done(op, 0.0, "refused")
            retry_ms = max(int(breaker.retry_after_s(started) * 1000), 100)
            raise StoreUnavailable(f"redis {op} refused: circuit open", retry_after_ms=retry_ms)
        outcome = "error"
        try:
            reply = await self._exchange(op, packed, script, started)
            replies = reply if isinstance(packed, list) else (reply,)
            error = next(filter(None, (_reply_error(op, r) for r in replies)), None)
            if isinstance(error, StoreUnavailable):  # Redis is loading, busy or read-only
                self._failed(loop.time())
                outcome = "unavailable"
                raise error
            # Redis answered: as far as the breaker goes it is fine, even for a script error.
            if breaker.state is not BreakerState.CLOSED or breaker.failures:
                self._answered()
            if error is not None:
                raise error
            outcome = "ok"
            return reply
        except (RespConnectionError, OSError, _NotSent) as exc:
            sent = not isinstance(exc, _NotSent)
            cause = exc.__cause__ if isinstance(exc, _NotSent) else exc
            outcome = "timeout" if isinstance(cause, RespTimeout | TimeoutError) else "unavailable"
            self._failed(loop.time())
            retry_ms = max(int(breaker.retry_after_s(loop.time()) * 1000), 1000)
            what = f"timed out after {self.timeout:g}s" if outcome == "timeout" else f"failed: {cause}"
            raise StoreUnavailable(f"redis {op} {what}", retry_after_ms=retry_ms,
                                   maybe_ran=sent) from cause
        except _Overloaded as exc:
            outcome = "overloaded"
            raise StoreUnavailable(f"redis {op}: {exc}") from None
        finally:
            self.observer.call_done(op, loop.time() - started, outcome)

    async def _exchange(
        self, op: str, packed: bytes | list[bytes], script: Script | None, started: float
    ) -> Reply:
        conn = self._conn
        if conn is None or conn.broken:
            try:
                conn = await self._connected(started)
            except (RespConnectionError, OSError) as exc:
                raise _NotSent from exc
        if conn.in_flight >= self.max_inflight:
            raise _Overloaded(f"{self.max_inflight} calls already in flight")
        if isinstance(packed, list):
            futures = [conn.send(p) for p in packed]
            self._arm_watchdog()
            replies = await asyncio.gather(*futures)
            for reply in replies:
                if type(reply) is hiredis.ReplyError and str(reply).startswith(_NOT_PRIMARY):
                    self._demoted(conn, reply)
            return replies
        future = conn.send(packed)
        self._arm_watchdog()
        reply = await future
        if type(reply) is hiredis.ReplyError and str(reply).startswith(_NOT_PRIMARY):
            self._demoted(conn, reply)
        elif script is not None and _is_noscript(reply):
            # Redis restarted (or flushed its scripts): load and run again, back to back.
            loaded = conn.send(pack("SCRIPT", "LOAD", script.source))
            loaded.add_done_callback(_retrieve)
            future = conn.send(packed)
            reply = await future
        return reply

    def _demoted(self, conn: RespProtocol, reply: Reply) -> None:
        """The node is a replica now (a failover demoted it while this connection stayed open):
        drop the connection, so the next call connects again, to whatever primary the
        Sentinels name by then. The call itself fails as ``unavailable`` (it did not run)."""
        if not conn.broken:
            log.warning("redis refused a write (%s): reconnecting", str(reply)[:80])
            conn.abort(RespConnectionError(f"redis node stopped taking writes: {reply}"))

    # -- the breaker's recovery probe --------------------------------------------------------------

    def _failed(self, now: float) -> None:
        before = self.breaker.state
        self.breaker.failure(now)
        if self.breaker.state is not before:
            self._breaker_moved(before)

    def _answered(self) -> None:
        # Compared at the change itself, not from when the call began: the calls in flight when
        # the breaker opens fail after it and must not each log (and count) the same move.
        before = self.breaker.state
        self.breaker.success()
        if self.breaker.state is not before:
            self._breaker_moved(before)

    def _breaker_moved(self, before: BreakerState) -> None:
        state = self.breaker.state
        log.warning("redis circuit breaker %s -> %s", before.name, state.name)
        self.observer.breaker_changed(state)
        if state is not BreakerState.CLOSED and (self._prober is None or self._prober.done()):
            self._prober = asyncio.get_running_loop().create_task(self._probe(), name="redis-probe")

    async def _probe(self) -> None:
        """While the breaker is open: PING on a connection of its own, at the breaker's
        backoff, until Redis answers; then close the breaker (no user call needed)."""
        loop = asyncio.get_running_loop()
        breaker = self.breaker
        opened, probes = loop.time(), 0
        while breaker.state is not BreakerState.CLOSED and not self._closed:
            await asyncio.sleep(max(breaker.next_probe_at - loop.time(), 0.0))
            if not breaker.probe_due(loop.time()):
                continue
            probes += 1
            if await self._ping_alone():
                if breaker.closed:
                    return  # a call's reply closed it meanwhile, and said so
                breaker.success()
                log.warning("redis circuit breaker OPEN -> CLOSED: redis answered after %.1fs "
                            "(%d probes)", loop.time() - opened, probes)
                self.observer.breaker_changed(breaker.state)
                return
            if breaker.closed:
                return  # a call's reply closed it while this probe failed: Redis is back
            breaker.probe_failed(loop.time())

    async def recheck(self) -> None:
        """Redis answered on another connection (the subscriber just subscribed, e.g. to the
        primary a failover promoted): while the breaker is open, probe now rather than at its
        next scheduled probe (up to ``breaker_cooldown_s`` away), so calls resume with it."""
        breaker = self.breaker
        if breaker.state is not BreakerState.OPEN or self._closed:
            return
        if await self._ping_alone() and not breaker.allow(0.0):  # not closed by the probe meanwhile
            breaker.success()
            log.warning("redis circuit breaker OPEN -> CLOSED: redis answered a recheck")
            self.observer.breaker_changed(breaker.state)

    async def _ping_alone(self) -> bool:
        conn: RespProtocol | None = None
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self.locator.connect()
                return bool(await conn.send(pack("PING")) == b"PONG")
        except (OSError, RespConnectionError, TimeoutError):
            return False
        finally:
            if conn is not None:
                conn.close()

    # -- the connection ---------------------------------------------------------------------------

    async def _connected(self, started: float) -> RespProtocol:
        """The live connection, opening one when needed (concurrent callers share the attempt)."""
        if self._closed:
            raise RespConnectionError("redis client is closed")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        remaining = max(self.timeout - (asyncio.get_running_loop().time() - started), 0.001)
        try:
            async with asyncio.timeout(remaining):
                # Shielded: one caller's timeout or cancellation must not kill the shared attempt.
                return await asyncio.shield(self._connecting)
        except TimeoutError as exc:
            raise RespTimeout(f"connecting took over {self.timeout:g}s") from exc

    async def _open(self) -> RespProtocol:
        conn = await self.locator.connect(window_s=self.pipeline_window_s)
        if self._closed:
            conn.close()
            raise RespConnectionError("redis client is closed")
        if self._conn is not None:
            self._past_writes += self._conn.writes
        self._conn = conn
        return conn

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._period, self._watch)

    def _watch(self) -> None:
        """Drop a connection whose oldest call is past the timeout: Redis hangs, or the socket
        is half-open. Every call on it fails now (replies come in order, so all are stuck)."""
        self._watchdog = None
        conn = self._conn
        if conn is None or conn.broken:
            return
        sent = conn.oldest_sent_at()
        if sent is None:
            return
        if asyncio.get_running_loop().time() - sent >= self.timeout:
            conn.abort(RespTimeout(f"no reply within {self.timeout:g}s"))
            return
        self._arm_watchdog()

    async def close(self) -> None:
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await conn.closed


class _NotSent(Exception):
    """The call never left: no connection to Redis could be opened."""


class _Overloaded(Exception):
    """Too many calls in flight on this worker (not Redis' fault)."""


def _retrieve(future: asyncio.Future[Reply]) -> None:
    """A reply nobody awaits: its outcome shows in the call that follows it."""
    if not future.cancelled():
        future.exception()


def _is_noscript(reply: Reply) -> bool:
    return type(reply) is hiredis.ReplyError and str(reply).startswith("NOSCRIPT")


def _reply_error(op: str, reply: Reply) -> StoreError | None:
    """The error a reply is, if it is one."""
    if type(reply) is not hiredis.ReplyError:
        return None
    text = str(reply)
    if text.startswith(_TRANSIENT):
        return StoreUnavailable(f"redis {op} refused: {text}")
    return StoreError(f"redis {op} error: {text}")


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
