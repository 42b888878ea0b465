"""Where each key lives in a Redis Cluster: the slot map, asked of the cluster, and the locator.

A cluster deployment is named by one locator string, like a Sentinel one, so it travels wherever
a Redis URL does (a worker's arguments, ``--redis-url``, the environment)::

    redis+cluster://[[username]:password@]host:port[,host:port...]

The hosts are seeds: any nodes of the cluster. Every primary is learnt from ``CLUSTER SLOTS``,
asked again whenever a node says a slot moved (``MOVED``), a node cannot be reached, or the
cluster says it is down for a slot. Databases other than 0 do not exist in a cluster.

The RESP client (``client.py``) routes each call by its slot; the delivery subscribers connect
to the primary of fastmatch's slot (``sentinel.Locator``), whose scripts publish every notice
(README "Deployment: Redis Cluster").
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

import hiredis
from redis.crc import key_slot as _crc_slot

from server.store.resp import Address, RespConnectionError, open_connection, pack

log = logging.getLogger(__name__)
SCHEME: Final = "redis+cluster://"
SLOTS: Final = 16384
# Each node asked for the slot map gets this long (a dead seed must not eat the whole timeout).
_ASK_TIMEOUT_S: Final = 0.5
# A new refresh starts at most this often: while a primary is down, every call to its slots
# fails and asks for one, and the map changes only when the cluster promotes its replica.
_REFRESH_EVERY_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    seeds: tuple[tuple[str, int], ...]
    username: str = ""
    password: str = ""

    def address(self, host: str, port: int) -> Address:
        return Address(host=host, port=port, username=self.username, password=self.password)


def parse(url: str) -> ClusterSpec | None:
    """The cluster a locator names (None: not a cluster locator). ValueError if malformed."""
    if not url.startswith(SCHEME):
        return None
    parts = urlsplit("redis://" + url[len(SCHEME):])
    auth, _, hosts = parts.netloc.rpartition("@")
    username, _, password = auth.partition(":")
    seeds = []
    for entry in hosts.split(","):
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"cluster node {entry!r} is not host:port in {url!r}")
        seeds.append((host.strip("[]"), int(port)))
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"{url!r}: a Redis Cluster has only database 0")
    return ClusterSpec(tuple(seeds), unquote(username), unquote(password))


def key_slot(key: str | bytes) -> int:
    """The hash slot of a key (its ``{tag}`` when it has one), as every node computes it."""
    return _crc_slot(key.encode() if isinstance(key, str) else key)


def redirection(reply: object) -> tuple[bool, int, str, int] | None:
    """``(ask, slot, host, port)`` when a reply is a ``MOVED``/``ASK`` redirection: the
    command did not run, and belongs on that node (for good, or for this one call)."""
    if type(reply) is not hiredis.ReplyError:
        return None
    text = str(reply)
    if not text.startswith(("MOVED ", "ASK ")):
        return None
    kind, slot, where = text.split(" ", 2)
    host, _, port = where.rpartition(":")
    return kind == "ASK", int(slot), host.strip("[]"), int(port)


def nodes_of(reply: object, asked: str) -> list[tuple[str, int]]:
    """Every node a ``CLUSTER SLOTS`` reply names, primaries first (``asked``: the host the
    reply came from, for nodes that name no host of their own)."""
    primaries: dict[tuple[str, int], None] = {}
    replicas: dict[tuple[str, int], None] = {}
    for entry in reply if isinstance(reply, list) else []:
        if not isinstance(entry, list):
            continue
        for i, node in enumerate(entry[2:]):
            if isinstance(node, list) and len(node) >= 2 and isinstance(node[1], int):
                (replicas if i else primaries)[_host(node[0], asked), node[1]] = None
    return [*primaries, *replicas]


def owner_in(reply: object, slot: int, asked: str) -> tuple[str, int] | None:
    """The primary a ``CLUSTER SLOTS`` reply names for ``slot`` (None: nobody serves it)."""
    for entry in reply if isinstance(reply, list) else []:
        if (isinstance(entry, list) and len(entry) >= 3 and isinstance(entry[0], int)
                and isinstance(entry[1], int) and entry[0] <= slot <= entry[1]
                and isinstance(entry[2], list) and len(entry[2]) >= 2):
            return _host(entry[2][0], asked), int(entry[2][1])
    return None


def _host(named: object, asked: str) -> str:
    # An empty or "?" host means "the address you reached me on" (cluster-preferred-endpoint-type).
    host = named.decode() if isinstance(named, bytes) else ""
    return host if host and host != "?" else asked


class SlotMap:
    """Which primary serves each of the 16,384 slots, refreshed from any node that answers."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self._owner: list[tuple[str, int] | None] = [None] * SLOTS
        self.primaries: list[tuple[str, int]] = []
        self.nodes: list[tuple[str, int]] = []  # primaries and replicas
        self.refreshes = 0
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -_REFRESH_EVERY_S
        self.closed = False

    def owner(self, slot: int) -> tuple[str, int] | None:
        return self._owner[slot]

    def moved(self, slot: int, host: str, port: int) -> None:
        """A node said so (``MOVED``): believed for this slot at once; the whole map is asked
        again by the caller, since a failover or a resharding moves many slots together."""
        self._owner[slot] = (host, port)
        if (host, port) not in self.primaries:
            self.primaries.append((host, port))

    def refresh(self) -> asyncio.Task[None]:
        """Ask for the map again; concurrent callers share one attempt. Asked for within
        ``_REFRESH_EVERY_S`` of the last attempt, it waits out the rest of that interval first
        (one trailing attempt, however many calls ask meanwhile)."""
        if self._refreshing is not None and not self._refreshing.done():
            return self._refreshing
        loop = asyncio.get_running_loop()
        if self.closed:  # the client is closing: nothing may outlive it
            return loop.create_task(_refused_closed())
        wait = self._refreshed_at + _REFRESH_EVERY_S - loop.time() if self.primaries else 0.0
        self._refreshed_at = loop.time() + max(wait, 0.0)
        self._refreshing = loop.create_task(self._refresh(wait))
        return self._refreshing

    async def close(self) -> None:
        """Stop a refresh under way and start no other (the client is closing)."""
        self.closed = True
        task = self._refreshing
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _refresh(self, wait: float) -> None:
        if wait > 0:
            await asyncio.sleep(wait)
        failures = []
        # Known primaries first (the usual case: one of them answers at once), then the seeds.
        for host, port in dict.fromkeys([*self.primaries, *self.spec.seeds]):
            try:
                async with asyncio.timeout(_ASK_TIMEOUT_S):
                    conn = await open_connection(self.spec.address(host, port))
                    try:
                        reply = await conn.send(pack("CLUSTER", "SLOTS"))
                    finally:
                        conn.close()
            except (OSError, RespConnectionError, TimeoutError) as exc:
                failures.append(f"{host}:{port}: {type(exc).__name__} {exc}")
                continue
            if isinstance(reply, list) and reply:
                self._apply(reply, (host, port))
                return
            failures.append(f"{host}:{port}: {reply!r:.80}")
        raise RespConnectionError("no cluster node answered CLUSTER SLOTS: " + "; ".join(failures))

    def _apply(self, reply: list[list[object]], asked: tuple[str, int]) -> None:
        owner: list[tuple[str, int] | None] = [None] * SLOTS
        primaries: dict[tuple[str, int], None] = {}
        for entry in reply:
            start, end, node = entry[0], entry[1], entry[2]
            if not (isinstance(start, int) and isinstance(end, int) and isinstance(node, list)):
                continue
            address = (_host(node[0], asked[0]), int(node[1]))
            primaries[address] = None
            owner[start:end + 1] = [address] * (end - start + 1)
        before = set(self.primaries)
        self._owner, self.primaries = owner, list(primaries)
        self.nodes = nodes_of(reply, asked[0])
        self.refreshes += 1
        uncovered = owner.count(None)
        if before and set(self.primaries) != before:
            log.warning("redis cluster primaries now %s", ", ".join(f"{h}:{p}" for h, p in self.primaries))
        if uncovered:
            log.warning("redis cluster: %d of %d slots have no primary", uncovered, SLOTS)


async def _refused_closed() -> None:
    raise RespConnectionError("the redis client is closed")
