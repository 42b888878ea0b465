"""The one door to Redis: every call passes through :meth:`RedisClient.command` or :meth:`script`.

It bounds each call with the operation timeout (DESIGN safety device P0; the old server waited
10 s, we default to 2 s), turns every failure into :class:`StoreUnavailable` or
:class:`StoreError`, keeps the circuit breaker, and reloads scripts after NOSCRIPT (a restarted
Redis lost them). Calls share one pipelined connection (``resp.py``): whatever the worker asks
within one event-loop iteration leaves in one write. On a Redis Cluster (``cluster.py``) there
is one such connection per primary, and each call goes to the primary serving its first key's
slot, following ``MOVED`` and ``ASK`` redirections.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import hiredis

from server.config import RedisConfig
from server.logthrottle import Throttled
from server.store import cluster, keys
from server.store.breaker import BreakerState, CircuitBreaker
from server.store.errors import ProtocolViolation, StoreError, StoreUnavailable
from server.store.resp import (
    Reply,
    RespConnectionError,
    RespProtocol,
    RespTimeout,
    open_connection,
    pack,
)
from server.store.scripts import read_scripts
from server.store.sentinel import Locator

log = logging.getLogger(__name__)
_probe_refused = Throttled(
    log, "the breaker's probe write was refused with an unexpected error (counted as an answer; "
    "grant the key fm:probe)")
_TRANSIENT: Final = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN",
                     "NOREPLICAS",  # a primary under min-replicas-to-write that lost its replicas
                     "OOM")  # at maxmemory: every write refused, the breaker's business
# On a cluster, a call still redirected after _MAX_REDIRECTS did not run: unavailable. Without
# cluster mode a redirection means a misconfiguration (a cluster node named as standalone):
# an error, loudly, not a breaker flapping between refusals and a probe that answers.
_REDIRECTED: Final = ("MOVED ", "ASK ")
# Replies of a node that is not (or no longer) a writable primary: its connection is dropped.
_NOT_PRIMARY: Final = ("READONLY", "MASTERDOWN")
# Commands whose second argument is not a key: on a cluster any node answers them.
_KEYLESS: Final = frozenset({"PUBLISH", "PING", "TIME", "INFO", "CONFIG", "SLOWLOG", "SCRIPT",
                             "CLUSTER", "ROLE", "DBSIZE", "CLIENT", "MEMORY", "LATENCY", "WAIT"})
# Scripts sent whatever the back-pressure (``redis.max_inflight``): a busy worker's heartbeat
# refused here would get it reaped by the others under its live players.
_UNCAPPED: Final = frozenset({"heartbeat"})
# Redirections one call follows before it fails (a resharding in progress moves a slot twice).
_MAX_REDIRECTS: Final = 5
_ASKING: Final = hiredis.pack_command(("ASKING",))
_HOME_SLOT: Final = cluster.key_slot(keys.CLUSTER_TAG)  # where fastmatch's keys live on a cluster


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
        # Set at every move of the breaker: a prober asleep until a probe scheduled long ago
        # (the backoff reaches breaker_cooldown_s) wakes to the breaker as it is now.
        self._breaker_news = asyncio.Event()
        self.observer: CallObserver = observer or _NoObserver()
        self._scripts = {
            name: Script(name, hashlib.sha1(src.encode()).hexdigest(), src)  # the SHA Redis knows it by
            for name, src in read_scripts().items()
        }
        spec = cluster.parse(url)
        self.slots = cluster.SlotMap(spec) if spec is not None else None
        # Standalone and Sentinel: the one node, wherever the locator finds it. A cluster: a
        # node per primary, opened at its first call.
        self._single = None if spec is not None else _Node("redis", self._open_located, self.timeout)
        self._nodes: dict[tuple[str, int], _Node] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        # The watchdog looks at the oldest call this often: a call waits at most the timeout
        # plus one period before its connection is dropped.
        self._period = min(max(operation_timeout_s / 8, 0.01), 0.25)
        self._closed = False
        self.calls = 0

    # -- calls ----------------------------------------------------------------------------------

    async def command(self, *args: str | bytes | int | float) -> Reply:
        """One Redis command, e.g. ``command("PUBLISH", channel, data)``."""
        slot = _command_slot(args) if self.slots is not None else -1
        return await self._call(str(args[0]).lower(), pack(*args), None, slot)

    async def maxmemory_policy(self) -> str:
        """Redis' `maxmemory-policy` (from INFO, which managed services allow where CONFIG is
        refused); "" when INFO does not say."""
        text = as_str(await self.command("INFO", "memory"))
        for line in text.splitlines():
            if line.startswith("maxmemory_policy:"):
                return line.partition(":")[2].strip()
        return ""

    async def script(self, name: str, keys: Sequence[str], args: Sequence[str | int | float]) -> Reply:
        """EVALSHA the named script from ``lua/``; loaded again if Redis lost it (NOSCRIPT).
        On a cluster it runs where ``keys[0]`` lives: every key must share its slot."""
        script = self._scripts[name]
        slot = cluster.key_slot(keys[0]) if self.slots is not None and keys else -1
        return await self._call(name, pack("EVALSHA", script.sha, len(keys), *keys, *args), script, slot)

    async def pipeline(self, op: str, commands: Sequence[Sequence[str | bytes | int | float]]) -> list[Reply]:
        """Several commands sent together, as one call for the breaker and the timeout (on a
        cluster, one write per primary they touch)."""
        if not commands:
            return []
        if self.slots is not None:
            return await self._call(op, [pack(*c) for c in commands], None,  # type: ignore[no-any-return]
                                    [_command_slot(c) for c in commands])
        return await self._call(op, [pack(*c) for c in commands])  # type: ignore[no-any-return]

    async def publish(self, channel: str, data: bytes) -> int:
        """PUBLISH; the subscribers it reached. On a cluster the node counts only its own
        subscribers, though the message reaches every node's: when it counts none, the
        cluster's are counted (a game server listening on another node is not "nobody")."""
        reached = to_int(await self.command("PUBLISH", channel, data))
        if reached == 0 and self.slots is not None:
            return await self.listeners(channel) or 0
        return reached

    async def listeners(self, channel: str) -> int | None:
        """Subscribers of ``channel`` on every node of a cluster, replicas included (a
        subscriber may be on any node, and ``PUBSUB NUMSUB`` counts one node's). None on one
        node, where a script asks itself. A node that does not answer counts none: whoever
        listened there lost its connection with it."""
        if self.slots is None:
            return None
        started = asyncio.get_running_loop().time()
        if not self.breaker.closed:
            self.calls += 1
            raise self._refusal("numsub", started)
        if not self.slots.nodes:
            try:
                await self._refreshed(started)
            except _NotSent as exc:
                raise StoreUnavailable(f"redis numsub failed: {exc.__cause__}") from exc.__cause__
        packed = pack("PUBSUB", "NUMSUB", channel)

        async def asked(address: tuple[str, int]) -> int:
            try:
                async with asyncio.timeout(self.timeout):
                    reply = await self._exchange(self._node(address), packed, None, started)
            except (RespConnectionError, OSError, _NotSent, _Overloaded, TimeoutError):
                return 0
            return int(reply[1]) if isinstance(reply, list) and len(reply) == 2 else 0

        named = list(self.slots.nodes)
        total = sum(await asyncio.gather(*(asked(a) for a in named)))
        if total:
            return total
        # Nobody on the nodes this map names; but the map may predate the node they are on.
        # CLUSTER SLOTS leaves out a replica it does not count as in sync yet, such as the
        # primary a manual failover just demoted, whose subscribers stay connected to it (and
        # keep hearing every message). A map asked for again (at most every 0.1 s) is counted
        # for the nodes it adds before this says that nobody listens.
        try:
            await self._refreshed(started)
        except _NotSent:
            return 0
        added = [a for a in self.slots.nodes if a not in named]
        return sum(await asyncio.gather(*(asked(a) for a in added)))

    @property
    def one_node(self) -> bool:
        """A plain Redis URL: every connection fastmatch opens (each worker's subscriber
        included) is to the node where the scripts run, so a PUBLISH counts every subscriber.
        Not so on a cluster (a node counts its own) nor under Sentinel (a subscriber may stay
        on a demoted primary that still hears everything through replication)."""
        return self.locator.spec is None and self.locator.cluster is None

    @property
    def writes(self) -> int:
        """Writes to Redis so far (round trips: calls of one pipeline window share one)."""
        nodes = [self._single] if self._single is not None else self._nodes.values()
        return sum(node.writes for node in nodes if node is not None)

    @property
    def _conn(self) -> RespProtocol | None:
        """The connection of a standalone or Sentinel deployment (None on a cluster)."""
        return self._single.conn if self._single is not None else None

    def script_names(self) -> dict[str, str]:
        """SHA -> script name, to read SLOWLOG and MONITOR output."""
        return {script.sha: name for name, script in self._scripts.items()}

    def _refusal(self, op: str, now: float) -> StoreUnavailable:
        """A call the open breaker turns away: observed, and told when to come back."""
        self.observer.call_done(op, 0.0, "refused")
        retry_ms = max(int(self.breaker.retry_after_s(now) * 1000), 100)
        return StoreUnavailable(f"redis {op} refused: circuit open", retry_after_ms=retry_ms)

    async def _call(self, op: str, packed: bytes | list[bytes], script: Script | None = None,
                    slot: int | list[int] = -1) -> Reply:
        # The connection's loop, not asyncio.get_running_loop(): on Python 3.11 that makes a
        # getpid() system call (a fork check) every time, a few per cent of a worker's CPU
        # summed over the per-player path. Every call runs on the loop its connection lives on.
        conn = self._single.conn if self._single is not None else None
        loop = conn.loop if conn is not None else asyncio.get_running_loop()
        started = loop.time()
        breaker = self.breaker
        self.calls += 1
        if not breaker.allow(started):
            raise self._refusal(op, started)
        outcome = "error"
        try:
            if self._single is not None:
                reply = await self._exchange(self._single, packed, script, started)
            else:
                reply = await self._routed(packed, script, started, slot)
            replies = reply if isinstance(packed, list) else (reply,)
            error = next(filter(None, (_reply_error(op, r, self.slots is not None) for r in replies)), None)
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
            raise StoreUnavailable(f"redis {op}: {exc}", maybe_ran=exc.partly_sent) from None
        finally:
            self.observer.call_done(op, loop.time() - started, outcome)

    async def _exchange(
        self, node: _Node, packed: bytes | list[bytes], script: Script | None, started: float,
        asking: bool = False,
    ) -> Reply:
        conn = node.conn
        if conn is None or conn.broken:
            try:
                conn = await self._connected(node, started)
            except (RespConnectionError, OSError) as exc:
                raise _NotSent from exc
        if conn.in_flight >= self.max_inflight and (script is None or script.name not in _UNCAPPED):
            raise _Overloaded(f"{self.max_inflight} calls already in flight")
        if isinstance(packed, list):
            futures = [conn.send(p) for p in packed]
            self._arm_watchdog()
            replies = await asyncio.gather(*futures)
            for reply in replies:
                if type(reply) is hiredis.ReplyError and self._not_primary(str(reply)):
                    self._demoted(conn, reply)
            return replies
        if asking:  # the next command on this connection may use a slot being migrated here
            conn.send(_ASKING).add_done_callback(_retrieve)
        future = conn.send(packed)
        self._arm_watchdog()
        reply = await future
        if type(reply) is hiredis.ReplyError and self._not_primary(str(reply)):
            self._demoted(conn, reply)
        elif script is not None and _is_noscript(reply):
            # Redis restarted (or flushed its scripts): load and run again, back to back.
            loaded = conn.send(pack("SCRIPT", "LOAD", script.source))
            loaded.add_done_callback(_retrieve)
            if asking:
                conn.send(_ASKING).add_done_callback(_retrieve)
            future = conn.send(packed)
            # Its own bound: the watchdog may have run out of calls to watch (and stopped)
            # between the NOSCRIPT and this send.
            self._arm_watchdog()
            reply = await future
            if type(reply) is hiredis.ReplyError and self._not_primary(str(reply)):
                self._demoted(conn, reply)  # a replica now: not kept for the next call
        return reply

    # -- a cluster: each call to the primary of its slot --------------------------------------------

    async def _routed(
        self, packed: bytes | list[bytes], script: Script | None, started: float, slot: int | list[int]
    ) -> Reply:
        if isinstance(packed, list):
            # One write per primary; each command's reply back in its place.
            assert isinstance(slot, list)
            replies: list[Reply] = await asyncio.gather(
                *(self._routed(p, None, started, s) for p, s in zip(packed, slot, strict=True)),
                return_exceptions=True)
            failed = [r for r in replies if isinstance(r, BaseException)]
            if not failed:
                return replies
            sent_and_failed = [f for f in failed if not isinstance(f, _NotSent | _Overloaded)]
            if sent_and_failed:
                raise sent_and_failed[0]  # as for one command: it may have run
            if len(failed) < len(replies):
                # Some of it left, some did not: the pipeline as a whole may have run in part.
                # Held back by the worker's own back-pressure only, that says nothing against
                # Redis (no breaker failure); else it is a connection failure after sending.
                if all(isinstance(f, _Overloaded) for f in failed):
                    raise _Overloaded(f"{failed[0]} (part of it was sent)", partly_sent=True)
                raise RespConnectionError(f"part of a pipeline could not be sent: {failed[0]}") from failed[0]
            # Nothing left: back-pressure if any part met it (not Redis' fault), else unreachable.
            raise next((f for f in failed if isinstance(f, _Overloaded)), failed[0])
        assert isinstance(slot, int)
        slots = self.slots
        assert slots is not None
        if (slots.owner(slot) is None) if slot >= 0 else not slots.primaries:
            await self._refreshed(started)
        reply: Reply = None
        for _ in range(_MAX_REDIRECTS):
            where = slots.owner(slot) if slot >= 0 else None
            if where is None and not slots.primaries:
                raise _NotSent from RespConnectionError("the redis cluster has no primary")
            node = self._node(where or slots.primaries[0])
            try:
                reply = await self._exchange(node, packed, script, started)
            except (RespConnectionError, OSError, _NotSent):
                slots.refresh().add_done_callback(_retrieve_task)  # a failover may be under way
                raise
            moved = cluster.redirection(reply)
            if moved is None:
                if type(reply) is hiredis.ReplyError and str(reply).startswith(("CLUSTERDOWN", "TRYAGAIN")):
                    slots.refresh().add_done_callback(_retrieve_task)
                return reply
            ask, moved_slot, host, port = moved
            if ask:
                # This call only: the slot is migrating, the map stays as it is.
                return await self._exchange(self._node((host, port)), packed, script, started, asking=True)
            slots.moved(moved_slot, host, port)
            slots.refresh().add_done_callback(_retrieve_task)
            slot = moved_slot
        return reply

    async def _refreshed(self, started: float) -> None:
        """The slot map, asked for now (the first call, or a slot nobody serves)."""
        assert self.slots is not None
        remaining = max(self.timeout - (asyncio.get_running_loop().time() - started), 0.001)
        try:
            async with asyncio.timeout(remaining):
                await asyncio.shield(self.slots.refresh())
        except (RespConnectionError, OSError, TimeoutError) as exc:
            raise _NotSent from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.slots.closed or (task is not None and task.cancelling()):
                raise
            # The refresh it waited for was stopped by close(), not this call.
            raise _NotSent from RespConnectionError("the redis client is closed")

    def _node(self, address: tuple[str, int]) -> _Node:
        node = self._nodes.get(address)
        if node is None:
            assert self.slots is not None
            host, port = address
            target = self.slots.spec.address(host, port)

            async def opener() -> RespProtocol:
                return await open_connection(target, window_s=self.pipeline_window_s)

            node = self._nodes[address] = _Node(f"{host}:{port}", opener, self.timeout)
        return node

    def _not_primary(self, text: str) -> bool:
        """A reply saying this node will not take writes as a primary should. With Sentinel,
        NOREPLICAS too: a primary cut off from its replicas (and its Sentinels) while the
        worker still reaches it, where a new primary is likely elected already; the
        connection is dropped and the Sentinels asked again, not kept pinned to it."""
        return text.startswith(_NOT_PRIMARY) or (
            self.locator.spec is not None and text.startswith("NOREPLICAS"))

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

    def _answered(self, why: str = "") -> None:
        """Redis answered (a call, the probe, a recheck): the breaker closes, if it was not."""
        # Compared at the change itself, not from when the call began: the calls in flight when
        # the breaker opens fail after it and must not each log (and count) the same move.
        before = self.breaker.state
        self.breaker.success()
        if self.breaker.state is not before:
            self._breaker_moved(before, why)

    def _breaker_moved(self, before: BreakerState, why: str = "") -> None:
        state = self.breaker.state
        log.warning("redis circuit breaker %s -> %s%s", before.name, state.name, why)
        self.observer.breaker_changed(state)
        self._breaker_news.set()
        if state is not BreakerState.CLOSED and (self._prober is None or self._prober.done()):
            self._prober = asyncio.get_running_loop().create_task(self._probe(), name="redis-probe")

    async def _probe(self) -> None:
        """While the breaker is open: ask Redis for a write on a connection of its own
        (``_probe_alone``), at the breaker's backoff, until it takes one; then close the breaker
        (no user call needed)."""
        loop = asyncio.get_running_loop()
        breaker = self.breaker
        opened, probes = loop.time(), 0
        while breaker.state is not BreakerState.CLOSED and not self._closed:
            # Woken early when the breaker moves: closed meanwhile (a recheck, a call's reply)
            # and opened again, it has a new, near probe time that this sleep must not outlast.
            self._breaker_news.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._breaker_news.wait(),
                                       max(breaker.next_probe_at - loop.time(), 0.0))
            if not breaker.probe_due(loop.time()):
                continue
            self.observer.breaker_changed(breaker.state)  # half-open while the probe runs
            probes += 1
            if await self._probe_alone():
                # (Closed meanwhile by a call's reply, it said so already: nothing to add.)
                self._answered(f": redis answered after {loop.time() - opened:.1f}s ({probes} probes)")
                return
            if breaker.closed:
                return  # a call's reply closed it while this probe failed: Redis is back
            breaker.probe_failed(loop.time())
            self.observer.breaker_changed(breaker.state)

    async def recheck(self) -> None:
        """Redis answered on another connection (the subscriber just subscribed, e.g. to the
        primary a failover promoted): while the breaker is open, probe now rather than at its
        next scheduled probe (up to ``breaker_cooldown_s`` away), so calls resume with it."""
        breaker = self.breaker
        if breaker.state is not BreakerState.OPEN or self._closed:
            return
        if await self._probe_alone():
            self._answered(": redis answered a recheck")  # the prober, woken, then ends

    async def _probe_alone(self) -> bool:
        """Redis takes writes again, asked on a connection of its own: the one node, or the
        primary of fastmatch's slot on a cluster (not back until its replica took over;
        another shard, holding other data only, does not concern fastmatch)."""
        try:
            async with asyncio.timeout(self.timeout):
                if self.slots is None:
                    return await _writable(self.locator.connect(), self.timeout / 4)
                await asyncio.shield(self.slots.refresh())
                home = self.slots.owner(_HOME_SLOT)
                return home is not None and await _writable(
                    open_connection(self.slots.spec.address(*home)), self.timeout / 4)
        except (OSError, RespConnectionError, TimeoutError):
            return False

    # -- the connections ----------------------------------------------------------------------------

    async def _connected(self, node: _Node, started: float) -> RespProtocol:
        """The node's live connection, opening one when needed (concurrent callers share the
        attempt)."""
        if self._closed:
            raise RespConnectionError("redis client is closed")
        remaining = max(self.timeout - (asyncio.get_running_loop().time() - started), 0.001)
        try:
            async with asyncio.timeout(remaining):
                # Shielded: one caller's timeout or cancellation must not kill the shared attempt.
                conn = await asyncio.shield(node.connecting())
        except TimeoutError as exc:
            raise RespTimeout(f"connecting took over {self.timeout:g}s") from exc
        if self._closed:
            conn.close()
            raise RespConnectionError("redis client is closed")
        return conn

    async def _open_located(self) -> RespProtocol:
        return await self.locator.connect(window_s=self.pipeline_window_s)

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._period, self._watch)

    def _watch(self) -> None:
        """Drop a connection whose oldest call is past the timeout: Redis hangs, or the socket
        is half-open. Every call on it fails now (replies come in order, so all are stuck)."""
        self._watchdog = None
        now, waiting = asyncio.get_running_loop().time(), False
        for node in [self._single] if self._single is not None else list(self._nodes.values()):
            conn = node.conn if node is not None else None
            if conn is None or conn.broken:
                continue
            sent = conn.oldest_sent_at()
            if sent is None:
                continue
            if now - sent >= self.timeout:
                conn.abort(RespTimeout(f"no reply within {self.timeout:g}s"))
            else:
                waiting = True
        if waiting:
            self._arm_watchdog()

    async def close(self) -> None:
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.slots is not None:
            await self.slots.close()
        nodes = [self._single] if self._single is not None else list(self._nodes.values())
        await asyncio.gather(*(node.close() for node in nodes if node is not None))


class _Node:
    """One Redis node's pipelined connection, opened on demand."""

    def __init__(self, name: str, opener: Callable[[], Awaitable[RespProtocol]], timeout_s: float) -> None:
        self.name = name
        self._opener = opener
        # The attempt is shared by every caller, and each bounds only its own wait: unbounded,
        # an attempt stuck in TCP retransmission (a black-holed host) would fail every call
        # for minutes while Redis, reached again, is fine.
        self._timeout_s = timeout_s
        self.conn: RespProtocol | None = None
        self._connecting: asyncio.Task[RespProtocol] | None = None
        self._past_writes = 0  # of its connections that are gone

    @property
    def writes(self) -> int:
        return self._past_writes + (self.conn.writes if self.conn is not None else 0)

    def connecting(self) -> asyncio.Task[RespProtocol]:
        """The attempt to (re)connect; concurrent callers share it."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._open())
            # Its callers may all have stopped waiting (their own timeouts): the failure is
            # theirs to report, not a "never retrieved" warning at garbage collection.
            self._connecting.add_done_callback(_retrieved)
        return self._connecting

    async def _open(self) -> RespProtocol:
        try:
            async with asyncio.timeout(self._timeout_s):
                conn = await self._opener()
        except TimeoutError as exc:
            raise RespConnectionError(f"connecting to {self.name} took over {self._timeout_s:g}s") from exc
        if self.conn is not None:
            self._past_writes += self.conn.writes
        self.conn = conn
        return conn

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            await conn.closed


def _retrieved(task: asyncio.Task[RespProtocol]) -> None:
    if not task.cancelled():
        task.exception()


async def _writable(connecting: Awaitable[RespProtocol], held_s: float) -> bool:
    """The breaker's probe: does Redis take writes? A PING alone passes where every script would
    be refused (a primary under min-replicas-to-write without its replicas: NOREPLICAS; at
    maxmemory: OOM; a replica: READONLY); it would close the breaker and let a burst of calls
    fail before the breaker opens again, every probe interval, for as long as that lasts. So a
    write that writes nothing follows it (XX: over a key that exists, and this one never does).
    A write held rather than refused (CLIENT PAUSE WRITE, a failover's handover) does not keep
    the breaker open: calls wait for it as they would (``held_s``). Another error (an ACL that
    does not grant the probe's key) is logged and counts as an answer: the breaker must not stay
    open for good over the probe's own key."""
    conn = await connecting
    try:
        pong = conn.send(pack("PING"))
        write = conn.send(pack("SET", keys.probe(), "", "XX"))
        write.add_done_callback(_retrieve)
        if await pong != b"PONG":
            return False
        try:
            async with asyncio.timeout(held_s):
                reply = await write
        except TimeoutError:
            return True  # held, not refused
        if type(reply) is hiredis.ReplyError:
            if str(reply).startswith(_TRANSIENT):
                return False
            _probe_refused("%s", str(reply)[:120])
        return True
    finally:
        conn.close()


def _command_slot(args: Sequence[str | bytes | int | float]) -> int:
    """The slot a command's key lives in (-1: it has none, any node answers). A PUBLISH goes
    where the subscribers are (the primary of fastmatch's slot: sentinel.Locator), so its
    count of receivers is usually the whole answer (``publish``)."""
    name = str(args[0]).upper()
    if name == "PUBLISH":
        return _HOME_SLOT
    if len(args) < 2 or name in _KEYLESS:
        return -1
    key = args[1]
    return cluster.key_slot(key if isinstance(key, bytes) else str(key))


def _retrieve_task(task: asyncio.Task[None]) -> None:
    """A map refresh nobody awaits: a failure is logged by the next call that needs it."""
    if not task.cancelled():
        task.exception()


class _NotSent(Exception):
    """The call never left: no connection to Redis could be opened."""


class _Overloaded(Exception):
    """Too many calls in flight on this worker (not Redis' fault). ``partly_sent``: the rest
    of a cluster pipeline had left, so the call may have run in part."""

    def __init__(self, message: str, partly_sent: bool = False) -> None:
        super().__init__(message)
        self.partly_sent = partly_sent


def _retrieve(future: asyncio.Future[Reply]) -> None:
    """A reply nobody awaits: its outcome shows in the call that follows it."""
    if not future.cancelled():
        future.exception()


def _is_noscript(reply: Reply) -> bool:
    return type(reply) is hiredis.ReplyError and str(reply).startswith("NOSCRIPT")


def _reply_error(op: str, reply: Reply, cluster_mode: bool = False) -> StoreError | None:
    """The error a reply is, if it is one."""
    if type(reply) is not hiredis.ReplyError:
        return None
    text = str(reply)
    if text.startswith(_TRANSIENT) or (cluster_mode and text.startswith(_REDIRECTED)):
        # OOM from inside a script comes at its first write that may grow memory, after the
        # writes that may not (DEL, ZREM, HDEL) have run: the caller reads the outcome back.
        return StoreUnavailable(f"redis {op} refused: {text}",
                                maybe_ran=text.startswith("OOM") and "script:" in text)
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
