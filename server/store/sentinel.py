"""Where the Redis primary is: a fixed address (standalone) or whatever the Sentinels say.

Every connection fastmatch opens to Redis goes through :class:`Locator` (the store's RESP
client, its breaker probe, the delivery subscriber) or :func:`sync_client` / :func:`async_client`
(redis-py, for admin tools, the console and the simulator), so a Sentinel failover is followed
the same way everywhere (README "Deployment: Sentinel").

A Sentinel deployment is named by one locator string, so it travels wherever a Redis URL does
(a worker's arguments, ``--redis-url``, the environment)::

    redis+sentinel://[[username]:password@]host:port[,host:port...]/service[/db]

The credentials and the db are the primary's; the Sentinels themselves are asked without AUTH.
``redis.sentinels`` and ``redis.sentinel_service`` build it (:func:`locator`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import quote, unquote, urlsplit

import hiredis
import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from server.config import RedisConfig
from server.store import cluster, keys
from server.store.resp import Address, OnPush, RespConnectionError, RespProtocol, open_connection, pack

log = logging.getLogger(__name__)
SCHEME: Final = "redis+sentinel://"
# Each Sentinel gets this long to answer (a dead one must not eat the whole operation timeout).
_ASK_TIMEOUT_S: Final = 0.5
# A node that answers ROLE as a replica is being reconfigured: ask again after this long.
_DEMOTED_PAUSE_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class SentinelSpec:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    username: str = ""
    password: str = ""
    db: int = 0


def locator(config: RedisConfig, url: str | None = None) -> str:
    """The locator string of a config: ``url`` (default ``redis.url``) when no Sentinels are
    set; else a ``redis+sentinel://`` locator carrying ``redis.url``'s credentials and db; with
    ``redis.cluster``, a ``redis+cluster://`` locator seeded with ``redis.url``'s node."""
    url = config.url if url is None else url
    if config.cluster and url.startswith("redis://"):
        # The node redis.url names is the seed; its credentials are every node's.
        return cluster.SCHEME + url[len("redis://"):].split("/", 1)[0]
    if not config.sentinels:
        return url
    base = Address.from_url(url) if url else Address()
    auth = ""
    if base.password:
        auth = f"{quote(base.username, safe='')}:{quote(base.password, safe='')}@"
    hosts = ",".join(entry.strip() for entry in config.sentinels.split(",") if entry.strip())
    return f"{SCHEME}{auth}{hosts}/{quote(config.sentinel_service, safe='')}/{base.db}"


def parse(url: str) -> SentinelSpec | None:
    """The Sentinel deployment a locator names (None: a plain Redis URL). ValueError if bad."""
    if not url.startswith(SCHEME):
        return None
    parts = urlsplit("redis://" + url[len(SCHEME):])
    auth, _, hosts = parts.netloc.rpartition("@")
    username, _, password = auth.partition(":")
    sentinels = []
    for entry in hosts.split(","):
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel {entry!r} is not host:port in {url!r}")
        sentinels.append((host.strip("[]"), int(port)))
    service, _, db = parts.path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise ValueError(f"{url!r} must end in /<service>[/<db>]")
    return SentinelSpec(tuple(sentinels), unquote(service), unquote(username), unquote(password),
                        int(db or 0))


class Locator:
    """Opens connections to the primary. Standalone: the URL's address, as always. Sentinel:
    each Sentinel in turn is asked for the primary at every (re)connect, and the node must
    answer ``ROLE`` as a master (a demoted old primary answers as a replica: dropped, and the
    Sentinels asked again), all within ``timeout_s``."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.spec = parse(url)
        # A cluster (``cluster.py``): connections made here (the delivery subscribers, a breaker
        # probe) go to the primary of fastmatch's slot (_home_primary).
        self.cluster = cluster.parse(url)
        self._nodes: list[tuple[str, int]] = []  # every node of the cluster, as last heard
        plain = self.spec is None and self.cluster is None
        self._fixed = Address.from_url(url) if plain else None
        self.primary: tuple[str, int] | None = None  # the last primary connected to
        self._first = 0  # the Sentinel asked first: past one whose answer failed, for good
        self.failovers = 0  # times the primary moved to another address since the first

    async def connect(self, on_push: OnPush | None = None, window_s: float = 0.0) -> RespProtocol:
        """A connection to the primary; RespConnectionError/OSError when none is found in time."""
        if self._fixed is not None:
            return await open_connection(self._fixed, on_push, window_s)
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.cluster is not None:
                    return await self._home_primary(self.cluster, on_push, window_s)
                return await self._from_sentinels(on_push, window_s)
        except TimeoutError as exc:
            raise RespConnectionError(f"no redis primary found within {self.timeout_s:g}s") from exc

    async def _from_sentinels(self, on_push: OnPush | None, window_s: float) -> RespProtocol:
        """The primary a Sentinel names, if it is one. A Sentinel cut off from the others may
        still name the old primary (dead, or demoted): its answer failing, the next Sentinel is
        asked, not the same one again."""
        spec = self.spec
        assert spec is not None
        while True:
            (host, port), asked = await self.ask(spec, self._first)
            address = Address(host=host, port=port, db=spec.db, username=spec.username,
                              password=spec.password)
            try:
                # Bounded on its own: a black-holed old primary would otherwise use up the
                # whole connect timeout before the next Sentinel is asked.
                async with asyncio.timeout(_ASK_TIMEOUT_S):
                    conn = await open_connection(address, window_s=window_s)
                    try:
                        role = await conn.send(pack("ROLE"))
                    except BaseException:
                        conn.abort()
                        raise
            except (OSError, RespConnectionError, TimeoutError) as exc:
                # The next question (and the next connect's) goes to the next Sentinel.
                self._first = asked + 1
                log.warning("redis %s:%d, named primary of %s by sentinel %s:%d, is unreachable "
                            "(%s); asking the next sentinel", host, port, spec.service,
                            *spec.sentinels[asked], str(exc) or type(exc).__name__)
                await asyncio.sleep(_DEMOTED_PAUSE_S)
                continue
            if isinstance(role, list) and role and role[0] == b"master":
                conn.on_push = on_push
                self._arrived((host, port))
                return conn
            conn.abort()
            self._first = asked + 1
            log.warning("redis %s:%d, named primary of %s by sentinel %s:%d, answers ROLE %r; "
                        "asking the next sentinel", host, port, spec.service, *spec.sentinels[asked],
                        role[0] if isinstance(role, list) and role else role)
            await asyncio.sleep(_DEMOTED_PAUSE_S)

    async def _home_primary(self, spec: cluster.ClusterSpec, on_push: OnPush | None,
                            window_s: float) -> RespProtocol:
        """The primary serving fastmatch's slot (``keys.CLUSTER_TAG``), where every script runs
        and publishes its notices: when it dies this connection ends with it, as at a Sentinel
        failover, and the subscriber resynchronises its clients with the promoted replica
        (README "Deployment: Redis Cluster"). Any node that answers says which one it is; the
        node must then answer ``ROLE`` as a master."""
        slot = cluster.key_slot(keys.CLUSTER_TAG)
        failures = []
        # The nodes heard of at the last connect first: the seed may be the node that died.
        for host, port in dict.fromkeys([*self._nodes, *spec.seeds]):
            try:
                async with asyncio.timeout(_ASK_TIMEOUT_S):
                    asked = await open_connection(spec.address(host, port))
                    try:
                        reply = await asked.send(pack("CLUSTER", "SLOTS"))
                    finally:
                        asked.close()
                    self._nodes = cluster.nodes_of(reply, host) or self._nodes
                    owner = cluster.owner_in(reply, slot, host)
                    if owner is None:
                        raise RespConnectionError(f"no primary serves slot {slot}")
                    conn = await open_connection(spec.address(*owner), on_push, window_s)
                    try:
                        role = await conn.send(pack("ROLE"))
                        if not (isinstance(role, list) and role and role[0] == b"master"):
                            raise RespConnectionError(f"{owner[0]}:{owner[1]} is not a primary (yet)")
                    except BaseException:
                        conn.abort()
                        raise
            except (OSError, RespConnectionError, TimeoutError) as exc:
                failures.append(f"{host}:{port}: {type(exc).__name__} {exc}")
                continue
            self._arrived(owner)
            return conn
        raise RespConnectionError("no redis cluster node named a primary for fastmatch: "
                                  + "; ".join(failures))

    async def ask(self, spec: SentinelSpec, first: int = 0) -> tuple[tuple[str, int], int]:
        """The primary's address, from the first Sentinel that knows it, starting with the
        ``first``-th (wrapping round); and the index of the Sentinel that answered."""
        failures = []
        count = len(spec.sentinels)
        for index in ((first + i) % count for i in range(count)):
            host, port = spec.sentinels[index]
            try:
                async with asyncio.timeout(_ASK_TIMEOUT_S):
                    conn = await open_connection(Address(host=host, port=port))
                    try:
                        reply = await conn.send(pack("SENTINEL", "get-master-addr-by-name", spec.service))
                    finally:
                        conn.close()
            except (OSError, RespConnectionError, TimeoutError) as exc:
                failures.append(f"{host}:{port}: {type(exc).__name__} {exc}")
                continue
            if isinstance(reply, list) and len(reply) == 2 and all(isinstance(r, bytes) for r in reply):
                return (reply[0].decode(), int(reply[1])), index
            what = str(reply) if isinstance(reply, hiredis.ReplyError) else f"no primary ({reply!r})"
            failures.append(f"{host}:{port}: {what}")
        raise RespConnectionError(f"no sentinel named the primary of {spec.service!r}: "
                                  + "; ".join(failures))

    def _arrived(self, primary: tuple[str, int]) -> None:
        if self.primary is not None and primary != self.primary:
            self.failovers += 1
            what = self.spec.service if self.spec else "fastmatch's cluster slot"
            log.warning("redis primary of %s moved from %s:%d to %s:%d", what, *self.primary, *primary)
        self.primary = primary


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for a locator (admin tools): it follows the Sentinels' primary, or
    routes by slot on a cluster."""
    nodes = cluster.parse(url)
    if nodes is not None:
        return cast(redis.Redis, redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes.seeds],  # type: ignore[no-untyped-call, unused-ignore]
            username=nodes.username or None, password=nodes.password or None, **kwargs))
    spec = parse(url)
    if spec is None:
        return redis.Redis.from_url(url, **kwargs)
    timeout = kwargs.get("socket_timeout") or _ASK_TIMEOUT_S
    sentinel = Sentinel(list(spec.sentinels), socket_timeout=timeout)  # type: ignore[no-untyped-call, unused-ignore]
    client = sentinel.master_for(spec.service, username=spec.username or None,  # type: ignore[no-untyped-call, unused-ignore]
                                 password=spec.password or None, db=spec.db, **kwargs)
    return cast(redis.Redis, client)


def async_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """The asyncio twin of :func:`sync_client`."""
    nodes = cluster.parse(url)
    if nodes is not None:
        return cast(aioredis.Redis, aioredis.cluster.RedisCluster(
            startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in nodes.seeds],
            username=nodes.username or None, password=nodes.password or None, **kwargs))
    spec = parse(url)
    if spec is None:
        return aioredis.Redis.from_url(url, **kwargs)
    timeout = kwargs.get("socket_timeout") or _ASK_TIMEOUT_S
    sentinel = AsyncSentinel(list(spec.sentinels), socket_timeout=timeout)  # type: ignore[no-untyped-call, unused-ignore]
    client = sentinel.master_for(spec.service, username=spec.username or None,
                                 password=spec.password or None, db=spec.db, **kwargs)
    return cast(aioredis.Redis, client)
